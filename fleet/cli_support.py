"""What the ``fleet`` subcommands share: the ``--config`` flag, opening the migrated database,
and turning domain errors into one clear line (exit 2) instead of a traceback.

Lives outside :mod:`fleet.commands` because every module there must be a command group.
"""

from __future__ import annotations

import argparse
import getpass
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlite_utils import Database

from fleet.audit import Actor
from fleet.settings import CONFIG_ENV, FleetSettings, load_settings
from fleet.store import connect, migrate

Handler = Callable[[argparse.Namespace], int]


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"TOML config file (default: ${CONFIG_ENV}, else environment and defaults)",
    )


def settings_from(args: argparse.Namespace, **overrides: object) -> FleetSettings:
    return load_settings(getattr(args, "config", None), **overrides)


@contextmanager
def database(settings: FleetSettings) -> Iterator[Database]:
    """The fleet database of ``settings``, created and migrated if needed."""
    db = connect(settings.db_path, settings.db_busy_timeout_ms)
    try:
        migrate(db)
        yield db
    finally:
        db.close()


def cli_actor() -> Actor:
    """Who runs a local command, for the audit log."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return Actor.cli(user)
