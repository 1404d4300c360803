"""Telemetry queries over real HTTP, with the ingester running inside the app against a real
broker: device detail, heartbeat series, drift windows, and drift merged across devices, which
must equal the drift of the concatenated rows."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import closing
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlite_utils import Database

from fleet.registry import ArtifactStore
from fleet.settings import FleetSettings, load_settings
from fleet.store import connect
from fleet.telemetry import MixedReferenceError, TelemetryService
from protocol.drift import count_rows, summarize
from protocol.messages import (
    ActiveModel,
    Envelope,
    HeartbeatBody,
    Latency,
    ModelRef,
    StateBody,
    UpdateBody,
    encode,
)
from protocol.reference import ReferenceProfile
from protocol.topics import TopicKind, device_topic
from simulators.broker import MosquittoBroker
from simulators.telemetry_load import (
    FEATURES,
    MODEL,
    publish,
    reference_profile,
    reference_sha256,
)

START = datetime.fromisoformat("2030-01-02T03:04:05+00:00")  # tests/fleet/conftest.py's clock
T0 = START.timestamp() - 3600
DEVICES = ("cam-a", "cam-b", "cam-c")


@pytest.fixture
def settings(tmp_path: Path, broker: MosquittoBroker) -> FleetSettings:
    """The app's settings with ingestion on, against this test's broker."""
    return load_settings(
        data_dir=tmp_path / "data",
        mqtt={"host": broker.host, "port": broker.port, "client_id": "fleet-test"},
        ingest={"enabled": True, "batch_wait_ms": 5},
    )


def enroll(db: Database, *devices: str, group: str = "line-1") -> None:
    for d in devices:
        db.execute(
            "INSERT INTO devices (id, public_key, profile, enrolled_at, mqtt_username, "
            "group_name) VALUES (?, ?, 'x86-generic', ?, ?, ?)",
            [d, f"{d}-key", START.isoformat(), d, group],
        )
    db.conn.commit()


def publish_reference(db: Database, settings: FleetSettings, profile: ReferenceProfile) -> None:
    """Record ``profile`` as the reference of MODEL v1, as the registry does when publishing."""
    sha = ArtifactStore(settings.artifacts_dir).put(profile.to_json())
    assert sha == reference_sha256(profile)
    now = START.isoformat()
    db.execute("INSERT INTO models VALUES (?, ?, 'test')", [MODEL, now])
    db.execute(
        "INSERT INTO releases (model, version, metadata, metadata_sha256, created_at, created_by) "
        "VALUES (?, 1, '{}', ?, ?, 'test')",
        [MODEL, "0" * 64, now],
    )
    db.execute(
        "INSERT INTO release_artifacts (release_id, file, kind, target_path, sha256, length) "
        "VALUES (last_insert_rowid(), 'reference.json', 'reference', ?, ?, ?)",
        [f"{MODEL}/1/reference.json", sha, len(profile.to_json())],
    )
    db.conn.commit()


@pytest.fixture
def db(settings: FleetSettings, app: Any) -> Iterator[Database]:
    with closing(connect(settings.db_path)) as conn:  # the app has migrated it
        enroll(conn, *DEVICES)
        yield conn


def rows(device_index: int, shift: float, n: int = 400) -> np.ndarray:
    rng = np.random.default_rng(100 + device_index)
    return rng.normal(loc=shift, size=(n, len(FEATURES)))


def predicted(x: np.ndarray) -> np.ndarray:
    return (x[:, 0] > 1).astype(np.int64)


def drift_messages(
    profile: ReferenceProfile, shift: float
) -> tuple[list[tuple[str, bytes]], np.ndarray]:
    """Two windows per device; returns the messages and every row they counted."""
    messages, all_rows = [], []
    for i, device in enumerate(DEVICES):
        for w in range(2):
            x = rows(10 * i + w, shift)
            counts = count_rows(
                profile,
                x,
                predicted(x),
                start=T0 + 600 * w,
                end=T0 + 600 * (w + 1),
                model_name=MODEL,
                model_version=1,
                reference_sha256=reference_sha256(profile),
            )
            env = Envelope(
                TopicKind.DRIFT, device, 100 + w, T0 + 600 * (w + 1), summarize(counts, profile)
            )
            messages.append((device_topic(device, TopicKind.DRIFT), encode(env)))
            all_rows.append(x)
    return messages, np.concatenate(all_rows)


def device_messages(device: str) -> list[tuple[str, bytes]]:
    model = ActiveModel(MODEL, 1, "a", "onnxruntime")
    out = [
        (
            device_topic(device, TopicKind.STATE),
            encode(
                Envelope(
                    TopicKind.STATE, device, 1, T0, StateBody(True, "2.1.0", "x86-generic", model)
                )
            ),
        )
    ]
    for seq in range(2, 12):
        beat = HeartbeatBody(
            uptime_s=float(seq),
            cpu_percent=float(seq * 3),
            mem_rss_bytes=1000 + seq,
            mem_available_bytes=10**9,
            disk_free_bytes=10**10,
            outbox_depth=0,
            outbox_evicted_total=0,
            inferences_total=seq * 100,
            inference_errors_total=0,
            latency_ms=Latency(1.0, 2.0, 2.5),
            model=ModelRef(MODEL, 1),
        )
        env = Envelope(TopicKind.HEARTBEAT, device, seq, T0 + 60 * seq, beat)
        out.append((device_topic(device, TopicKind.HEARTBEAT), encode(env)))
    upd = UpdateBody(ModelRef(MODEL, 2), False, "trial", "committed", reason="soak passed")
    out.append(
        (
            device_topic(device, TopicKind.UPDATE),
            encode(Envelope(TopicKind.UPDATE, device, 50, T0 + 900, upd)),
        )
    )
    return out


def wait_ingested(http: httpx.Client, headers: dict[str, str], total: int) -> dict[str, int]:
    deadline = time.monotonic() + 20
    while True:
        counters = http.get("/v1/telemetry/ingest", headers=headers).json()
        if sum(counters.values()) >= total or time.monotonic() > deadline:
            return counters
        time.sleep(0.05)


def test_telemetry_over_http_with_ingestion_in_the_app(
    broker: MosquittoBroker,
    settings: FleetSettings,
    db: Database,
    http: httpx.Client,
    viewer: dict[str, str],
) -> None:
    profile = reference_profile()
    publish_reference(db, settings, profile)
    drift, all_rows = drift_messages(profile, shift=0.6)
    messages = [m for d in DEVICES for m in device_messages(d)] + drift
    time.sleep(0.5)  # the app's ingester subscribes during startup
    publish(broker.host, broker.port, messages)
    counters = wait_ingested(http, viewer, len(messages))
    assert counters["stored:telemetry/drift"] == len(drift)
    assert counters["stored:telemetry/heartbeat"] == 10 * len(DEVICES)
    exposition = http.get("/metrics").text
    assert 'edgefleet_ingest_stored_total{kind="telemetry/drift"} 6.0' in exposition
    assert 'edgefleet_ingest_rejected_total{reason="malformed"} 0.0' in exposition

    detail = http.get("/v1/devices/cam-b/telemetry", headers=viewer).json()
    assert detail["online"] is True and detail["last_seen"] is not None
    assert detail["state"]["model"] == {
        "name": MODEL,
        "version": 1,
        "slot": "a",
        "runtime": "onnxruntime",
    }
    assert detail["state"]["agent_version"] == "2.1.0"
    assert detail["last_heartbeat"]["seq"] == 11
    assert detail["last_heartbeat"]["metrics"]["cpu_percent"] == 33.0
    assert detail["last_update"]["to_state"] == "committed"
    assert http.get("/v1/devices/nobody/telemetry", headers=viewer).status_code == 404
    assert http.get("/v1/devices/cam-b/telemetry").status_code == 401

    since = datetime.fromtimestamp(T0 + 60 * 4, START.tzinfo).isoformat()
    series = http.get(
        "/v1/devices/cam-a/heartbeats",
        params={"metric": ["cpu_percent", "latency_p99_ms"], "since": since},
        headers=viewer,
    ).json()
    assert series["metrics"] == ["cpu_percent", "latency_p99_ms"]
    assert [p["seq"] for p in series["points"]] == list(range(5, 12))
    assert series["points"][0]["metrics"] == {"cpu_percent": 15.0, "latency_p99_ms": 2.5}
    bad = http.get("/v1/devices/cam-a/heartbeats", params={"metric": "cpu"}, headers=viewer)
    assert bad.status_code == 422 and "cpu_percent" in bad.json()["detail"]

    windows = http.get("/v1/devices/cam-c/drift", headers=viewer).json()
    assert [w["seq"] for w in windows] == [100, 101]
    assert all(w["n"] == 400 for w in windows)

    merged = http.get(f"/v1/drift/merged/{MODEL}/1", headers=viewer)
    assert merged.status_code == 200, merged.text
    body = merged.json()
    assert (body["devices"], body["windows"], body["n"]) == (3, 6, len(all_rows))
    # merged drift equals the drift of all the rows counted at once
    expected = summarize(
        count_rows(
            profile,
            all_rows,
            predicted(all_rows),
            start=T0,
            end=T0 + 1200,
            model_name=MODEL,
            model_version=1,
            reference_sha256=reference_sha256(profile),
        ),
        profile,
    ).to_dict()["scores"]
    for got, want in zip(body["scores"]["features"], expected["features"], strict=True):
        assert got.keys() == want.keys()
        for key, value in want.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
            else:
                assert got[key] == value, key
    assert body["scores"]["verdict"] == expected["verdict"]
    assert body["drifted"] is True  # a 0.6 sd shift over 2,400 rows
    assert (
        http.get(
            f"/v1/drift/merged/{MODEL}/1", params={"group": "line-2"}, headers=viewer
        ).status_code
        == 404
    )
    assert http.get(f"/v1/drift/merged/{MODEL}/7", headers=viewer).status_code == 404
    early = (START - timedelta(days=3)).isoformat()
    assert (
        http.get(f"/v1/drift/merged/{MODEL}/1", params={"until": early}, headers=viewer).status_code
        == 404
    )


def test_merged_drift_refuses_mixed_reference_profiles(
    broker: MosquittoBroker,
    settings: FleetSettings,
    db: Database,
    http: httpx.Client,
    viewer: dict[str, str],
) -> None:
    profile = reference_profile()
    drift, _ = drift_messages(profile, shift=0.0)
    odd, _ = drift_messages(reference_profile(seed=8), shift=0.0)
    time.sleep(0.5)
    publish(broker.host, broker.port, drift[:2] + odd[3:4])  # cam-a: both windows; cam-b: last
    wait_ingested(http, viewer, 3)
    r = http.get(f"/v1/drift/merged/{MODEL}/1", headers=viewer)
    assert r.status_code == 409 and "2 different reference profiles" in r.json()["detail"]
    with pytest.raises(MixedReferenceError):
        TelemetryService(db).merged_counts(MODEL, 1, T0, T0 + 3600)
    # cam-a's first window alone is consistent, but its profile was never published: 503
    until = datetime.fromtimestamp(T0 + 600, START.tzinfo).isoformat()
    r = http.get(f"/v1/drift/merged/{MODEL}/1", params={"until": until}, headers=viewer)
    assert r.status_code == 503 and "publish" in r.json()["detail"]
