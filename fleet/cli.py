"""``fleet``: the fleet manager's command-line tool."""

from __future__ import annotations

from collections.abc import Sequence

from fleet import commands
from protocol.cli import run
from protocol.errors import ProtocolError


def main(argv: Sequence[str] | None = None) -> int:
    return run(
        "fleet", "edgefleet fleet manager", commands, argv, expected=(ProtocolError, OSError)
    )


if __name__ == "__main__":
    raise SystemExit(main())
