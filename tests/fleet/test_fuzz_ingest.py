"""Property-based fuzzing of the fleet's ingest path (:class:`fleet.ingest_writer.BatchWriter`)
on a real SQLite file: batches mixing valid reports (any field value the schema allows, from
enrolled, unknown and decommissioned devices, with repeated sequence numbers), valid payloads
with bytes flipped, inserted or cut, and arbitrary bytes on any topic.

Each batch must be written without an exception, every message accounted for exactly once
(stored, duplicate or rejected by reason), the persistent counters moved by exactly that, and
only reports that parse, from an active device, stored.

CI runs a hundred batches; ``EDGEFLEET_FUZZ=long`` (``bench/fuzz.py``) runs 10,000.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlite_utils import Database

from fleet.ingest_writer import DUPLICATES, BatchWriter, Received, counter_name, read_counters
from fleet.store import connect, migrate
from protocol.errors import MessageError, MessageRejected
from protocol.messages import (
    UPDATE_STATES,
    ActiveModel,
    Envelope,
    HeartbeatBody,
    Latency,
    ModelRef,
    StateBody,
    UpdateBody,
    encode,
    parse_message,
)
from protocol.topics import TopicKind, device_topic

LONG = os.environ.get("EDGEFLEET_FUZZ") == "long"
ACTIVE, RETIRED, GHOST = "dev-00", "retired", "ghost"
NOW = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    with closing(connect(tmp_path / "fleet.db")) as conn:
        migrate(conn)
        for device, status in ((ACTIVE, "active"), (RETIRED, "decommissioned")):
            conn.execute(
                "INSERT INTO devices (id, public_key, profile, enrolled_at, mqtt_username, "
                "status) VALUES (?, ?, 'x86-generic', '2030-01-01T00:00:00.000+00:00', ?, ?)",
                [device, f"{device}-key", device, status],
            )
        conn.conn.commit()
        yield conn


counts = st.integers(min_value=0, max_value=2**63 - 1)
floats = st.floats(min_value=0, max_value=1e300, allow_nan=False)
names = st.text(min_size=1, max_size=128).filter(str.isprintable)
refs = st.builds(ModelRef, names, counts)
bodies = st.one_of(
    st.builds(
        HeartbeatBody,
        floats,
        st.floats(min_value=0, max_value=1e5),
        *[counts] * 7,
        latency_ms=st.none()
        | st.lists(floats, min_size=3, max_size=3).map(lambda v: Latency(*sorted(v))),
        model=st.none() | refs,
    ),
    st.builds(
        UpdateBody,
        refs,
        st.booleans(),
        st.sampled_from(UPDATE_STATES),
        st.sampled_from(UPDATE_STATES),
        st.integers(min_value=1, max_value=1_000_000),
        st.none()
        | st.text(min_size=1, max_size=2000).filter(lambda s: s.replace("\n", "").isprintable()),
        st.dictionaries(st.sampled_from(UPDATE_STATES), floats, max_size=5),
    ),
    st.builds(
        StateBody,
        st.booleans(),
        names,
        names,
        st.none()
        | st.builds(
            ActiveModel,
            names,
            counts,
            st.sampled_from(["a", "b"]),
            st.sampled_from(["onnxruntime", "litert"]),
        ),
    ),
)
KIND_OF = {
    HeartbeatBody: TopicKind.HEARTBEAT,
    UpdateBody: TopicKind.UPDATE,
    StateBody: TopicKind.STATE,
}


@st.composite
def valid_reports(draw: st.DrawFn) -> Received:
    body = draw(bodies)
    kind = KIND_OF[type(body)]
    device = draw(st.sampled_from([ACTIVE, ACTIVE, ACTIVE, RETIRED, GHOST]))
    seq = draw(
        st.integers(min_value=1, max_value=40) | st.integers(min_value=1, max_value=2**63 - 1)
    )
    try:
        payload = encode(Envelope(kind, device, seq, draw(floats), body))
    except MessageError:  # e.g. a body too large to encode; then send it anyway as bytes
        payload = repr(body).encode()
    return Received(device_topic(device, kind), payload)


@st.composite
def edited_reports(draw: st.DrawFn) -> Received:
    item = draw(valid_reports())
    out = bytearray(item.payload)
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, max(0, len(out) - 1)))
        action = draw(st.sampled_from(["flip", "insert", "cut"]))
        if action == "flip" and out:
            out[i] ^= draw(st.integers(1, 255))
        elif action == "insert":
            out[i:i] = draw(st.binary(min_size=1, max_size=6))
        elif out:
            del out[i : i + draw(st.integers(1, 8))]
    return Received(item.topic, bytes(out))


topics = st.sampled_from(
    [device_topic(d, k) for d in (ACTIVE, GHOST) for k in TopicKind]
) | st.text(max_size=60)
arbitrary = st.builds(Received, topics, st.binary(max_size=300))
batches = st.lists(valid_reports() | edited_reports() | arbitrary, min_size=1, max_size=12)


def _rows(db: Database) -> set[tuple[str, int]]:
    return {(r[0], int(r[1])) for r in db.execute("SELECT device_id, seq FROM telemetry_messages")}


@settings(
    max_examples=10_000 if LONG else 100,
    deadline=None,
    derandomize=not LONG,  # CI runs the same cases every time; the long run explores
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=batches)
def test_fuzz_ingest_batch(db: Database, batch: list[Received]) -> None:
    rows, counters = _rows(db), read_counters(db)
    result = BatchWriter(max_message_bytes=4096).write(db, batch, NOW)

    assert result.total == len(batch)
    expected_new: set[tuple[str, int]] = set()
    rejected: Counter[str] = Counter()
    for item in batch:
        try:
            env = parse_message(item.topic, item.payload, 4096)
        except MessageRejected as exc:
            rejected[exc.reason] += 1
            continue
        if env.device == ACTIVE:
            expected_new.add((env.device, env.seq))
        else:
            rejected["unknown_device"] += 1
    after = _rows(db)
    assert after - rows == expected_new - rows
    assert sum(result.stored.values()) == len(after - rows)
    assert dict(rejected) == {k: v for k, v in result.rejected.items() if v}
    moved = {k: v - counters[k] for k, v in read_counters(db).items() if v != counters[k]}
    want = {counter_name("stored", k): n for k, n in result.stored.items() if n}
    want |= {counter_name("rejected", r): n for r, n in rejected.items()}
    if result.duplicates:
        want[DUPLICATES] = result.duplicates
    assert moved == want


def test_the_generators_reach_the_store(db: Database) -> None:
    """The valid reports really are valid (else the fuzzing only tests the rejections)."""
    body: Any = HeartbeatBody(1.0, 2.0, 3, 4, 5, 6, 7, 8, 9)
    item = Received(
        device_topic(ACTIVE, TopicKind.HEARTBEAT),
        encode(Envelope(TopicKind.HEARTBEAT, ACTIVE, 1, 1.0, body)),
    )
    assert BatchWriter().write(db, [item], NOW).stored == {"telemetry/heartbeat": 1}
