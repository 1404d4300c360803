"""MQTT topics and device reports: building, encoding, parsing, and refusing everything else."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.drift import DriftSummary, count_rows, summarize
from protocol.errors import DeviceIdError, MessageError, MessageRejected, TopicError
from protocol.messages import (
    MAX_MESSAGE_BYTES,
    UPDATE_STATES,
    ActiveModel,
    Envelope,
    HeartbeatBody,
    Latency,
    ModelRef,
    RejectReason,
    StateBody,
    UpdateBody,
    encode,
    parse_message,
)
from protocol.reference import build_reference_profile
from protocol.topics import (
    DEVICE_REPORTS,
    TopicKind,
    device_topic,
    fleet_filters,
    parse_topic,
    report_filters,
    shared,
    validate_device_id,
)

DEVICE = "cam-0042"
TS = 1718000000.25

STATE = StateBody(
    online=True,
    agent_version="0.1.0",
    profile="rpi4-64",
    model=ActiveModel(name="vibration", version=3, slot="b", runtime="onnxruntime"),
)
HEARTBEAT = HeartbeatBody(
    uptime_s=3600.5,
    cpu_percent=12.5,
    mem_rss_bytes=48_000_000,
    mem_available_bytes=1_500_000_000,
    disk_free_bytes=9_000_000_000,
    outbox_depth=0,
    outbox_evicted_total=0,
    inferences_total=120_000,
    inference_errors_total=2,
    latency_ms=Latency(p50=1.8, p95=3.1, p99=4.7),
    model=ModelRef(name="vibration", version=3),
)
UPDATE = UpdateBody(
    release=ModelRef(name="vibration", version=4),
    rollback=False,
    from_state="downloading",
    to_state="verifying",
    attempt=1,
    reason=None,
    elapsed_s={"downloading": 2.5},
)


def drift_summary(shift: float = 0.0, features: int = 2) -> DriftSummary:
    """A real window summary: seeded training data, a shifted live window."""
    rng = np.random.default_rng(7)
    names = [f"f{j}" for j in range(features)]
    train = rng.normal(size=(2000, features))
    reference = build_reference_profile(train, (train[:, 0] > 0).astype(int), names, ["ok", "bad"])
    live = rng.normal(loc=shift, size=(300, features))
    counts = count_rows(
        reference,
        live,
        (live[:, 0] > 0).astype(int),
        start=TS - 300,
        end=TS,
        model_name="vibration",
        model_version=3,
        reference_sha256="ab" * 32,
    )
    return summarize(counts, reference)


DRIFT = drift_summary(shift=1.0)
BODIES: dict[TopicKind, Any] = {
    TopicKind.STATE: STATE,
    TopicKind.HEARTBEAT: HEARTBEAT,
    TopicKind.DRIFT: DRIFT,
    TopicKind.UPDATE: UPDATE,
}

# the wire form, pinned: the README quotes these
GOLDEN = {
    TopicKind.STATE: (
        '{"v":1,"device":"cam-0042","seq":7,"ts":1718000000.25,"body":{"online":true,'
        '"agent_version":"0.1.0","profile":"rpi4-64","model":{"name":"vibration","version":3,'
        '"slot":"b","runtime":"onnxruntime"}}}'
    ),
    TopicKind.HEARTBEAT: (
        '{"v":1,"device":"cam-0042","seq":7,"ts":1718000000.25,"body":{"uptime_s":3600.5,'
        '"cpu_percent":12.5,"mem_rss_bytes":48000000,"mem_available_bytes":1500000000,'
        '"disk_free_bytes":9000000000,"outbox_depth":0,"outbox_evicted_total":0,'
        '"inferences_total":120000,"inference_errors_total":2,'
        '"latency_ms":{"p50":1.8,"p95":3.1,"p99":4.7},"model":{"name":"vibration","version":3}}}'
    ),
    TopicKind.UPDATE: (
        '{"v":1,"device":"cam-0042","seq":7,"ts":1718000000.25,"body":{"release":{"name":'
        '"vibration","version":4},"rollback":false,"from_state":"downloading","to_state":'
        '"verifying","attempt":1,"reason":null,"elapsed_s":{"downloading":2.5}}}'
    ),
}


def envelope(kind: TopicKind, seq: int = 7, device: str = DEVICE) -> Envelope:
    return Envelope(kind, device, seq, TS, BODIES[kind])


def rejected(topic: str, payload: Any, max_bytes: int = MAX_MESSAGE_BYTES) -> str | None:
    """The reject reason, or None if parsed. Anything but MessageRejected fails the test."""
    try:
        parse_message(topic, payload, max_bytes)
    except MessageRejected as exc:
        assert exc.reason in set(RejectReason), exc.reason
        assert exc.detail
        assert "refused by protocol.drift (" not in exc.detail  # DriftError, not another error
        return exc.reason
    return None


# --- topics -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(TopicKind))
def test_topic_round_trip(kind: TopicKind) -> None:
    topic = device_topic(DEVICE, kind)
    assert topic == f"edgefleet/v1/devices/{DEVICE}/{kind.value}"
    assert parse_topic(topic) == (DEVICE, kind)


@pytest.mark.parametrize(
    "bad", ["", "Cam", "a/b", "a+b", "a#", "a b", "x" * 65, "caf\u00e9", "a\n", 42, None]
)
def test_bad_device_ids_are_refused(bad: Any) -> None:
    with pytest.raises(DeviceIdError, match="lower-case letters"):
        validate_device_id(bad)
    with pytest.raises(DeviceIdError):
        device_topic(bad, TopicKind.STATE)


@pytest.mark.parametrize(
    "topic",
    [
        "edgefleet/v2/devices/cam-1/state",
        "edgefleet/v1/devices/cam-1",
        "edgefleet/v1/devices/cam-1/",
        "edgefleet/v1/devices//state",
        "edgefleet/v1/devices/+/state",
        "edgefleet/v1/devices/#",
        "edgefleet/v1/devices/cam-1/telemetry",
        "edgefleet/v1/devices/cam-1/telemetry/heartbeat/x",
        "edgefleet/v1/devices/CAM/state",
        "$share/fleet/edgefleet/v1/devices/cam-1/state",
        "",
    ],
)
def test_parse_topic_refuses_everything_else(topic: str) -> None:
    with pytest.raises(TopicError):
        parse_topic(topic)


def test_fleet_filters_match_every_report_topic_and_nothing_else() -> None:
    assert fleet_filters() == (
        "$share/fleet/edgefleet/v1/devices/+/state",
        "$share/fleet/edgefleet/v1/devices/+/telemetry/+",
        "$share/fleet/edgefleet/v1/devices/+/update",
    )
    for kind in TopicKind:
        topic = device_topic(DEVICE, kind)
        matched = any(mqtt.topic_matches_sub(f, topic) for f in report_filters())
        assert matched == (kind in DEVICE_REPORTS), kind
    with pytest.raises(TopicError):
        shared("a/+", "bad/group")


# --- encoding and parsing ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(GOLDEN))
def test_encode_gives_the_documented_wire_form_and_parses_back(kind: TopicKind) -> None:
    env = envelope(kind)
    payload = encode(env)
    assert payload.decode() == GOLDEN[kind]
    assert parse_message(device_topic(DEVICE, kind), payload) == env


def test_drift_summary_travels_whole() -> None:
    env = envelope(TopicKind.DRIFT)
    parsed = parse_message(device_topic(DEVICE, TopicKind.DRIFT), encode(env))
    assert parsed == env
    assert isinstance(parsed.body, DriftSummary)
    assert parsed.body.verdict.drifted  # a shift of one standard deviation
    assert parsed.body.counts.n == 300


def test_will_body_and_optional_fields_round_trip() -> None:
    offline = StateBody(online=False, agent_version="0.1.0", profile="x86-generic", model=None)
    quiet = HeartbeatBody(0.0, 0, 0, 0, 0, 0, 0, 0, 0)  # no inference yet, no model
    failed = UpdateBody(
        ModelRef("m", 2), True, "trial", "failed", attempt=3, reason="p99 latency 41 ms > 20"
    )
    for kind, body in ((TopicKind.STATE, offline), (TopicKind.HEARTBEAT, quiet)):
        env = Envelope(kind, DEVICE, 1, 0.0, body)
        assert parse_message(device_topic(DEVICE, kind), encode(env)) == env
    env = Envelope(TopicKind.UPDATE, DEVICE, 2**63 - 1, TS, failed)
    assert parse_message(device_topic(DEVICE, TopicKind.UPDATE), encode(env)) == env


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: Envelope(TopicKind.HEARTBEAT, DEVICE, 1, TS, STATE), "carries a HeartbeatBody"),
        (lambda: Envelope(TopicKind.DESIRED, DEVICE, 1, TS, STATE), "not a device report"),
        (lambda: Envelope(TopicKind.STATE, "Bad", 1, TS, STATE), "not a valid device id"),
        (lambda: Envelope(TopicKind.STATE, DEVICE, 0, TS, STATE), "seq must be between 1"),
        (lambda: Envelope(TopicKind.STATE, DEVICE, 1, math.nan, STATE), "ts must be a finite"),
        (lambda: Latency(3.0, 2.0, 4.0), "p50 <= p95 <= p99"),
        (lambda: ActiveModel("m", 1, "c", "onnxruntime"), "slot must be one of a, b"),
        (lambda: ModelRef("", 1), "1 to 128 characters"),
        (lambda: ModelRef("m", True), "must be an integer"),
        (lambda: UpdateBody(ModelRef("m", 1), False, "idle", "dancing"), "to_state must be"),
        (lambda: UpdateBody(ModelRef("m", 1), False, "idle", "failed", 0), "attempt must be"),
        (lambda: UpdateBody(ModelRef("m", 1), False, "idle", "failed", 1, "a\x00"), "control"),
        (lambda: HeartbeatBody(1, -1, 0, 0, 0, 0, 0, 0, 0), "cpu_percent must be"),
    ],
)
def test_building_a_bad_report_says_what_is_wrong(build: Any, match: str) -> None:
    with pytest.raises(MessageError, match=match):
        build()


def _payload(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def _valid_doc(kind: TopicKind = TopicKind.HEARTBEAT) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(encode(envelope(kind)))
    return doc


def _with(path: tuple[str | int, ...], value: Any, kind: TopicKind = TopicKind.HEARTBEAT) -> bytes:
    doc = _valid_doc(kind)
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return _payload(doc)


HB_TOPIC = device_topic(DEVICE, TopicKind.HEARTBEAT)
OK = encode(envelope(TopicKind.HEARTBEAT))


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("edgefleet/v1/devices/cam-0042/desired", OK, "unknown_topic"),
        ("edgefleet/v1/devices/cam-0042/telemetry/other", OK, "unknown_topic"),
        ("other/topic", OK, "unknown_topic"),
        (HB_TOPIC, b"", "malformed"),
        (HB_TOPIC, b"\xff\xfe{}", "malformed"),
        (HB_TOPIC, b"[1, 2]", "malformed"),
        (HB_TOPIC, b'"text"', "malformed"),
        (HB_TOPIC, b'{"v": NaN}', "malformed"),
        (HB_TOPIC, b'{"v": 1, "v": 1}', "malformed"),
        (HB_TOPIC, b"[" * 100_000, "malformed"),
        (HB_TOPIC, b'{"seq": ' + b"9" * 5000 + b"}", "malformed"),
        (HB_TOPIC, "a str, not bytes", "malformed"),
        (HB_TOPIC, _with(("v",), 2), "schema"),
        (HB_TOPIC, _with(("v",), 1.0), "schema"),
        (HB_TOPIC, _with(("v",), True), "schema"),
        (HB_TOPIC, _with(("seq",), 0), "schema"),
        (HB_TOPIC, _with(("seq",), 2**63), "schema"),
        (HB_TOPIC, _with(("seq",), 5.0), "schema"),
        (HB_TOPIC, _with(("ts",), "now"), "schema"),
        (HB_TOPIC, OK.replace(b'"ts":1718000000.25', b'"ts":1e400'), "schema"),
        (HB_TOPIC, _with(("device",), "CAM"), "schema"),
        (HB_TOPIC, _with(("extra",), 1), "schema"),
        (HB_TOPIC, _with(("body",), []), "schema"),
        (HB_TOPIC, _with(("body", "uptime_s"), None), "schema"),
        (HB_TOPIC, _with(("body", "inferences_total"), -1), "schema"),
        (HB_TOPIC, _with(("body", "latency_ms"), {"p50": 1}), "schema"),
        (HB_TOPIC, _with(("body", "model"), {"name": "\ud800", "version": 1}), "schema"),
        (HB_TOPIC, _with(("device",), "cam-0043"), "wrong_device"),
        (device_topic("cam-0043", TopicKind.HEARTBEAT), OK, "wrong_device"),
        (device_topic(DEVICE, TopicKind.STATE), OK, "schema"),  # a heartbeat on `state`
        (
            device_topic(DEVICE, TopicKind.UPDATE),
            _with(("body", "to_state"), "dancing", TopicKind.UPDATE),
            "schema",
        ),
        (
            device_topic(DEVICE, TopicKind.STATE),
            _with(("body", "model", "runtime"), "tensorrt", TopicKind.STATE),
            "schema",
        ),
        (device_topic(DEVICE, TopicKind.DRIFT), OK, "schema"),  # a heartbeat on `drift`
        (
            device_topic(DEVICE, TopicKind.DRIFT),
            _with(("body", "n"), 301, TopicKind.DRIFT),  # counts no longer add up to n
            "schema",
        ),
        (
            device_topic(DEVICE, TopicKind.DRIFT),
            _with(("body", "format"), "edgefleet-drift/2", TopicKind.DRIFT),
            "schema",
        ),
    ],
)
def test_each_bad_message_is_rejected_with_its_reason(
    topic: str, payload: Any, reason: str
) -> None:
    assert rejected(topic, payload) == reason


def test_size_limit_is_inclusive() -> None:
    assert rejected(HB_TOPIC, OK, max_bytes=len(OK)) is None
    assert rejected(HB_TOPIC, OK, max_bytes=len(OK) - 1) == "oversized"
    assert rejected(HB_TOPIC, bytearray(OK)) is None
    assert rejected(HB_TOPIC, memoryview(OK)) is None


# --- fuzzing: parse_message raises MessageRejected and nothing else ---------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(["cam-0042", "state", "idle", "a", "onnxruntime", "b", ""])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["v", "device", "seq", "ts", "body", "name", "version", "p50"])
            | st.text(max_size=8),
            inner,
            max_size=5,
        )
    ),
    max_leaves=10,
)
topics = st.sampled_from([device_topic(DEVICE, k) for k in TopicKind]) | st.text(max_size=60)
FUZZ = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(topic=topics, payload=st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(topic: str, payload: bytes) -> None:
    rejected(topic, payload, max_bytes=256)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topic=topics, doc=json_values)
def test_fuzz_arbitrary_json(topic: str, doc: Any) -> None:
    rejected(topic, _payload(doc))


Path = tuple[str | int, ...]


def _paths(doc: Any, prefix: Path = ()) -> list[Path]:
    """Every key and list index inside ``doc``."""
    items = (
        doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    )
    out: list[Path] = []
    for key, value in items:
        out.append((*prefix, key))
        out.extend(_paths(value, (*prefix, key)))
    return out


def _check_mutations(kind: TopicKind, paths: list[Path], value: Any, key: str) -> None:
    """Each path of a valid envelope replaced by ``value``, deleted, or joined by ``key``:
    rejected for its schema, or (when the change happens to be valid) read back the same."""
    topic = device_topic(DEVICE, kind)
    for path in paths:
        for action in ("replace", "delete", "add"):
            doc = _valid_doc(kind)
            parent = doc
            for step in path[:-1]:
                parent = parent[step]
            if action == "replace":
                parent[path[-1]] = value
            elif action == "delete":
                del parent[path[-1]]
            elif isinstance(parent, list):
                parent.append(value)
            else:
                parent[key] = value
            reason = rejected(topic, _payload(doc))
            if reason is None:
                parsed = parse_message(topic, _payload(doc))
                assert json.loads(encode(parsed)) == doc
            else:
                assert reason in ("schema", "wrong_device"), (path, action, reason)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    value=json_values,
    key=st.text(min_size=1, max_size=8),
    kind=st.sampled_from([TopicKind.STATE, TopicKind.HEARTBEAT, TopicKind.UPDATE]),
)
def test_fuzz_valid_envelopes_with_one_field_changed(value: Any, key: str, kind: TopicKind) -> None:
    _check_mutations(kind, _paths(_valid_doc(kind)), value, key)


DRIFT_PATHS = _paths(_valid_doc(TopicKind.DRIFT))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    value=json_values,
    key=st.text(min_size=1, max_size=8),
    paths=st.lists(st.sampled_from(DRIFT_PATHS), min_size=1, max_size=8, unique=True),
)
def test_fuzz_drift_envelopes_with_one_field_changed(
    value: Any, key: str, paths: list[Path]
) -> None:
    _check_mutations(TopicKind.DRIFT, paths, value, key)


finite = st.floats(min_value=0, max_value=1e12, allow_nan=False)
counts = st.integers(min_value=0, max_value=2**63 - 1)
names = st.text(st.characters(codec="utf-8", categories=["L", "N", "P", "S"]), min_size=1)
model_refs = st.builds(ModelRef, names.filter(lambda s: len(s) <= 128), counts)
latencies = st.lists(finite, min_size=3, max_size=3).map(lambda v: Latency(*sorted(v)))
heartbeats = st.builds(
    HeartbeatBody,
    finite,
    st.floats(min_value=0, max_value=1e5),
    *[counts] * 7,
    latency_ms=st.none() | latencies,
    model=st.none() | model_refs,
)
updates = st.builds(
    UpdateBody,
    model_refs,
    st.booleans(),
    st.sampled_from(UPDATE_STATES),
    st.sampled_from(UPDATE_STATES),
    st.integers(min_value=1, max_value=1_000_000),
    st.none() | names.filter(lambda s: len(s) <= 2000),
    st.dictionaries(names.filter(lambda s: len(s) <= 64), finite, max_size=5),
)


@settings(max_examples=300, deadline=None)
@given(
    body=heartbeats | updates,
    seq=st.integers(min_value=1, max_value=2**63 - 1),
    ts=finite,
    device=st.from_regex(r"[a-z0-9-]{1,64}", fullmatch=True),
)
def test_any_valid_report_round_trips(body: Any, seq: int, ts: float, device: str) -> None:
    kind = TopicKind.HEARTBEAT if isinstance(body, HeartbeatBody) else TopicKind.UPDATE
    env = Envelope(kind, device, seq, ts, body)
    assert parse_message(device_topic(device, kind), encode(env)) == env
