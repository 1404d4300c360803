"""``edge-agent run``: start the agent (see :mod:`agent.main`) until SIGTERM or SIGINT.

On either signal it stops cleanly (stop serving, close the drift window, flush the outbox within
the configured time, publish the offline state, close the model) and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from types import FrameType
from typing import Any

from agent.config import ConfigError, add_state_dir_argument, load_config, resolve_state_dir
from agent.errors import AgentError
from protocol.cli import CommandError

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run the agent: local inference, health page, drift, telemetry",
        description="Load the active model, serve the predict API and the health page, and "
        "report to the fleet over MQTT until SIGTERM/SIGINT, which stop it cleanly.",
    )
    add_state_dir_argument(parser)
    parser.set_defaults(handler=run_agent)


def run_agent(args: argparse.Namespace) -> int:
    from agent.main import Agent  # the heavy imports wait until the agent really runs

    try:
        config = load_config(resolve_state_dir(args.state_dir, os.environ))
        agent = Agent(config)
    except (ConfigError, AgentError) as exc:
        raise CommandError(str(exc)) from None
    if not getattr(args, "verbose", False):
        logging.getLogger("apscheduler").setLevel(logging.WARNING)  # one line per job run
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("%s received: stopping", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            agent.start()
        except AgentError as exc:
            agent.stop()
            raise CommandError(str(exc)) from None
        except OSError:
            agent.stop()
            raise
        stop.wait()
        agent.stop()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0
