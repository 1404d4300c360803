"""The update state machine's memory: the current update record and what was accepted before.

Lives in the agent's SQLite file (``agent.db``, beside the outbox; WAL, ``synchronous=FULL`` so a
committed write survives a power cut). Three tables:

* ``update_current``: the one record of the update under way (or the last one finished), written
  by :meth:`UpdateStore.save` *before* the action of its state runs;
* ``update_history``: every finished update (committed, rolled back, failed), for the health page
  and for technicians;
* ``update_meta``: the serial and hash of the last accepted desired document (replay defence,
  and a retained document delivered again after a reconnect is recognised and ignored).

:meth:`UpdateStore.start` is called once per agent start: it counts the start into an unfinished
record's ``attempt`` (Mender's loop counter) before recovery decides what to do.

This module stores; it decides nothing (:mod:`agent.update_states` does).
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import replace
from pathlib import Path

from agent.errors import AgentError
from agent.update_states import TERMINAL, UpdateRecord

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS update_current ("
    " id INTEGER PRIMARY KEY CHECK (id = 1), record TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS update_history ("
    " update_id INTEGER PRIMARY KEY, state TEXT NOT NULL, record TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS update_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)


class UpdateStoreError(AgentError):
    """The update store cannot be opened or written; the message names the file."""


class UpdateStore:
    """The update record in SQLite; safe to use from several threads."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._conn = sqlite3.connect(
                self.path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            for statement in _SCHEMA:
                self._conn.execute(statement)
        except sqlite3.Error as exc:
            raise UpdateStoreError(
                f"cannot open the update store {self.path} ({exc}); check the state directory's "
                "permissions and free space"
            ) from exc
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _write(self, statements: list[tuple[str, tuple[object, ...]]]) -> None:
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    for sql, params in statements:
                        self._conn.execute(sql, params)
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise UpdateStoreError(
                    f"cannot write the update store {self.path} ({exc}); the update does not "
                    "go on until it can — free disk space or check the file"
                ) from exc

    def _one(self, sql: str, params: tuple[object, ...] = ()) -> str | None:
        with self._lock:
            row = self._conn.execute(sql, params).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    # --- the record ---------------------------------------------------------------------------

    def load(self) -> UpdateRecord | None:
        """The current record, or None before the first update."""
        text = self._one("SELECT record FROM update_current WHERE id = 1")
        return None if text is None else UpdateRecord.from_json(text)

    def save(self, record: UpdateRecord) -> None:
        """Persist ``record`` (and, if its state is final, add it to the history), atomically."""
        text = record.to_json()
        statements: list[tuple[str, tuple[object, ...]]] = [
            ("INSERT OR REPLACE INTO update_current (id, record) VALUES (1, ?)", (text,))
        ]
        if record.state in TERMINAL:
            statements.append(
                (
                    "INSERT OR REPLACE INTO update_history (update_id, state, record) "
                    "VALUES (?, ?, ?)",
                    (record.update_id, record.state.value, text),
                )
            )
        self._write(statements)

    def start(self) -> UpdateRecord | None:
        """Called once per agent start: count this start into an unfinished record's
        ``attempt`` (saved before anything else runs) and return the record."""
        record = self.load()
        if record is None or record.state in TERMINAL:
            return record
        record = replace(record, attempt=record.attempt + 1)
        self.save(record)
        return record

    def next_update_id(self) -> int:
        current = self.load()
        last = self._one("SELECT MAX(update_id) FROM update_history")
        return max(current.update_id if current else 0, int(last) if last else 0) + 1

    def history(self, limit: int = 20) -> list[UpdateRecord]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT record FROM update_history ORDER BY update_id DESC LIMIT ?", (limit,)
            ).fetchall()
        return [UpdateRecord.from_json(r[0]) for r in rows]

    # --- accepted desired documents -----------------------------------------------------------

    def last_serial(self) -> int | None:
        value = self._one("SELECT value FROM update_meta WHERE key = 'last_serial'")
        return None if value is None else int(value)

    def last_desired_sha256(self) -> str | None:
        return self._one("SELECT value FROM update_meta WHERE key = 'last_desired_sha256'")

    def accept(self, serial: int, desired_sha256: str, record: UpdateRecord | None) -> None:
        """Remember an accepted desired document and save the record it starts, atomically:
        a crash leaves both or neither."""
        upsert = "INSERT OR REPLACE INTO update_meta (key, value) VALUES (?, ?)"
        statements: list[tuple[str, tuple[object, ...]]] = [
            (upsert, ("last_serial", str(serial))),
            (upsert, ("last_desired_sha256", desired_sha256)),
        ]
        if record is not None:
            statements.append(
                (
                    "INSERT OR REPLACE INTO update_current (id, record) VALUES (1, ?)",
                    (record.to_json(),),
                )
            )
        self._write(statements)
