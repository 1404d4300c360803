"""The telemetry outbox: every report is stored in SQLite before it is sent.

A report is written here first, in one transaction that also takes the device's next sequence
number and builds the envelope bytes; the MQTT link deletes a row only when the broker has
acknowledged it (QoS 1 PUBACK). So a report survives a broker outage, a dead network and a
killed agent, and the sequence number is never reused: the counter lives in its own row and keeps
growing even when the outbox is emptied.

Tables (in the agent's database, next to other agent state):

* ``outbox(seq INTEGER PRIMARY KEY, topic TEXT, payload BLOB, created REAL)``: one row per
  report not yet acknowledged; ``payload`` is the encoded envelope, ready to publish.
* ``outbox_state(id=1, device, last_seq, evicted_total)``: the last sequence number handed out
  (reports and the link's birth/will reservations) and how many reports were evicted.

Durability: WAL with ``synchronous=FULL``, so a returned :meth:`Outbox.put` is on disk (acks
commit without their own fsync: losing one in a power cut only re-sends a report). The
outbox is bounded (rows and payload bytes): when a put would exceed a bound the oldest rows are
evicted and ``evicted_total`` grows (reported in the heartbeat). Thread safety: one connection
shared by all threads behind one lock (every operation is a short transaction).

This module stores and bounds; it does not publish (:mod:`agent.mqtt_link`) and does not decide
what to report (:mod:`agent.reporter`).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import sqlite_utils

from agent.errors import OutboxError
from protocol.errors import ProtocolError
from protocol.messages import MAX_MESSAGE_BYTES, Body, Envelope, encode
from protocol.topics import TopicKind, device_topic, validate_device_id

DEFAULT_MAX_ROWS = 100_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class OutboxRow:
    seq: int
    topic: str
    payload: bytes
    created: float


@dataclass(frozen=True)
class OutboxStats:
    depth: int  # rows waiting for an acknowledgement
    bytes: int  # their payload bytes
    evicted_total: int  # rows dropped by the bound, ever
    last_seq: int  # the last sequence number handed out


class Outbox:
    """A durable, bounded FIFO of encoded reports for one device (see the module docstring)."""

    def __init__(
        self,
        path: str | Path,
        device_id: str,
        *,
        max_rows: int = DEFAULT_MAX_ROWS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_payload_bytes: int = MAX_MESSAGE_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_rows < 1 or max_bytes < max_payload_bytes:
            raise OutboxError(
                f"outbox bounds max_rows={max_rows}, max_bytes={max_bytes} are too small: "
                f"keep max_rows >= 1 and max_bytes >= max_payload_bytes ({max_payload_bytes})"
            )
        self.path = Path(path)
        self.device_id = validate_device_id(device_id)
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.max_payload_bytes = max_payload_bytes
        self._clock = clock
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=10
            )
        except sqlite3.Error as exc:
            raise OutboxError(
                f"cannot open the outbox database {self.path}: {exc}; check that its "
                "directory exists and is writable"
            ) from None
        try:
            self._setup()
        except sqlite3.Error as exc:
            self._conn.close()
            raise OutboxError(f"cannot set up the outbox in {self.path}: {exc}") from None
        row = self._conn.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox"
        ).fetchone()
        self._depth, self._bytes = int(row[0]), int(row[1])

    def _setup(self) -> None:
        db = sqlite_utils.Database(self._conn)
        self._conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed put survives a power cut, not only a crash of the process
        self._conn.execute("PRAGMA synchronous=FULL")
        with self._transaction():
            db.table("outbox").create(
                {"seq": int, "topic": str, "payload": bytes, "created": float},
                pk="seq",
                not_null={"topic", "payload", "created"},
                if_not_exists=True,
            )
            db.table("outbox_state").create(
                {"id": int, "device": str, "last_seq": int, "evicted_total": int},
                pk="id",
                not_null={"device", "last_seq", "evicted_total"},
                if_not_exists=True,
            )
            self._conn.execute(
                "INSERT OR IGNORE INTO outbox_state (id, device, last_seq, evicted_total) "
                "VALUES (1, ?, 0, 0)",
                (self.device_id,),
            )
            (owner,) = self._conn.execute("SELECT device FROM outbox_state WHERE id = 1").fetchone()
        if owner != self.device_id:
            raise OutboxError(
                f"the outbox in {self.path} belongs to device {owner!r}, not {self.device_id!r}; "
                "sequence numbers are per device, so use a fresh database for a new device id"
            )

    # --- transactions -------------------------------------------------------------------------

    def _transaction(self) -> _Transaction:
        return _Transaction(self._conn)

    # --- writing ------------------------------------------------------------------------------

    def put(self, kind: TopicKind, body: Body, now: float | None = None) -> int:
        """Store one report; returns its sequence number once it is durably on disk.

        Raises :class:`protocol.errors.MessageError` for a body that does not fit ``kind``, and
        :class:`OutboxError` when the encoded report is larger than ``max_payload_bytes`` or the
        database cannot be written.
        """
        ts = self._clock() if now is None else now
        with self._lock:
            try:
                with self._transaction():
                    seq = self._last_seq() + 1
                    payload = encode(Envelope(kind, self.device_id, seq, ts, body))
                    if len(payload) > self.max_payload_bytes:
                        raise OutboxError(
                            f"a {TopicKind(kind).value} report of {len(payload)} bytes exceeds "
                            f"the {self.max_payload_bytes}-byte message limit; send fewer "
                            "features or bins per summary"
                        )
                    self._conn.execute(
                        "INSERT INTO outbox (seq, topic, payload, created) VALUES (?, ?, ?, ?)",
                        (seq, device_topic(self.device_id, kind), payload, ts),
                    )
                    self._conn.execute("UPDATE outbox_state SET last_seq = ? WHERE id = 1", (seq,))
                    evicted, freed = self._evict(self._depth + 1, self._bytes + len(payload))
            except sqlite3.Error as exc:
                raise self._write_error(exc) from None
            except ProtocolError:
                raise
            self._depth += 1 - evicted
            self._bytes += len(payload) - freed
        return seq

    def _evict(self, depth: int, size: int) -> tuple[int, int]:
        """Delete the oldest rows until ``depth``/``size`` fit the bounds (in the caller's
        transaction); returns (rows, bytes) deleted."""
        rows = freed = 0
        while depth - rows > self.max_rows or size - freed > self.max_bytes:
            need_rows = max(depth - rows - self.max_rows, 1)
            batch = self._conn.execute(
                "SELECT seq, length(payload) FROM outbox ORDER BY seq LIMIT ?", (need_rows,)
            ).fetchall()
            if not batch:
                break
            for seq, length in batch:
                if depth - rows <= self.max_rows and size - freed <= self.max_bytes:
                    break
                self._conn.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
                rows += 1
                freed += int(length)
        if rows:
            self._conn.execute(
                "UPDATE outbox_state SET evicted_total = evicted_total + ? WHERE id = 1", (rows,)
            )
        return rows, freed

    def reserve(self, n: int = 1) -> int:
        """Take ``n`` consecutive sequence numbers without storing a report; returns the first.

        The MQTT link uses this for the birth and the Last Will, which are not queued.
        """
        if n < 1:
            raise OutboxError(f"reserve needs n >= 1, got {n}")
        with self._lock:
            try:
                with self._transaction():
                    first = self._last_seq() + 1
                    self._conn.execute(
                        "UPDATE outbox_state SET last_seq = ? WHERE id = 1", (first + n - 1,)
                    )
            except sqlite3.Error as exc:
                raise self._write_error(exc) from None
        return first

    def ack(self, seq: int) -> bool:
        """Delete the row of ``seq`` (the broker acknowledged it); False if it was not there."""
        return self.ack_many((seq,)) == 1

    def ack_many(self, seqs: Iterable[int]) -> int:
        """Delete several acknowledged rows in one transaction; returns how many were there."""
        seqs = list(seqs)
        if not seqs:
            return 0
        deleted = freed = 0
        with self._lock:
            try:
                # an ack lost in a power cut only means the report is sent once more (the fleet
                # dedupes), so it need not wait for its own fsync: the next put syncs it anyway
                self._conn.execute("PRAGMA synchronous=NORMAL")
                with self._transaction():
                    for seq in seqs:
                        row = self._conn.execute(
                            "DELETE FROM outbox WHERE seq = ? RETURNING length(payload)", (seq,)
                        ).fetchone()
                        if row is not None:
                            deleted += 1
                            freed += int(row[0])
            except sqlite3.Error as exc:
                raise self._write_error(exc) from None
            finally:
                self._conn.execute("PRAGMA synchronous=FULL")
            self._depth -= deleted
            self._bytes -= freed
        return deleted

    # --- reading ------------------------------------------------------------------------------

    def peek(self, n: int, after: int = 0) -> list[OutboxRow]:
        """Up to ``n`` rows with ``seq > after``, oldest first (they stay in the outbox)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT seq, topic, payload, created FROM outbox WHERE seq > ? "
                "ORDER BY seq LIMIT ?",
                (after, n),
            ).fetchall()
        return [OutboxRow(int(s), str(t), bytes(p), float(c)) for s, t, p, c in rows]

    def depth(self) -> int:
        """Reports waiting for an acknowledgement."""
        return self._depth

    def oldest_age(self, now: float | None = None) -> float | None:
        """Seconds since the oldest waiting report was made; None when the outbox is empty."""
        with self._lock:
            (created,) = self._conn.execute("SELECT min(created) FROM outbox").fetchone()
        if created is None:
            return None
        return max(0.0, (self._clock() if now is None else now) - float(created))

    def evicted_total(self) -> int:
        """Reports dropped by the bound since the outbox was created."""
        return self.stats().evicted_total

    def stats(self) -> OutboxStats:
        with self._lock:
            last_seq, evicted = self._conn.execute(
                "SELECT last_seq, evicted_total FROM outbox_state WHERE id = 1"
            ).fetchone()
            return OutboxStats(self._depth, self._bytes, int(evicted), int(last_seq))

    # --- plumbing -----------------------------------------------------------------------------

    def _last_seq(self) -> int:
        (last,) = self._conn.execute("SELECT last_seq FROM outbox_state WHERE id = 1").fetchone()
        return int(last)

    def _write_error(self, exc: sqlite3.Error) -> OutboxError:
        return OutboxError(
            f"cannot write the outbox {self.path}: {exc}; check free disk space and that the "
            "file is writable (reports made meanwhile are not stored)"
        )

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any exception)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self._conn.execute("COMMIT")
        else:
            self._conn.execute("ROLLBACK")
