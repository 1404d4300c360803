"""MQTT telemetry ingestion against a real Mosquitto and a real SQLite file: exactly the valid
reports stored once, every reject counted by reason, nothing lost across an ingester crash or a
broker restart, and device online/offline from birth and Last Will."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import CollectorRegistry
from sqlite_utils import Database

from fleet.ingest import IngestConfig, Ingester, IngestMetrics, retire_session
from fleet.ingest_writer import BatchWriter, Received, read_counters
from fleet.store import Store, connect, migrate
from protocol.messages import Envelope, HeartbeatBody, StateBody, encode
from protocol.topics import TopicKind, device_topic, state_topic
from simulators.broker import MosquittoBroker
from simulators.telemetry_load import Workload, make_workload, publish

REPO = Path(__file__).resolve().parents[2]
DEVICES = tuple(f"dev-{i:02d}" for i in range(8))
MAX_BYTES = 8192
ENROLLED_AT = "2030-01-01T00:00:00.000+00:00"


def enroll(db: Database, *devices: str, status: str = "active") -> None:
    for d in devices:
        db.execute(
            "INSERT INTO devices (id, public_key, profile, enrolled_at, mqtt_username, status) "
            "VALUES (?, ?, 'x86-generic', ?, ?, ?)",
            [d, f"{d}-key", ENROLLED_AT, d, status],
        )
    db.conn.commit()


@pytest.fixture
def db_path(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "data" / "fleet.db"
    with closing(connect(path)) as db:
        migrate(db)
        enroll(db, *DEVICES)
        enroll(db, "retired", status="decommissioned")
    yield path


@pytest.fixture
def db(db_path: Path) -> Iterator[Database]:
    with closing(connect(db_path)) as conn:
        yield conn


def config(broker: MosquittoBroker, worker: str = "0", **kw: object) -> IngestConfig:
    return IngestConfig(
        broker.host,
        broker.port,
        f"fleet-ingest-{worker}",
        max_message_bytes=MAX_BYTES,
        **kw,  # type: ignore[arg-type]
    )


def stored(db: Database) -> list[tuple[str, int]]:
    return [(r[0], int(r[1])) for r in db.execute("SELECT device_id, seq FROM telemetry_messages")]


def wait_processed(db: Database, total: int, timeout: float = 60.0) -> dict[str, int]:
    """Wait until the persistent counters account for ``total`` messages."""
    deadline = time.monotonic() + timeout
    while True:
        counters = read_counters(db)
        if sum(counters.values()) >= total or time.monotonic() > deadline:
            return counters
        time.sleep(0.05)


def check_exact(db: Database, work: Workload) -> None:
    rows = stored(db)
    assert len(rows) == len(set(rows))
    assert set(rows) == work.expected
    kinds = dict(db.execute("SELECT kind, count(*) FROM telemetry_messages GROUP BY kind"))
    assert kinds == dict(work.expected_kinds)
    for table, kind in (
        ("heartbeats", "telemetry/heartbeat"),
        ("drift_summaries", "telemetry/drift"),
        ("update_events", "update"),
    ):
        count = db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        assert count == work.expected_kinds[kind], table


# --- the batch writer on its own ---------------------------------------------------------------


def _beat(device: str, seq: int) -> Received:
    body = HeartbeatBody(1.0, 2.0, 3, 4, 5, 0, 0, seq, 0)
    payload = encode(Envelope(TopicKind.HEARTBEAT, device, seq, 100.0 + seq, body))
    return Received(device_topic(device, TopicKind.HEARTBEAT), payload)


def _state(device: str, seq: int, online: bool) -> Received:
    body = StateBody(online, f"1.{seq}", "x86-generic")
    return Received(state_topic(device), encode(Envelope(TopicKind.STATE, device, seq, 1.0, body)))


def test_writer_stores_each_report_once_and_counts_every_drop(db: Database) -> None:
    writer = BatchWriter(MAX_BYTES)
    now = time_now()
    batch = [
        _beat("dev-00", 1),
        _beat("dev-00", 1),  # duplicate inside the batch
        _beat("dev-01", 1),
        _beat("retired", 1),  # decommissioned
        _beat("stranger", 1),  # never enrolled
        Received(device_topic("dev-00", TopicKind.HEARTBEAT), b"\xff\xfe"),
        Received("edgefleet/v1/devices/dev-00/telemetry/nope", b"{}"),
    ]
    result = writer.write(db, batch, now)
    assert result.stored == {"telemetry/heartbeat": 2}
    assert result.duplicates == 1
    assert result.rejected == {"unknown_device": 2, "malformed": 1, "unknown_topic": 1}
    again = writer.write(db, [_beat("dev-00", 1), _beat("dev-01", 2)], now)
    assert (again.stored, again.duplicates) == ({"telemetry/heartbeat": 1}, 1)
    assert sorted(stored(db)) == [("dev-00", 1), ("dev-01", 1), ("dev-01", 2)]
    counters = read_counters(db)
    assert counters["duplicates"] == 2
    assert counters["rejected:unknown_device"] == 2
    assert counters["stored:telemetry/heartbeat"] == 3
    last_seen = db.execute("SELECT last_seen FROM devices WHERE id = 'dev-00'").fetchone()[0]
    assert last_seen is not None and db.execute(
        "SELECT last_seen FROM devices WHERE id = 'retired'"
    ).fetchone() == (None,)


def test_an_older_state_never_overwrites_a_newer_one(db: Database) -> None:
    writer = BatchWriter(MAX_BYTES)
    writer.write(db, [_state("dev-00", 5, True), _state("dev-00", 6, False)], time_now())
    assert online(db, "dev-00") is False
    writer.write(db, [_state("dev-00", 5, True)], time_now())  # late redelivery of the birth
    assert online(db, "dev-00") is False
    assert db.execute("SELECT seq, agent_version FROM device_state").fetchall() == [(6, "1.6")]
    writer.write(db, [_state("dev-00", 9, True)], time_now())  # next connection's birth
    assert online(db, "dev-00") is True
    assert db.execute("SELECT agent_version FROM devices WHERE id = 'dev-00'").fetchone() == (
        "1.9",
    )


def time_now() -> datetime:
    return datetime.now(UTC)


def online(db: Database, device: str) -> bool:
    return bool(db.execute("SELECT online FROM devices WHERE id = ?", [device]).fetchone()[0])


# --- through the broker -----------------------------------------------------------------------


def test_10000_reports_with_duplicates_and_1000_rejects(
    broker: MosquittoBroker, db_path: Path, db: Database
) -> None:
    work = make_workload(
        DEVICES, 10_000, malformed=1000, duplicates=500, max_message_bytes=MAX_BYTES
    )
    unknown = [_beat("stranger", s) for s in range(1, 11)] + [_beat("retired", 1)]
    registry = CollectorRegistry()
    ingester = Ingester(config(broker), Store(db_path), IngestMetrics(registry))
    with ingester:
        assert ingester.wait_connected(5)
        time.sleep(0.2)  # the SUBACK
        publish(broker.host, broker.port, work.messages + [(u.topic, u.payload) for u in unknown])
        counters = wait_processed(db, len(work.messages) + len(unknown))
    check_exact(db, work)
    assert counters["duplicates"] == work.duplicates
    for reason, n in work.rejects.items():
        assert counters[f"rejected:{reason}"] == n, reason
        assert registry.get_sample_value("edgefleet_ingest_rejected_total", {"reason": reason}) == n
    assert counters["rejected:unknown_device"] == len(unknown)
    assert sum(work.rejects.values()) == 1000
    assert ingester.batches < len(work.messages) / 10  # batched, not one transaction each


def _ingest_process(
    data_dir: Path, broker: MosquittoBroker, worker: str
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "EDGEFLEET_DATA_DIR": str(data_dir),
        "EDGEFLEET_MQTT__PORT": str(broker.port),
        "EDGEFLEET_INGEST__WORKER": worker,
        "EDGEFLEET_LIMITS__MAX_MESSAGE_BYTES": str(MAX_BYTES),
        "EDGEFLEET_DB_BUSY_TIMEOUT_MS": "60000",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "fleet.cli", "ingest"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _wait_session(broker: MosquittoBroker, client_id: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while client_id not in broker.log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, "the ingester process never connected"
        time.sleep(0.05)
    time.sleep(0.3)  # the SUBACK


def test_a_killed_ingester_loses_nothing_and_stores_nothing_twice(
    broker: MosquittoBroker, db_path: Path, db: Database
) -> None:
    """SIGKILL while a batch is received but cannot commit (the test holds the write lock), and
    again mid-stream: a restarted worker with the same client id gets every report once."""
    work = make_workload(DEVICES, 3000, malformed=100, duplicates=50, max_message_bytes=MAX_BYTES)
    proc = _ingest_process(db_path.parent, broker, "crash")
    try:
        _wait_session(broker, "edgefleet-fleet-ingest-crash")
        db.execute("BEGIN IMMEDIATE")  # the worker receives, but cannot commit
        publish(broker.host, broker.port, work.messages[:1500])
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        db.conn.rollback()
        assert stored(db) == []  # received, never committed, never acknowledged
        proc = _ingest_process(db_path.parent, broker, "crash")
        publish(broker.host, broker.port, work.messages[1500:2200])
        proc.send_signal(signal.SIGKILL)  # mid-stream, wherever it is
        proc.wait(10)
        publish(broker.host, broker.port, work.messages[2200:])
    finally:
        proc.kill()
        proc.wait(10)
    ingester = Ingester(
        IngestConfig(
            broker.host, broker.port, "edgefleet-fleet-ingest-crash", max_message_bytes=MAX_BYTES
        ),
        Store(db_path),
    )
    with ingester:
        counters = wait_processed(db, len(work.messages))
        time.sleep(0.5)  # anything more (there must be nothing) would show now
    check_exact(db, work)
    assert sum(counters[f"rejected:{r}"] for r in work.rejects) == sum(work.rejects.values())


def test_a_broker_restart_mid_stream_loses_nothing(
    broker: MosquittoBroker, db_path: Path, db: Database
) -> None:
    """Reports queued and in flight for the shared subscription survive a broker restart."""
    work = make_workload(DEVICES, 3000, malformed=50, duplicates=50, max_message_bytes=MAX_BYTES)
    half = len(work.messages) // 2
    with Ingester(config(broker, batch_wait_s=0.005), Store(db_path)) as ingester:
        assert ingester.wait_connected(5)
        time.sleep(0.2)
        db.execute("BEGIN IMMEDIATE")  # hold the ingester back so the broker queues reports
        publish(broker.host, broker.port, work.messages[:half])
        broker.restart()  # SIGTERM: the broker saves its queues
        db.conn.rollback()
        assert ingester.wait_connected(15)
        publish(broker.host, broker.port, work.messages[half:])
        wait_processed(db, len(work.messages))
    check_exact(db, work)


def _device_client(device: str, will_seq: int) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device, protocol=mqtt.MQTTv311)
    will = encode(
        Envelope(TopicKind.STATE, device, will_seq, 2.0, StateBody(False, "1.0", "x86-generic"))
    )
    client.will_set(state_topic(device), will, qos=1, retain=True)
    return client


def test_birth_and_last_will_set_the_online_flag(
    broker: MosquittoBroker, db_path: Path, db: Database
) -> None:
    with Ingester(config(broker), Store(db_path)) as ingester:
        assert ingester.wait_connected(5)
        time.sleep(0.2)
        device = _device_client("dev-03", will_seq=2)
        device.connect(broker.host, broker.port)
        device.loop_start()
        birth = encode(
            Envelope(TopicKind.STATE, "dev-03", 1, 1.0, StateBody(True, "1.0", "x86-generic"))
        )
        device.publish(state_topic("dev-03"), birth, qos=1, retain=True).wait_for_publish(5)
        _wait_until(lambda: online(db, "dev-03"))
        device.loop_stop()
        sock = device.socket()
        assert sock is not None
        sock.close()  # the connection drops without DISCONNECT: the broker sends the will
        _wait_until(lambda: not online(db, "dev-03"))
        # a late copy of the older birth changes nothing
        publish(broker.host, broker.port, [(state_topic("dev-03"), birth)])
        time.sleep(0.3)
        assert online(db, "dev-03") is False
    seq = db.execute("SELECT seq FROM device_state WHERE device_id = 'dev-03'").fetchone()[0]
    assert seq == 2


def _wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_shared_subscription_splits_the_load_between_workers(
    broker: MosquittoBroker, db_path: Path, db: Database
) -> None:
    work = make_workload(DEVICES, 2000, duplicates=0, drift_every=0)
    a = Ingester(config(broker, "a"), Store(db_path))
    b = Ingester(config(broker, "b"), Store(db_path))
    with a, b:
        assert a.wait_connected(5) and b.wait_connected(5)
        time.sleep(0.3)
        publish(broker.host, broker.port, work.messages)
        wait_processed(db, len(work.messages))
    check_exact(db, work)
    assert a.batches > 0 and b.batches > 0


def test_nothing_is_acknowledged_before_it_is_committed(
    broker: MosquittoBroker, db_path: Path, db: Database
) -> None:
    """While the database refuses writes, the ingester keeps retrying and acknowledges nothing;
    the reports arrive once the database is back (no loss, no crash)."""
    work = make_workload(DEVICES, 300, drift_every=0)
    registry = CollectorRegistry()
    ingester = Ingester(config(broker), Store(db_path, busy_timeout_ms=50), IngestMetrics(registry))
    with ingester:
        assert ingester.wait_connected(5)
        time.sleep(0.2)
        db.execute("BEGIN IMMEDIATE")
        publish(broker.host, broker.port, work.messages)
        time.sleep(1.0)
        assert stored(db) == []
        errors = registry.get_sample_value("edgefleet_ingest_write_errors_total")
        assert errors is not None and errors > 0
        db.conn.rollback()
        wait_processed(db, len(work.messages))
    check_exact(db, work)


def test_a_retired_worker_strands_nothing(
    broker: MosquittoBroker, db_path: Path, db: Database
) -> None:
    """An offline member of the shared group keeps its share queued in its session; retiring
    the session hands everything to the workers that remain."""
    work = make_workload(DEVICES, 400, drift_every=0)
    gone = config(broker, "gone")
    with Ingester(gone, Store(db_path)) as first:
        assert first.wait_connected(5)
        time.sleep(0.2)
    retire_session(gone)
    with Ingester(config(broker, "stays"), Store(db_path)) as second:
        assert second.wait_connected(5)
        time.sleep(0.2)
        publish(broker.host, broker.port, work.messages)
        wait_processed(db, len(work.messages), timeout=10)
    check_exact(db, work)
