"""``edge-agent``: the device agent's command-line tool."""

from __future__ import annotations

from collections.abc import Sequence

from agent import commands
from agent.errors import AgentError
from protocol.cli import run
from protocol.errors import ProtocolError


def main(argv: Sequence[str] | None = None) -> int:
    return run(
        "edge-agent",
        "edgefleet device agent",
        commands,
        argv,
        expected=(ProtocolError, AgentError, OSError),
    )


if __name__ == "__main__":
    raise SystemExit(main())
