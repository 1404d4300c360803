"""The shared shape of the two command-line tools (``edge-agent`` and ``fleet``).

Each subcommand group lives in its own module of a ``commands`` package and exposes
``register(subparsers)``; the tool discovers the modules, so adding a command never edits a
central file. A command's handler returns the exit code. Domain errors (``ValueError`` subclasses
from :mod:`protocol.errors` and the packages' ``errors`` modules) print one clear line to stderr
and exit 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

Handler = Callable[[argparse.Namespace], int]


class CommandError(Exception):
    """A command cannot do what was asked; the message says why and what to do."""


def command_group(subparsers: Any, name: str, help: str) -> Any:
    """The ACTION subparsers of the group ``name`` (e.g. ``edge-agent model``), created on first
    use: several command modules can add actions to one group without knowing each other."""
    parser = subparsers.choices.get(name)
    if parser is None:
        parser = subparsers.add_parser(name, help=help)
        actions = parser.add_subparsers(dest=f"{name}_command", metavar="ACTION", required=True)
        parser.set_defaults(_group_actions=actions)
        return actions
    return parser.get_default("_group_actions")


def build_parser(prog: str, description: str, commands: ModuleType) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(sub)
    return parser


def run(
    prog: str,
    description: str,
    commands: ModuleType,
    argv: Sequence[str] | None,
    expected: tuple[type[BaseException], ...] = (),
) -> int:
    parser = build_parser(prog, description, commands)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler: Handler = args.handler
    caught: tuple[type[BaseException], ...] = (CommandError, *expected)
    try:
        return handler(args)
    except caught as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
