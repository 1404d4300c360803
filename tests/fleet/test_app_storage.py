"""The SQLite store: one WAL file with foreign keys on, migrations recorded and applied once,
old databases migrated in place, newer ones refused, concurrent starts safe."""

from __future__ import annotations

import sqlite3
import threading
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import pytest
from sqlite_utils import Database

from fleet.audit import Actor
from fleet.errors import MigrationError, StorageError
from fleet.store import (
    Migration,
    Store,
    connect,
    discover_migrations,
    ensure_column,
    immediate,
    migrate,
    schema_version,
)
from fleet.tokens import Role, TokenService

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def test_a_new_database_is_wal_with_foreign_keys(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "fleet.db"
    with closing(connect(path)) as db:
        applied = migrate(db)
        assert [m.number for m in applied] == [m.number for m in discover_migrations()]
        assert db.journal_mode == "wal"
        assert db.execute("PRAGMA foreign_keys").fetchone() == (1,)
        assert db.execute("PRAGMA busy_timeout").fetchone() == (10_000,)
        version = schema_version(db)
        assert db.execute("PRAGMA user_version").fetchone() == (version,)
        assert {"tokens", "audit", "enrollment_tokens", "devices"} <= set(db.table_names())


def test_migrations_are_numbered_uniquely_and_in_order() -> None:
    found = discover_migrations()
    numbers = [m.number for m in found]
    assert numbers == sorted(set(numbers)) and numbers[:2] == [1, 2]
    assert all(m.name.startswith(f"m{m.number:04d}_") for m in found)


def test_starting_again_applies_nothing_and_keeps_data(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    with closing(connect(path)) as db:
        migrate(db)
        TokenService(db).create("keep", Role.ADMIN, Actor.cli("t"), NOW)
    with closing(connect(path)) as db:
        assert migrate(db) == []
        assert [t.name for t in TokenService(db).list()] == ["keep"]
        recorded = db.execute("SELECT count(*) FROM migrations").fetchone()[0]
        assert recorded == len(discover_migrations())


def test_every_migration_can_run_twice(tmp_path: Path) -> None:
    """Idempotent migration functions: a history lost mid-way is safe to replay."""
    with closing(connect(tmp_path / "fleet.db")) as db:
        migrate(db)
        db.execute("DELETE FROM migrations")
        assert len(migrate(db)) == len(discover_migrations())


def test_an_old_schema_database_is_migrated_in_place(tmp_path: Path) -> None:
    """A database made by an earlier release (only migration 1) gains the later tables and
    keeps its rows; then a further migration that adds a column runs once."""
    path = tmp_path / "fleet.db"
    everything = discover_migrations()
    with closing(connect(path)) as db:
        migrate(db, everything[:1])
        assert schema_version(db) == 1 and "devices" not in db.table_names()
        secret = TokenService(db).create("old", Role.ADMIN, Actor.cli("t"), NOW).secret

    def add_note(db: Database) -> None:
        ensure_column(db, "devices", "note", str, not_null_default="")

    later = Migration(everything[-1].number + 1, "m9999_device_note", add_note)
    with closing(connect(path)) as db:
        applied = migrate(db, [*everything, later])
        assert [m.number for m in applied] == [m.number for m in everything[1:]] + [later.number]
        assert "note" in db.table("devices").columns_dict
        assert TokenService(db).authenticate(secret, NOW).name == "old"
        assert schema_version(db) == later.number
        assert migrate(db, [*everything, later]) == []


def test_a_database_from_a_newer_release_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    with closing(connect(path)) as db:
        migrate(db)
        db.table("migrations").insert({"number": 9000, "name": "m9000_future", "applied_at": ""})
    with closing(connect(path)) as db, pytest.raises(MigrationError, match="newer edgefleet"):
        migrate(db)


def test_a_failing_migration_leaves_nothing_behind(tmp_path: Path) -> None:
    def broken(db: Database) -> None:
        db.execute("CREATE TABLE half (x)")
        raise RuntimeError("boom")

    with closing(connect(tmp_path / "fleet.db")) as db:
        with pytest.raises(RuntimeError, match="boom"):
            migrate(db, [*discover_migrations(), Migration(500, "m0500_broken", broken)])
        assert "half" not in db.table_names()
        assert 500 not in {r[0] for r in db.execute("SELECT number FROM migrations")}
        # foreign keys are back on after the failed run
        assert db.execute("PRAGMA foreign_keys").fetchone() == (1,)


def test_a_migration_leaving_dangling_foreign_keys_is_refused(tmp_path: Path) -> None:
    def dangling(db: Database) -> None:
        db.execute(
            "INSERT INTO devices (id, public_key, profile, enrolled_at, mqtt_username, "
            "enrollment_token_id) VALUES ('dev-x', 'k', 'p', '', 'dev-x', 'enr-missing')"
        )

    with closing(connect(tmp_path / "fleet.db")) as db:
        with pytest.raises(MigrationError, match="dangling foreign keys"):
            migrate(db, [*discover_migrations(), Migration(501, "m0501_dangling", dangling)])
        assert db.execute("SELECT count(*) FROM devices").fetchone() == (0,)


def test_duplicate_migration_numbers_are_refused(tmp_path: Path) -> None:
    pkg = tmp_path / "dupmigs"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("m0001_a", "m0001_b"):
        (pkg / f"{name}.py").write_text("def migrate(db):\n    pass\n")
    module = ModuleType("dupmigs")
    module.__path__ = [str(pkg)]
    import sys

    sys.modules["dupmigs"] = module
    try:
        with pytest.raises(MigrationError, match="two migrations are numbered 0001"):
            discover_migrations(module)
    finally:
        for name in [n for n in sys.modules if n == "dupmigs" or n.startswith("dupmigs.")]:
            del sys.modules[name]


def test_two_processes_starting_together_apply_each_migration_once(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    calls: list[int] = []
    lock = threading.Lock()

    def counting(db: Database) -> None:
        with lock:
            calls.append(1)
        db.execute("CREATE TABLE IF NOT EXISTS counted (x)")

    migrations = [*discover_migrations(), Migration(600, "m0600_counted", counting)]
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def start() -> None:
        try:
            with closing(connect(path)) as db:
                barrier.wait()
                migrate(db, migrations)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and calls == [1]


def test_immediate_rolls_back_on_error_and_refuses_nesting(tmp_path: Path) -> None:
    with closing(connect(tmp_path / "fleet.db")) as db:
        migrate(db)
        with pytest.raises(RuntimeError), immediate(db):
            TokenService(db).audit.record(Actor("x"), "test.action", "t", NOW)
            raise RuntimeError
        assert db.execute("SELECT count(*) FROM audit").fetchone() == (0,)
        with immediate(db), pytest.raises(StorageError, match="nested"), immediate(db):
            pass


def test_the_pool_reuses_connections_and_never_leaks_a_transaction(tmp_path: Path) -> None:
    store = Store(tmp_path / "fleet.db", max_idle=1)
    with store.connect() as db:
        migrate(db)
        first = db
    with store.connect() as db:
        assert db is first
        db.execute("BEGIN")
        db.execute("INSERT INTO audit (ts, actor, action) VALUES ('t', 'a', 'x')")
    with store.connect() as db:  # the abandoned transaction was rolled back
        assert not db.conn.in_transaction
        assert db.execute("SELECT count(*) FROM audit").fetchone() == (0,)
    store.close()
    with store.connect() as db:
        assert db is not first


def test_an_unusable_data_dir_says_what_to_do(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError, match="EDGEFLEET_DATA_DIR"):
        connect(blocker / "fleet.db")


def test_the_schema_enforces_its_rules(tmp_path: Path) -> None:
    with closing(connect(tmp_path / "fleet.db")) as db:
        migrate(db)
        with pytest.raises(sqlite3.IntegrityError):
            db.execute(
                "INSERT INTO tokens (id, name, role, secret_sha256, created_at, created_by) "
                "VALUES ('t', 'n', 'root', 'h', '', '')"
            )
        with pytest.raises(sqlite3.IntegrityError):  # a device needs a real enrollment token
            db.execute(
                "INSERT INTO devices (id, public_key, profile, enrolled_at, mqtt_username, "
                "enrollment_token_id) VALUES ('d', 'k', 'p', '', 'd', 'enr-none')"
            )
