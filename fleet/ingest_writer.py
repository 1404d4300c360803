"""Write one batch of received device reports into SQLite, in one transaction.

:meth:`BatchWriter.write` parses every message with :func:`protocol.messages.parse_message`,
drops and counts the rejected ones (per reason, plus ``unknown_device`` for devices that are not
enrolled or are decommissioned), and stores the rest with ``INSERT OR IGNORE`` on
``(device_id, seq)``, so a redelivered message changes nothing (at-least-once delivery into an
idempotent store: each report is stored exactly once). A ``state`` report updates the device's
state only when its ``seq`` is higher than the stored one, so a late, older birth never hides a
newer Last Will. The persistent counters (``ingest_counters``) are bumped in the same
transaction, so they agree with the rows after a crash.

It does not talk to MQTT (:mod:`fleet.ingest` does, and acknowledges a batch only after this
commit) and does not answer queries (:mod:`fleet.telemetry`).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlite_utils import Database

from fleet.store import immediate, iso
from protocol.drift import DriftSummary
from protocol.errors import MessageRejected
from protocol.messages import (
    MAX_MESSAGE_BYTES,
    Envelope,
    HeartbeatBody,
    RejectReason,
    StateBody,
    UpdateBody,
    parse_message,
)
from protocol.topics import TopicKind

log = logging.getLogger(__name__)

UNKNOWN_DEVICE = "unknown_device"
# every reason a message can be dropped for; each is a counter
REJECT_REASONS: tuple[str, ...] = (*(r.value for r in RejectReason), UNKNOWN_DEVICE)
KINDS: tuple[str, ...] = tuple(k.value for k in TopicKind if k is not TopicKind.DESIRED)
DUPLICATES = "duplicates"


@dataclass(frozen=True)
class Received:
    """One message as paho handed it over. ``generation`` numbers the MQTT connection it came
    in on: an acknowledgement is only valid on that same connection."""

    topic: str
    payload: bytes
    mid: int = 0
    qos: int = 1
    generation: int = 0


@dataclass(frozen=True)
class BatchResult:
    """What one batch did: new rows per kind, duplicates ignored, rejects per reason."""

    stored: Mapping[str, int] = field(default_factory=dict)
    duplicates: int = 0
    rejected: Mapping[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.stored.values()) + self.duplicates + sum(self.rejected.values())


def counter_name(group: str, key: str) -> str:
    """The ``ingest_counters`` row name, e.g. ``rejected:malformed`` or ``stored:state``."""
    return f"{group}:{key}"


def _latency(body: HeartbeatBody, q: str) -> float | None:
    return None if body.latency_ms is None else float(getattr(body.latency_ms, q))


def _heartbeat_row(m: Envelope) -> tuple[Any, ...]:
    b = m.body
    assert isinstance(b, HeartbeatBody)
    return (
        m.device,
        m.seq,
        m.ts,
        b.uptime_s,
        b.cpu_percent,
        b.mem_rss_bytes,
        b.mem_available_bytes,
        b.disk_free_bytes,
        b.outbox_depth,
        b.outbox_evicted_total,
        b.inferences_total,
        b.inference_errors_total,
        _latency(b, "p50"),
        _latency(b, "p95"),
        _latency(b, "p99"),
        None if b.model is None else b.model.name,
        None if b.model is None else b.model.version,
    )


def _drift_row(m: Envelope) -> tuple[Any, ...]:
    s = m.body
    assert isinstance(s, DriftSummary)
    c = s.counts
    return (
        m.device,
        m.seq,
        m.ts,
        c.start,
        c.end,
        c.model_name,
        c.model_version,
        c.reference_sha256,
        c.n,
        int(s.verdict.drifted),
        json.dumps(list(s.verdict.drifted_features)),
        json.dumps(c.to_dict(), separators=(",", ":")),
    )


def _update_row(m: Envelope) -> tuple[Any, ...]:
    b = m.body
    assert isinstance(b, UpdateBody)
    return (
        m.device,
        m.seq,
        m.ts,
        b.release.name,
        b.release.version,
        int(b.rollback),
        b.from_state,
        b.to_state,
        b.attempt,
        b.reason,
        json.dumps(dict(b.elapsed_s), separators=(",", ":")),
    )


def _state_row(m: Envelope, received_at: str) -> tuple[Any, ...]:
    b = m.body
    assert isinstance(b, StateBody)
    model = b.model
    return (
        m.device,
        m.seq,
        m.ts,
        int(b.online),
        b.agent_version,
        b.profile,
        None if model is None else model.name,
        None if model is None else model.version,
        None if model is None else model.slot,
        None if model is None else model.runtime,
        received_at,
    )


_INSERT_MESSAGE = (
    "INSERT OR IGNORE INTO telemetry_messages (device_id, seq, kind, ts, received_at, body) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
_INSERT_HEARTBEAT = "INSERT OR IGNORE INTO heartbeats VALUES (" + ", ".join("?" * 17) + ")"
_INSERT_DRIFT = "INSERT OR IGNORE INTO drift_summaries VALUES (" + ", ".join("?" * 12) + ")"
_INSERT_UPDATE = "INSERT OR IGNORE INTO update_events VALUES (" + ", ".join("?" * 11) + ")"
_UPSERT_STATE = (
    "INSERT INTO device_state VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (device_id) DO UPDATE SET seq = excluded.seq, ts = excluded.ts, "
    "online = excluded.online, agent_version = excluded.agent_version, "
    "profile = excluded.profile, model_name = excluded.model_name, "
    "model_version = excluded.model_version, model_slot = excluded.model_slot, "
    "model_runtime = excluded.model_runtime, received_at = excluded.received_at "
    "WHERE excluded.seq > device_state.seq"
)
_COUNT = (
    "INSERT INTO ingest_counters (name, value) VALUES (?, ?) "
    "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value"
)


class BatchWriter:
    """Parses and stores batches; holds no connection (the caller passes one per batch)."""

    def __init__(self, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.max_message_bytes = max_message_bytes

    def parse(self, batch: Iterable[Received]) -> tuple[list[Envelope], Counter[str]]:
        """The valid messages of ``batch`` and the rejected counts per reason."""
        valid: list[Envelope] = []
        rejected: Counter[str] = Counter()
        for item in batch:
            try:
                valid.append(parse_guarded(item.topic, item.payload, self.max_message_bytes))
            except MessageRejected as exc:
                rejected[exc.reason] += 1
                log.debug("dropped %s: %s", item.topic[:200], exc.detail)
        return valid, rejected

    def write(self, db: Database, batch: Sequence[Received], now: datetime) -> BatchResult:
        """Store ``batch`` in one transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``)."""
        valid, rejected = self.parse(batch)
        received_at = iso(now)
        with immediate(db):
            active = _active_devices(db, {m.device for m in valid})
            known = [m for m in valid if m.device in active]
            if len(known) < len(valid):
                rejected[UNKNOWN_DEVICE] += len(valid) - len(known)
            stored = self._store(db, known, received_at)
            duplicates = len(known) - sum(stored.values())
            counts = [(counter_name("stored", k), n) for k, n in stored.items() if n]
            counts += [(counter_name("rejected", r), n) for r, n in rejected.items() if n]
            if duplicates:
                counts.append((DUPLICATES, duplicates))
            db.conn.executemany(_COUNT, counts)
        return BatchResult(dict(stored), duplicates, dict(rejected))

    def _store(self, db: Database, messages: list[Envelope], received_at: str) -> Counter[str]:
        stored: Counter[str] = Counter()
        if not messages:
            return stored
        conn = db.conn
        by_kind: dict[TopicKind, list[Envelope]] = {}
        for m in messages:
            by_kind.setdefault(m.kind, []).append(m)
        for kind, items in by_kind.items():
            rows = [
                (
                    m.device,
                    m.seq,
                    kind.value,
                    m.ts,
                    received_at,
                    json.dumps(m.body.to_dict(), separators=(",", ":")),
                )
                for m in items
            ]
            stored[kind.value] = conn.executemany(_INSERT_MESSAGE, rows).rowcount
        if TopicKind.HEARTBEAT in by_kind:
            conn.executemany(_INSERT_HEARTBEAT, map(_heartbeat_row, by_kind[TopicKind.HEARTBEAT]))
        if TopicKind.DRIFT in by_kind:
            conn.executemany(_INSERT_DRIFT, map(_drift_row, by_kind[TopicKind.DRIFT]))
        if TopicKind.UPDATE in by_kind:
            conn.executemany(_INSERT_UPDATE, map(_update_row, by_kind[TopicKind.UPDATE]))
        states = by_kind.get(TopicKind.STATE, [])
        if states:
            conn.executemany(_UPSERT_STATE, (_state_row(m, received_at) for m in states))
            changed = sorted({m.device for m in states})
            conn.executemany(
                "UPDATE devices SET "
                "online = (SELECT online FROM device_state WHERE device_id = devices.id), "
                "agent_version = (SELECT agent_version FROM device_state "
                "WHERE device_id = devices.id) WHERE id = ?",
                [(d,) for d in changed],
            )
        seen = sorted({m.device for m in messages})
        conn.executemany(
            "UPDATE devices SET last_seen = ? "
            "WHERE id = ? AND (last_seen IS NULL OR last_seen < ?)",
            [(received_at, d, received_at) for d in seen],
        )
        return stored


def parse_guarded(topic: str, payload: bytes, max_bytes: int) -> Envelope:
    """:func:`parse_message`, with any other exception (a parser bug) turned into a
    ``schema`` rejection: no device can crash the ingester."""
    try:
        return parse_message(topic, payload, max_bytes)
    except MessageRejected:
        raise
    except Exception as exc:
        log.exception("parse_message raised %s; message dropped as schema", type(exc).__name__)
        raise MessageRejected(RejectReason.SCHEMA, f"parser error: {exc!r}"[:300]) from None


def _active_devices(db: Database, ids: set[str]) -> set[str]:
    if not ids:
        return set()
    ordered = sorted(ids)
    found: set[str] = set()
    for i in range(0, len(ordered), 500):  # SQLite's bound-parameter limit
        chunk = ordered[i : i + 500]
        marks = ", ".join("?" * len(chunk))
        found.update(
            r[0]
            for r in db.execute(
                f"SELECT id FROM devices WHERE status = 'active' AND id IN ({marks})", chunk
            )
        )
    return found


def read_counters(db: Database) -> dict[str, int]:
    """The persistent ingestion counters, every known name present (zeros included)."""
    out = {counter_name("stored", k): 0 for k in KINDS}
    out.update({counter_name("rejected", r): 0 for r in REJECT_REASONS})
    out[DUPLICATES] = 0
    out.update(
        {str(r[0]): int(r[1]) for r in db.execute("SELECT name, value FROM ingest_counters")}
    )
    return out
