"""Property-based fuzzing of every parser of untrusted input in :mod:`protocol`: device reports
(envelope and bodies), drift summaries, the signed desired document, device request headers and
public keys, and the release manifest (``bundle.json``, the TUF targets' custom metadata, the
reference profile and golden set it names).

Each target gets arbitrary input and valid input with random changes (a field replaced by any
JSON value, deleted, or joined by an unknown one; bytes flipped, inserted or cut), and asserts
that the parser raises only its documented error type, and that whatever it accepts reads back
the same after re-encoding.

CI runs a few hundred cases per target; ``EDGEFLEET_FUZZ=long`` (``bench/fuzz.py``) runs
10,000 each.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root

from protocol.bundle import check_file, parse_bundle
from protocol.canonical import canonical_json
from protocol.desired import DesiredDocument, sign_desired, verify_desired
from protocol.device_auth import (
    DeviceAuthError,
    PublicKeyError,
    load_public_key,
    parse_header,
    public_key_hex,
    sign_request,
    verify_request,
)
from protocol.drift import DriftSummary, count_rows, summarize
from protocol.errors import (
    BundleError,
    DesiredDocumentError,
    DriftError,
    MessageRejected,
    ReferenceProfileError,
    ReleaseTargetError,
)
from protocol.golden import GoldenSet, GoldenSetError
from protocol.messages import (
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
from protocol.reference import ReferenceProfile, build_reference_profile
from protocol.release import artifact_custom, parse_artifact_custom
from protocol.topics import TopicKind, device_topic

LONG = os.environ.get("EDGEFLEET_FUZZ") == "long"


def fuzz(ci: int = 150) -> settings:
    """``ci`` cases in CI, 10,000 in the long run."""
    return settings(
        max_examples=10_000 if LONG else ci,
        deadline=None,
        derandomize=not LONG,  # CI runs the same cases every time; the long run explores
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


# --- generic inputs and mutations ---------------------------------------------------------------

NAMES = ["v", "device", "seq", "ts", "body", "name", "version", "signed", "format", "files"]
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63)])
    | st.floats()
    | st.text(max_size=20)
    | st.text(max_size=300)
    | st.sampled_from(["", "cam-0042", "idle", "a", "onnxruntime", "../x", "/etc", "\x00"])
)


def json_values(numbers: st.SearchStrategy[Any] = scalars) -> st.SearchStrategy[Any]:
    return st.recursive(
        numbers,
        lambda inner: (
            st.lists(inner, max_size=5)
            | st.dictionaries(st.sampled_from(NAMES) | st.text(max_size=8), inner, max_size=5)
        ),
        max_leaves=12,
    )


any_json = json_values()
# canonical JSON (what signed documents use) has no floats
canonical_values = json_values(scalars.filter(lambda v: not isinstance(v, float)))

Path_ = tuple[str | int, ...]


def _paths(doc: Any, prefix: Path_ = ()) -> list[Path_]:
    """Every key and list index inside ``doc``."""
    items = (
        doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    )
    out: list[Path_] = []
    for key, value in items:
        out.append((*prefix, key))
        out.extend(_paths(value, (*prefix, key)))
    return out


@st.composite
def mutated(draw: st.DrawFn, doc: Any, values: st.SearchStrategy[Any] = any_json) -> Any:
    """``doc`` with one to three random changes: a key or item replaced by any value, deleted,
    or a new key or item added beside it."""
    new = copy.deepcopy(doc)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        paths = _paths(new)
        if not paths:
            return draw(values)
        path = draw(st.sampled_from(paths))
        parent = new
        for step in path[:-1]:
            parent = parent[step]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, list):
            parent.insert(draw(st.integers(0, len(parent))), draw(values))
        else:
            parent[draw(st.text(min_size=1, max_size=8))] = draw(values)
    return new


@st.composite
def byte_edits(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with one to four bytes flipped, inserted or cut (never unchanged)."""
    out = bytearray(data)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        i = draw(st.integers(0, max(0, len(out) - 1)))
        action = draw(st.sampled_from(["flip", "insert", "cut"]))
        if action == "flip" and out:
            out[i] ^= draw(st.integers(1, 255))
        elif action == "insert":
            out[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif out:
            del out[i : i + draw(st.integers(1, 16))]
    return bytes(out) if bytes(out) != data else data + b" "


def _json_bytes(doc: Any) -> bytes:
    # allow_nan: NaN/Infinity are what a hostile JSON file may hold for json.loads
    return json.dumps(doc, allow_nan=True).encode()


# --- device reports (protocol.messages): MessageRejected only ---------------------------------

DEVICE = "cam-0042"
TS = 1718000000.25


def _drift_summary() -> DriftSummary:
    rng = np.random.default_rng(7)
    train = rng.normal(size=(2000, 2))
    reference = build_reference_profile(
        train, (train[:, 0] > 0).astype(int), ["f0", "f1"], ["a", "b"]
    )
    live = rng.normal(loc=1.0, size=(300, 2))
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


DRIFT = _drift_summary()
BODIES: dict[TopicKind, Any] = {
    TopicKind.STATE: StateBody(
        online=True,
        agent_version="0.1.0",
        profile="rpi4-64",
        model=ActiveModel(name="vibration", version=3, slot="b", runtime="onnxruntime"),
    ),
    TopicKind.HEARTBEAT: HeartbeatBody(
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
    ),
    TopicKind.UPDATE: UpdateBody(
        release=ModelRef(name="vibration", version=4),
        rollback=False,
        from_state="downloading",
        to_state="failed",
        attempt=1,
        reason="verification: hash mismatch",
        elapsed_s={"downloading": 2.5},
    ),
    TopicKind.DRIFT: DRIFT,
}
VALID = {
    kind: json.loads(encode(Envelope(kind, DEVICE, 7, TS, body))) for kind, body in BODIES.items()
}
TOPICS = [device_topic(DEVICE, k) for k in TopicKind] + [
    "edgefleet/v1/devices/cam-0042/other",
    "edgefleet/v1/devices/../state",
    "",
]
topics = st.sampled_from(TOPICS) | st.text(max_size=60)


def _parse_report(topic: str, payload: bytes) -> None:
    """parse_message raises MessageRejected only; what it accepts round-trips."""
    try:
        env = parse_message(topic, payload)
    except MessageRejected:
        return
    assert parse_message(topic, encode(env)) == env


@fuzz()
@given(topic=topics, payload=st.binary(max_size=400))
def test_fuzz_report_bytes(topic: str, payload: bytes) -> None:
    _parse_report(topic, payload)


@fuzz()
@given(kind=st.sampled_from(list(VALID)), data=st.data())
def test_fuzz_report_mutated(kind: TopicKind, data: st.DataObject) -> None:
    doc = data.draw(mutated(VALID[kind]))
    topic = data.draw(st.sampled_from([device_topic(DEVICE, kind)]) | topics)
    _parse_report(topic, json.dumps(doc).encode())


@fuzz()
@given(kind=st.sampled_from(list(VALID)), data=st.data())
def test_fuzz_report_bytes_edited(kind: TopicKind, data: st.DataObject) -> None:
    payload = data.draw(byte_edits(json.dumps(VALID[kind]).encode()))
    _parse_report(device_topic(DEVICE, kind), payload)


# --- drift summaries (protocol.drift / drift_wire): DriftError only ---------------------------

DRIFT_DOC = DRIFT.to_dict()


@fuzz()
@given(doc=mutated(DRIFT_DOC) | any_json)
def test_fuzz_drift_summary(doc: Any) -> None:
    try:
        summary = DriftSummary.from_dict(doc)
    except DriftError:
        return
    assert DriftSummary.from_dict(summary.to_dict()) == summary


# --- the signed desired document (protocol.desired): DesiredDocumentError only ----------------

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
ROOT_KEY = CryptoSigner.generate_ed25519()
TARGETS_KEY = CryptoSigner.generate_ed25519()


def _root() -> Root:
    root = Root(version=1, expires=NOW + timedelta(days=365), consistent_snapshot=True)
    root.add_key(ROOT_KEY.public_key, "root")
    root.add_key(TARGETS_KEY.public_key, "targets")
    for role in ("snapshot", "timestamp"):
        root.add_key(ROOT_KEY.public_key, role)
    md = Metadata(root)
    md.sign(ROOT_KEY)
    return md.signed


ROOT = _root()
DOC = DesiredDocument(
    device_id="dev-7",
    serial=12,
    issued_at=NOW,
    expires=NOW + timedelta(hours=6),
    model="pdm",
    model_version=3,
    target_path="pdm/3/model.int8.onnx",
    rollback=False,
    rollout_id="r-1",
)
WIRE = sign_desired(DOC, TARGETS_KEY)


def _verify(wire: bytes) -> None:
    try:
        doc = verify_desired(wire, ROOT, NOW, device_id="dev-7", last_serial=3)
    except DesiredDocumentError:
        return
    assert verify_desired(sign_desired(doc, TARGETS_KEY), ROOT, NOW) == doc


@fuzz()
@given(wire=byte_edits(WIRE) | st.binary(max_size=400))
def test_fuzz_desired_bytes(wire: bytes) -> None:
    _verify(wire)


@fuzz()
@given(signed=mutated(DOC.to_dict(), canonical_values) | canonical_values)
def test_fuzz_desired_validly_signed_content(signed: Any) -> None:
    """Content behind a good signature is checked too: a targets key holder's (or a fleet
    bug's) malformed document is refused as such, never with another exception."""
    payload = canonical_json(signed)
    sig = TARGETS_KEY.sign(payload)
    wire = canonical_json(
        {"signed": signed, "signatures": [{"keyid": sig.keyid, "sig": sig.signature}]}
    )
    _verify(wire)


@fuzz()
@given(envelope=mutated(json.loads(WIRE), canonical_values))
def test_fuzz_desired_envelope(envelope: Any) -> None:
    _verify(canonical_json(envelope))


# --- device request signatures (protocol.device_auth): DeviceAuthError / PublicKeyError -------

DEVICE_KEY = Ed25519PrivateKey.generate()
DEVICE_PUB = bytes.fromhex(public_key_hex(DEVICE_KEY))
HEADER = sign_request(DEVICE_KEY, "dev-7", "GET", "/v1/device", 1_700_000_000)


def _keys(device_id: str) -> bytes | None:
    return DEVICE_PUB if device_id == "dev-7" else None


@fuzz()
@given(
    header=st.text(max_size=200)
    | byte_edits(HEADER.encode()).map(lambda b: b.decode("latin-1"))
    | st.sampled_from([HEADER]),
    method=st.sampled_from(["GET", "POST", "get"]),
    path=st.sampled_from(["/v1/device", "/v1/device?x=1", "/"]),
    # the server's own clock: any finite time
    now=st.sampled_from([1_700_000_000.0, 1_700_000_400.0])
    | st.floats(allow_nan=False, allow_infinity=False),
)
def test_fuzz_device_auth_header(header: str, method: str, path: str, now: float) -> None:
    try:
        device = verify_request(header, _keys, method, path, now)
    except DeviceAuthError:
        return
    assert device == "dev-7"
    assert parse_header(header).device_id == device
    # the method is signed upper-cased (HTTP servers read it so)
    assert (method.upper(), path) == ("GET", "/v1/device") and abs(now - 1_700_000_000) <= 300


PEM_PUB = public_key_hex(DEVICE_KEY)


@fuzz()
@given(text=st.text(max_size=200) | byte_edits(PEM_PUB.encode()).map(lambda b: b.decode("latin-1")))
def test_fuzz_public_key(text: str) -> None:
    try:
        raw = load_public_key(text)
    except PublicKeyError:
        return
    assert len(raw) == 32


# --- the release manifest: bundle.json, target custom metadata, reference, golden ------------

BUNDLE = Path(__file__).resolve().parents[2] / "models" / "bundles" / "pdm-classifier" / "1"
BUNDLE_JSON = (BUNDLE / "bundle.json").read_bytes()
BUNDLE_DOC = json.loads(BUNDLE_JSON)
META = parse_bundle(BUNDLE_JSON)


@fuzz()
@given(doc=mutated(BUNDLE_DOC) | any_json)
def test_fuzz_manifest(doc: Any) -> None:
    try:
        meta = parse_bundle(_json_bytes(doc))
    except BundleError:
        return
    assert parse_bundle(meta.to_json()) == meta


@fuzz()
@given(data=byte_edits(BUNDLE_JSON) | st.binary(max_size=400))
def test_fuzz_manifest_bytes(data: bytes) -> None:
    try:
        parse_bundle(data)
    except BundleError:
        return


@fuzz()
@given(file=st.sampled_from(sorted(META.files)), data=st.data())
def test_fuzz_manifest_file_check(file: str, data: st.DataObject) -> None:
    """Any change to any file the manifest lists fails the check."""
    original = (BUNDLE / file).read_bytes()
    check_file(META, file, original)
    changed = data.draw(byte_edits(original[:4096]).map(lambda b: b + original[4096:]))
    with pytest.raises(BundleError):
        check_file(META, file, changed)


CUSTOM = artifact_custom(META, META.artifacts[0])


@fuzz()
@given(custom=mutated(CUSTOM) | any_json)
def test_fuzz_target_custom(custom: Any) -> None:
    try:
        target = parse_artifact_custom(custom)
    except ReleaseTargetError:
        return
    assert target.model and target.version >= 1


REFERENCE_DOC = json.loads((BUNDLE / META.reference_profile).read_bytes())


@fuzz()
@given(doc=mutated(REFERENCE_DOC) | any_json)
def test_fuzz_reference_profile(doc: Any) -> None:
    try:
        ref = ReferenceProfile.from_json(_json_bytes(doc))
    except ReferenceProfileError:
        return
    assert ReferenceProfile.from_json(ref.to_json()) == ref


GOLDEN_DOC = json.loads((BUNDLE / META.artifacts[0].golden).read_bytes())
# a few rows keep each case fast; the structure is what is fuzzed
GOLDEN_DOC = {
    **GOLDEN_DOC,
    "inputs": GOLDEN_DOC["inputs"][:3],
    "expected": GOLDEN_DOC["expected"][:3],
}


@fuzz()
@given(doc=mutated(GOLDEN_DOC) | any_json)
def test_fuzz_golden_set(doc: Any) -> None:
    try:
        golden = GoldenSet.from_json(_json_bytes(doc))
    except GoldenSetError:
        return
    again = GoldenSet.from_json(golden.to_json())
    assert np.array_equal(again.inputs, golden.inputs)
    assert np.array_equal(again.expected, golden.expected)


def test_the_valid_seeds_parse() -> None:
    """The mutations start from valid documents (else the fuzzing only tests the first check)."""
    for kind, doc in VALID.items():
        assert parse_message(device_topic(DEVICE, kind), json.dumps(doc).encode()).seq == 7
    assert DriftSummary.from_dict(DRIFT_DOC) == DRIFT
    assert verify_desired(WIRE, ROOT, NOW) == DOC
    assert replace(DOC, serial=13) != DOC
    assert verify_request(HEADER, _keys, "GET", "/v1/device", 1_700_000_000) == "dev-7"
    assert parse_bundle(_json_bytes(BUNDLE_DOC)) == META
    assert parse_artifact_custom(CUSTOM).version == META.version
    ReferenceProfile.from_json(_json_bytes(REFERENCE_DOC))
    GoldenSet.from_json(_json_bytes(GOLDEN_DOC))
