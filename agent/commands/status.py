"""``edge-agent status``: what the running agent's health endpoint says, in the terminal.

Reads ``GET /health`` of the local agent (the address from ``agent.toml``, or ``--url``) and
prints it as text, or as JSON with ``--json``. Exit status: 0 healthy, 1 degraded (the problems
are listed first), 3 the agent is not running.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

from agent.config import (
    ConfigError,
    HttpConfig,
    Listen,
    StatePaths,
    add_state_dir_argument,
    load_config,
    resolve_state_dir,
)
from agent.health import HealthSnapshot, render_text
from protocol.cli import CommandError

NOT_RUNNING = 3
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show the running agent's health (what its /health page says)",
        description="Ask the local agent's health endpoint and print the answer. Exit 0 when "
        "healthy, 1 when degraded, 3 when the agent is not running.",
    )
    add_state_dir_argument(parser)
    parser.add_argument("--url", metavar="URL", help="the health endpoint's base URL")
    parser.add_argument("--json", action="store_true", help="print the /health JSON")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="S", help=argparse.SUPPRESS)
    parser.set_defaults(handler=run_status)


def health_url(state_dir: Any) -> str:
    """Where the local agent's health server listens, as seen from this machine."""
    listen = HttpConfig().health_listen
    if StatePaths(state_dir).config.exists():
        try:
            listen = load_config(state_dir).http.health_listen
        except ConfigError as exc:
            raise CommandError(str(exc)) from None
    host = _LOOPBACK.get(listen.host, listen.host)
    return f"http://{Listen(host, listen.port)}"


def run_status(args: argparse.Namespace) -> int:
    base = (args.url or health_url(resolve_state_dir(args.state_dir, os.environ))).rstrip("/")
    try:
        with urllib.request.urlopen(base + "/health", timeout=args.timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        raise CommandError(
            f"the agent at {base} answered {exc.code} ({exc.read()[:200].decode(errors='replace')})"
        ) from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        print(
            f"edge-agent is not running (nothing answers at {base}/health: {reason}); start it "
            "with `edge-agent run` or `systemctl start edge-agent`",
            file=sys.stderr,
        )
        return NOT_RUNNING
    try:
        doc = json.loads(body)
        snapshot = HealthSnapshot.from_dict(doc)
    except (ValueError, KeyError, TypeError) as exc:
        raise CommandError(
            f"{base}/health did not answer with an edgefleet health document ({exc}); is --url "
            "the agent's health address?"
        ) from None
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(render_text(snapshot), end="")
    return 0 if snapshot.ok else 1
