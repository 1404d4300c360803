"""Property-based fuzzing of the agent's handling of a desired document it refuses: whatever
bytes arrive on the desired topic, the claim read from them for the refusal's report
(``agent.updater._unverified_claim``) never raises and is always something an ``update`` report
can carry, so no document can keep its refusal from reaching the fleet. (The verification itself,
:func:`protocol.desired.verify_desired`, is fuzzed in ``tests/protocol/test_fuzz.py``; the whole
engine refusing such documents is in ``tests/agent/test_updater.py``.)

CI runs a few hundred cases; ``EDGEFLEET_FUZZ=long`` (``bench/fuzz.py``) runs 10,000.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from securesystemslib.signer import CryptoSigner

from agent.updater import _unverified_claim
from protocol.desired import DesiredDocument, sign_desired
from protocol.messages import MAX_SEQ, ModelRef, UpdateBody

LONG = os.environ.get("EDGEFLEET_FUZZ") == "long"
NOW = datetime(2025, 3, 1, tzinfo=UTC)
WIRE = sign_desired(
    DesiredDocument(
        device_id="dev-7",
        serial=12,
        issued_at=NOW,
        expires=NOW + timedelta(hours=1),
        model="pdm",
        model_version=3,
        target_path="pdm/3/model.int8.onnx",
        rollback=False,
    ),
    CryptoSigner.generate_ed25519(),
)
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats()
    | st.text(max_size=300),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
signed = st.fixed_dictionaries(
    {},
    optional={k: values for k in ("model", "model_version", "rollback", "serial", "device_id")},
)


@st.composite
def edited(draw: st.DrawFn, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(out) - 1))
        out[i : i + draw(st.integers(0, 3))] = draw(st.binary(max_size=4))
    return bytes(out)


wires = (
    edited(WIRE)
    | st.binary(max_size=300)
    | signed.map(lambda s: json.dumps({"signed": s, "signatures": []}).encode())
    | values.map(lambda v: json.dumps({"signed": v}).encode())
)


@settings(
    max_examples=10_000 if LONG else 300,
    deadline=None,
    derandomize=not LONG,  # CI runs the same cases every time; the long run explores
    suppress_health_check=[HealthCheck.too_slow],
)
@given(wire=wires)
def test_fuzz_refused_document_claim(wire: bytes) -> None:
    model, version, rollback, serial = _unverified_claim(wire)
    assert 0 <= version <= MAX_SEQ and 0 <= serial <= MAX_SEQ and isinstance(rollback, bool)
    report: Any = UpdateBody(
        release=ModelRef(model, version),
        rollback=rollback,
        from_state="idle",
        to_state="failed",
        attempt=1,
        reason="bad_signature: refused",
        elapsed_s={},
    )
    assert report.release.name == model


def test_a_valid_documents_claim_is_read() -> None:
    assert _unverified_claim(WIRE) == ("pdm", 3, False, 12)
