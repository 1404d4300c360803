"""The fleet manager's SQLite database: connections, transactions and schema migrations.

One database file (``<data_dir>/fleet.db``) in WAL mode, opened through sqlite-utils with
``foreign_keys=ON`` and a busy timeout; one connection per request or command, taken from the
:class:`Store`'s pool (WAL lets readers run beside the one writer). Commits keep SQLite's default
``synchronous=FULL``: a committed enrollment or audit entry survives a power cut.

Migrations are modules of :mod:`fleet.migrations` named ``mNNNN_what.py``, each with a
``migrate(db)`` function; :func:`migrate` applies the ones not yet recorded in the
``migrations`` table, in number order, each inside its own ``BEGIN IMMEDIATE`` transaction
together with its record, so each is applied exactly once even when two processes start
together. Migration functions are idempotent (``if_not_exists``, :func:`ensure_column`) so a
half-recorded history is safe to re-run. ``PRAGMA user_version`` mirrors the schema version.

This module knows no table of any feature; the services (:mod:`fleet.tokens`,
:mod:`fleet.devices`, ...) own their queries.
"""

from __future__ import annotations

import importlib
import json
import logging
import pkgutil
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any, Generic, TypeVar

from sqlite_utils import Database

from fleet.errors import MigrationError, StorageError

log = logging.getLogger(__name__)

MIGRATIONS_TABLE = "migrations"
_MODULE_NAME = re.compile(r"m(\d{4})_([a-z0-9_]+)")

T = TypeVar("T")


# --- values -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing: the items, the total number matching, and where the page is."""

    items: tuple[T, ...]
    total: int
    limit: int
    offset: int


def iso(now: datetime) -> str:
    """A timestamp as stored: UTC, fixed width, millisecond precision (sorts as text)."""
    if now.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware (use datetime.now(UTC))")
    return now.astimezone(UTC).isoformat(timespec="milliseconds")


def from_iso(text: str) -> datetime:
    return datetime.fromisoformat(text)


def to_json(value: Any) -> str:
    """Compact, key-sorted JSON for a TEXT column."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


# --- connections and transactions -------------------------------------------------------------


def connect(path: Path, busy_timeout_ms: int = 10_000) -> Database:
    """Open the database file (creating it and its directory), WAL, foreign keys on."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # FastAPI resolves a request's dependencies and runs its handler on different
        # threadpool threads; the connection is still used by one request at a time.
        conn = sqlite3.connect(str(path), timeout=busy_timeout_ms / 1000, check_same_thread=False)
        db = Database(conn, execute_plugins=False)
        db.execute("PRAGMA foreign_keys=ON")
        db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        db.enable_wal()
    except (sqlite3.Error, OSError) as exc:
        raise StorageError(
            f"cannot open the database {path}: {exc}; check data_dir (EDGEFLEET_DATA_DIR) exists "
            "and is writable"
        ) from exc
    return db


class Store:
    """Where the database lives, and a small pool of open connections to it.

    Opening a connection costs milliseconds (the first access maps the WAL index), so idle
    connections are kept for reuse; each is used by one unit of work at a time.
    """

    def __init__(self, path: Path, busy_timeout_ms: int = 10_000, max_idle: int = 8) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self.max_idle = max_idle
        self._idle: list[Database] = []
        self._lock = threading.Lock()

    @contextmanager
    def connect(self) -> Iterator[Database]:
        with self._lock:
            db = self._idle.pop() if self._idle else None
        if db is None:
            db = connect(self.path, self.busy_timeout_ms)
        try:
            yield db
        finally:
            self._release(db)

    def _release(self, db: Database) -> None:
        try:
            db.rollback()  # a unit of work never leaves a transaction open for the next
        except sqlite3.Error:
            db.close()
            return
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(db)
                return
        db.close()

    def close(self) -> None:
        """Close the idle connections (the store stays usable)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for db in idle:
            db.close()


@contextmanager
def immediate(db: Database) -> Iterator[Database]:
    """A write transaction that takes the write lock at once (``BEGIN IMMEDIATE``).

    Read-then-write logic (count a token's uses, then insert a device) must run in one of these:
    a deferred transaction could read, lose the race for the lock, and fail with SQLITE_BUSY,
    whereas an immediate one waits for the busy timeout and then sees the committed state.
    sqlite-utils' own writes inside the block join this transaction.
    """
    if db.conn.in_transaction:
        raise StorageError("immediate() cannot be nested inside an open transaction")
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.rollback()
        raise
    else:
        db.commit()


# --- migrations -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    number: int
    name: str
    apply: Callable[[Database], None]


def discover_migrations(package: ModuleType | None = None) -> tuple[Migration, ...]:
    """The migrations of ``package`` (default :mod:`fleet.migrations`), in number order."""
    if package is None:
        package = importlib.import_module("fleet.migrations")
    found: dict[int, Migration] = {}
    for info in pkgutil.iter_modules(package.__path__):
        match = _MODULE_NAME.fullmatch(info.name)
        if not match:
            continue
        number = int(match.group(1))
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        if number in found:
            raise MigrationError(
                f"two migrations are numbered {number:04d} ({found[number].name}, {info.name}); "
                "renumber the newer one to the next free number"
            )
        found[number] = Migration(number, info.name, module.migrate)
    return tuple(found[n] for n in sorted(found))


def applied_migrations(db: Database) -> dict[int, str]:
    if MIGRATIONS_TABLE not in db.table_names():
        return {}
    return {
        int(row["number"]): str(row["name"])
        for row in db.query(f"SELECT number, name FROM {MIGRATIONS_TABLE}")
    }


def schema_version(db: Database) -> int:
    """The number of the newest applied migration (0 for an empty database)."""
    return max(applied_migrations(db), default=0)


def migrate(
    db: Database,
    migrations: Sequence[Migration] | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> list[Migration]:
    """Apply the migrations not yet recorded, in order; return those applied now."""
    if migrations is None:
        migrations = discover_migrations()
    known = {m.number for m in migrations}
    newer = sorted(set(applied_migrations(db)) - known)
    if newer:
        raise MigrationError(
            f"the database was migrated by a newer edgefleet (unknown migrations "
            f"{', '.join(f'{n:04d}' for n in newer)}); upgrade edgefleet, or point data_dir at "
            "another database"
        )
    with immediate(db):  # a deferred transaction could lose the lock race to another starter
        db.table(MIGRATIONS_TABLE).create(
            {"number": int, "name": str, "applied_at": str}, pk="number", if_not_exists=True
        )
    done: list[Migration] = []
    # SQLite cannot switch foreign keys inside a transaction, and table rebuilds (sqlite-utils'
    # transform) must run with them off; each migration ends with a foreign_key_check instead.
    db.execute("PRAGMA foreign_keys=OFF")
    try:
        for migration in sorted(migrations, key=lambda m: m.number):
            with immediate(db):
                if migration.number in applied_migrations(db):
                    continue  # another process applied it while we waited for the lock
                migration.apply(db)
                broken = list(db.query("PRAGMA foreign_key_check"))
                if broken:
                    raise MigrationError(
                        f"migration {migration.name} leaves rows with dangling foreign keys: "
                        f"{broken[:5]}; fix the migration"
                    )
                db.table(MIGRATIONS_TABLE).insert(
                    {"number": migration.number, "name": migration.name, "applied_at": iso(now())}
                )
            log.info("applied migration %s", migration.name, extra={"migration": migration.name})
            done.append(migration)
    finally:
        db.execute("PRAGMA foreign_keys=ON")
    db.execute(f"PRAGMA user_version={schema_version(db)}")
    return done


def ensure_column(db: Database, table: str, column: str, col_type: type | str, **kw: Any) -> None:
    """Add ``column`` to ``table`` unless it is already there (for idempotent migrations)."""
    if column not in db[table].columns_dict:
        db.table(table).add_column(column, col_type, **kw)
