"""A small synthetic fleet written into a real fleet database: a published reference profile,
enrolled devices, and hours of state, heartbeat and drift reports stored through the real
ingestion writer (:class:`fleet.ingest_writer.BatchWriter`), as if they came over MQTT.

For the dashboard's screenshot script, the demo and tests. Devices named in ``drifting`` see
their inputs shift more and more over time; ``offline`` devices stop reporting early. It writes
nothing else (no alerts, no rollouts) and talks to no broker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
from sqlite_utils import Database

from fleet.ingest_writer import BatchWriter, Received
from fleet.registry import ArtifactStore
from fleet.settings import FleetSettings
from fleet.store import iso
from protocol.drift import count_rows, summarize
from protocol.messages import (
    ActiveModel,
    Body,
    Envelope,
    HeartbeatBody,
    Latency,
    ModelRef,
    StateBody,
    encode,
)
from protocol.reference import ReferenceProfile
from protocol.topics import TopicKind, device_topic
from simulators.telemetry_load import FEATURES, MODEL, reference_profile, reference_sha256

__all__ = ["FEATURES", "MODEL", "SampleFleet", "publish_reference", "seed"]


@dataclass(frozen=True)
class SampleFleet:
    model: str
    version: int
    devices: tuple[str, ...]
    drifting: tuple[str, ...]
    offline: tuple[str, ...]
    start: datetime
    end: datetime


def publish_reference(db: Database, settings: FleetSettings, profile: ReferenceProfile) -> None:
    """Record ``profile`` as the reference of MODEL v1, as the registry does when publishing."""
    sha = ArtifactStore(settings.artifacts_dir).put(profile.to_json())
    now = "2030-01-01T00:00:00.000+00:00"
    db.execute("INSERT OR IGNORE INTO models VALUES (?, ?, 'sample')", [MODEL, now])
    db.execute(
        "INSERT INTO releases (model, version, metadata, metadata_sha256, created_at, created_by) "
        "VALUES (?, 1, '{}', ?, ?, 'sample')",
        [MODEL, "0" * 64, now],
    )
    db.execute(
        "INSERT INTO release_artifacts (release_id, file, kind, target_path, sha256, length) "
        "VALUES (last_insert_rowid(), 'reference.json', 'reference', ?, ?, ?)",
        [f"{MODEL}/1/reference.json", sha, len(profile.to_json())],
    )
    db.conn.commit()


def enroll(db: Database, devices: Sequence[str], when: datetime, group: str = "line-1") -> None:
    for d in devices:
        db.execute(
            "INSERT INTO devices (id, public_key, profile, enrolled_at, mqtt_username, "
            "group_name) VALUES (?, ?, 'x86-generic', ?, ?, ?)",
            [d, f"{d}-key", iso(when), d, group],
        )
    db.conn.commit()


def _beat(i: int, k: int) -> HeartbeatBody:
    wave = float(np.sin(k / 6.0 + i))
    return HeartbeatBody(
        uptime_s=float(k * 300),
        cpu_percent=round(30 + 8 * i + 10 * wave, 1),
        mem_rss_bytes=120_000_000 + 1_000_000 * i,
        mem_available_bytes=10**9,
        disk_free_bytes=10**10,
        outbox_depth=0,
        outbox_evicted_total=0,
        inferences_total=k * 1000,
        inference_errors_total=0,
        latency_ms=Latency(round(2 + 0.2 * i + 0.3 * wave, 2), 4.0 + 0.2 * i, 6.0 + 0.2 * i),
        model=ModelRef(MODEL, 1),
    )


def seed(
    db: Database,
    settings: FleetSettings,
    end: datetime,
    devices: Sequence[str] = ("cam-1", "cam-2", "cam-3", "cam-4"),
    drifting: Sequence[str] = ("cam-3",),
    offline: Sequence[str] = (),
    hours: int = 6,
    window: timedelta = timedelta(minutes=30),
    rows: int = 800,
    max_shift: float = 1.0,
) -> SampleFleet:
    """Write ``hours`` of reports ending at ``end`` (see the module docstring)."""
    profile = reference_profile()
    publish_reference(db, settings, profile)
    start = end - timedelta(hours=hours)
    enroll(db, devices, start - timedelta(days=1))
    writer = BatchWriter()
    rng = np.random.default_rng(11)
    steps = int(timedelta(hours=hours) / window)
    for i, device in enumerate(devices):
        seq = 0
        model = ActiveModel(MODEL, 1, "a", "onnxruntime")

        def put(
            kind: TopicKind, ts: float, body: Body, received: datetime, device: str = device
        ) -> None:
            nonlocal seq
            seq += 1
            env = Envelope(kind, device, seq, ts, body)
            writer.write(db, [Received(device_topic(device, kind), encode(env))], received)

        put(
            TopicKind.STATE,
            start.timestamp(),
            StateBody(True, "2.1.0", "x86-generic", model),
            start,
        )
        last = steps // 3 if device in offline else steps
        for k in range(1, last + 1):
            w_end = start + window * k
            for b in range(int(window / timedelta(minutes=5))):
                t = w_end - window + timedelta(minutes=5 * (b + 1))
                put(TopicKind.HEARTBEAT, t.timestamp(), _beat(i, k * 6 + b), t)
            shift = max_shift * k / steps if device in drifting else 0.0
            x = rng.normal(loc=shift, size=(rows, len(FEATURES)))
            x[:, 2:] = rng.normal(size=(rows, len(FEATURES) - 2))  # only f0 and f1 drift
            counts = count_rows(
                profile,
                x,
                (x[:, 0] > 1).astype(np.int64),
                start=(w_end - window).timestamp(),
                end=w_end.timestamp(),
                model_name=MODEL,
                model_version=1,
                reference_sha256=reference_sha256(profile),
            )
            put(TopicKind.DRIFT, w_end.timestamp(), summarize(counts, profile), w_end)
        if device in offline:
            t = start + window * last + timedelta(seconds=1)
            put(TopicKind.STATE, t.timestamp(), StateBody(False, "2.1.0", "x86-generic", model), t)
    return SampleFleet(MODEL, 1, tuple(devices), tuple(drifting), tuple(offline), start, end)
