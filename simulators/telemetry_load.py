"""A telemetry workload for ingestion tests and benchmarks: fake devices that are just MQTT
publishers of real envelopes (:func:`protocol.messages.encode`), with duplicates and rejected
messages mixed in, and the exact outcome the fleet must store and count.

:func:`make_workload` builds the messages (deterministic for a seed); :func:`publish` sends them
with QoS 1 over one paho connection and returns once the broker acknowledged every one. The
drift reference profile used for drift bodies is :func:`reference_profile` (seeded).

Nothing here touches the fleet's database; the tests and ``bench/ingest.py`` compare what the
fleet stored with :attr:`Workload.expected`.
"""

from __future__ import annotations

import hashlib
import random
import threading
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from protocol.drift import DriftSummary, count_rows, summarize
from protocol.messages import (
    ActiveModel,
    Body,
    Envelope,
    HeartbeatBody,
    Latency,
    ModelRef,
    StateBody,
    UpdateBody,
    encode,
)
from protocol.reference import ReferenceProfile, build_reference_profile
from protocol.topics import DEVICES, TopicKind, device_topic

MODEL = "load-model"
FEATURES = ("f0", "f1", "f2", "f3")
CLASSES = ("ok", "fault")
REJECT_KINDS = ("malformed", "oversized", "wrong_device", "schema", "unknown_topic")


def reference_profile(seed: int = 7) -> ReferenceProfile:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(5000, len(FEATURES)))
    return build_reference_profile(x, (x[:, 0] > 1).astype(np.int64), FEATURES, CLASSES)


def reference_sha256(profile: ReferenceProfile) -> str:
    return hashlib.sha256(profile.to_json()).hexdigest()


def drift_summary(
    profile: ReferenceProfile, rng: np.random.Generator, start: float, rows: int, shift: float
) -> DriftSummary:
    """One window of ``rows`` rows whose inputs are shifted by ``shift`` standard deviations."""
    x = rng.normal(loc=shift, size=(rows, len(FEATURES)))
    counts = count_rows(
        profile,
        x,
        (x[:, 0] > 1).astype(np.int64),
        start=start,
        end=start + 60.0,
        model_name=MODEL,
        model_version=1,
        reference_sha256=reference_sha256(profile),
    )
    return summarize(counts, profile)


@dataclass
class Workload:
    """Messages to publish, in order, and what the fleet must end up with."""

    messages: list[tuple[str, bytes]] = field(default_factory=list)
    expected: set[tuple[str, int]] = field(default_factory=set)  # valid (device, seq)
    expected_kinds: Counter[str] = field(default_factory=Counter)
    rejects: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    devices: tuple[str, ...] = ()


def make_workload(
    devices: Sequence[str],
    valid: int,
    malformed: int = 0,
    duplicates: int = 0,
    *,
    max_message_bytes: int = 256 * 1024,
    start_ts: float = 1_900_000_000.0,
    drift_every: int = 50,
    seed: int = 1,
    first_seq: int = 1,
) -> Workload:
    """``valid`` distinct reports spread over ``devices`` (heartbeats mostly, plus state,
    update and drift), ``duplicates`` re-sends of already-made reports, and ``malformed``
    rejected messages of every reason, shuffled together (re-sends always after their first).
    Each device's sequence numbers start at ``first_seq``."""
    rnd = random.Random(seed)
    rng = np.random.default_rng(seed)
    profile = reference_profile()
    seqs = dict.fromkeys(devices, first_seq - 1)
    work = Workload(devices=tuple(devices))
    made: list[tuple[str, bytes]] = []
    for i in range(valid):
        device = devices[i % len(devices)]
        seqs[device] += 1
        seq = seqs[device]
        ts = start_ts + i * 0.01
        kind, body = _body(i, device, seq, drift_every, profile, rng, ts)
        payload = encode(Envelope(kind, device, seq, ts, body))
        made.append((device_topic(device, kind), payload))
        work.expected.add((device, seq))
        work.expected_kinds[kind.value] += 1
    bad = [
        _reject(REJECT_KINDS[i % len(REJECT_KINDS)], devices, rnd, max_message_bytes)
        for i in range(malformed)
    ]
    for reason, _, _ in bad:
        work.rejects[reason] += 1
    out: list[tuple[str, bytes]] = list(made)
    for _, topic, payload in bad:
        out.insert(rnd.randrange(len(out) + 1), (topic, payload))
    for _ in range(duplicates):
        k = rnd.randrange(len(made))
        first = out.index(made[k])
        out.insert(rnd.randrange(first + 1, len(out) + 1), made[k])
    work.duplicates = duplicates
    work.messages = out
    return work


def _body(
    i: int,
    device: str,
    seq: int,
    drift_every: int,
    profile: ReferenceProfile,
    rng: np.random.Generator,
    ts: float,
) -> tuple[TopicKind, Body]:
    if seq == 1 or i % 97 == 0:
        model = ActiveModel(MODEL, 1, "a", "onnxruntime")
        return TopicKind.STATE, StateBody(True, "1.0.0", "x86-generic", model)
    if drift_every and i % drift_every == 0:
        return TopicKind.DRIFT, drift_summary(profile, rng, ts, 200, 0.0)
    if i % 31 == 0:
        return TopicKind.UPDATE, UpdateBody(ModelRef(MODEL, 2), False, "idle", "downloading")
    return TopicKind.HEARTBEAT, HeartbeatBody(
        uptime_s=float(seq),
        cpu_percent=float(i % 100),
        mem_rss_bytes=50_000_000 + i,
        mem_available_bytes=1_000_000_000,
        disk_free_bytes=10_000_000_000,
        outbox_depth=i % 7,
        outbox_evicted_total=0,
        inferences_total=seq * 10,
        inference_errors_total=0,
        latency_ms=Latency(1.0, 2.0, 3.0),
        model=ModelRef(MODEL, 1),
    )


def _reject(
    reason: str, devices: Sequence[str], rnd: random.Random, max_bytes: int
) -> tuple[str, str, bytes]:
    device = rnd.choice(devices)
    seq = rnd.randrange(1, 10**9)
    good = b'{"v":1,"device":"%s","seq":%d,"ts":1.0,"body":' % (device.encode(), seq)
    if reason == "malformed":
        return reason, device_topic(device, TopicKind.HEARTBEAT), good + b"{not json"
    if reason == "oversized":
        return reason, device_topic(device, TopicKind.HEARTBEAT), b"x" * (max_bytes + 1)
    if reason == "wrong_device":
        other = "impostor-" + str(rnd.randrange(1000))
        state = StateBody(True, "1.0.0", "x86-generic")
        payload = encode(Envelope(TopicKind.STATE, other, seq, 1.0, state))
        return reason, device_topic(device, TopicKind.STATE), payload
    if reason == "schema":
        return reason, device_topic(device, TopicKind.HEARTBEAT), good + b'{"uptime_s":"long"}}'
    return reason, f"{DEVICES}/{device}/telemetry/bogus", good + b"{}}"


def publish(
    host: str, port: int, messages: Sequence[tuple[str, bytes]], timeout: float = 120.0
) -> float:
    """Publish every message with QoS 1 and wait for every PUBACK; returns the seconds taken."""
    import time

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"load-{uuid.uuid4().hex[:12]}",
        protocol=mqtt.MQTTv311,
    )
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    acked = threading.Semaphore(0)
    client.on_publish = lambda *_: acked.release()
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    client.connect(host, port)
    client.loop_start()
    try:
        if not connected.wait(10):
            raise TimeoutError("load publisher could not connect to the broker")
        t0 = time.perf_counter()
        for topic, payload in messages:
            client.publish(topic, payload, qos=1)
        deadline = time.monotonic() + timeout
        for _ in messages:
            if not acked.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise TimeoutError("the broker did not acknowledge every message in time")
        return time.perf_counter() - t0
    finally:
        client.disconnect()
        client.loop_stop()
