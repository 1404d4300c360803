"""``fleet``: the fleet manager's command-line tool."""

from __future__ import annotations

from collections.abc import Sequence

from fleet import commands
from fleet.errors import FleetError
from protocol.cli import run
from protocol.errors import ProtocolError


def main(argv: Sequence[str] | None = None) -> int:
    return run(
        "fleet",
        "edgefleet fleet manager",
        commands,
        argv,
        expected=(ProtocolError, FleetError, OSError),
    )


if __name__ == "__main__":
    raise SystemExit(main())
