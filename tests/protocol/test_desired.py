"""The signed desired document: signing, verification against a TUF root, every refusal."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root
from tuf.api.serialization.json import JSONSerializer

from protocol.canonical import canonical_json
from protocol.desired import (
    DesiredDocument,
    DesiredFailure,
    sign_desired,
    signed_bytes,
    verify_desired,
)
from protocol.errors import DesiredDocumentError

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
ROOT_KEY = CryptoSigner.generate_ed25519()
TARGETS_KEY = CryptoSigner.generate_ed25519()
OTHER_KEY = CryptoSigner.generate_ed25519()


def _root(targets_keys: list[CryptoSigner], threshold: int = 1, version: int = 1) -> Metadata[Root]:
    root = Root(version=version, expires=NOW + timedelta(days=365), consistent_snapshot=True)
    root.add_key(ROOT_KEY.public_key, "root")
    for key in targets_keys:
        root.add_key(key.public_key, "targets")
    root.roles["targets"].threshold = threshold
    for role in ("snapshot", "timestamp"):
        root.add_key(OTHER_KEY.public_key, role)
    md = Metadata(root)
    md.sign(ROOT_KEY)
    return md


ROOT_V1 = _root([TARGETS_KEY])
ROOT_BYTES = ROOT_V1.to_bytes(JSONSerializer(compact=True))


def _doc(**changes: object) -> DesiredDocument:
    doc = DesiredDocument(
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
    return replace(doc, **changes)  # type: ignore[arg-type]


def _reason(exc: pytest.ExceptionInfo[DesiredDocumentError]) -> str:
    return exc.value.reason


def test_round_trip_with_root_bytes_and_root_object() -> None:
    doc = _doc()
    wire = sign_desired(doc, TARGETS_KEY)
    assert verify_desired(wire, ROOT_BYTES, NOW) == doc
    assert verify_desired(wire, ROOT_V1.signed, NOW, device_id="dev-7", last_serial=11) == doc


def test_optional_rollout_id_and_rollback_round_trip() -> None:
    doc = _doc(rollout_id=None, rollback=True, model_version=2, target_path="pdm/2/m.tflite")
    assert verify_desired(sign_desired(doc, TARGETS_KEY), ROOT_BYTES, NOW) == doc
    assert "rollout_id" not in doc.to_dict()


def test_times_are_normalised_to_whole_utc_seconds() -> None:
    local = datetime(2025, 3, 1, 13, 0, 0, 999, tzinfo=UTC).astimezone()
    doc = _doc(issued_at=local)
    assert doc.issued_at == datetime(2025, 3, 1, 13, 0, 0, tzinfo=UTC)
    wire = sign_desired(doc, TARGETS_KEY)
    assert verify_desired(wire, ROOT_BYTES, NOW) == doc


def test_wire_form_is_canonical_json() -> None:
    wire = sign_desired(_doc(), TARGETS_KEY)
    assert canonical_json(json.loads(wire)) == wire
    assert b" " not in wire.replace(b"r-1", b"")


# --- refusals ---------------------------------------------------------------------------------


def test_signature_by_an_unknown_key_is_refused() -> None:
    with pytest.raises(DesiredDocumentError) as err:
        verify_desired(sign_desired(_doc(), OTHER_KEY), ROOT_BYTES, NOW)
    assert _reason(err) == DesiredFailure.BAD_SIGNATURE
    assert "targets role in root v1" in str(err.value)


@pytest.mark.parametrize("signer", ["device", "root", "timestamp"])
def test_signature_by_a_key_that_is_not_a_release_key_is_refused(signer: str) -> None:
    """A device's own key (made at provisioning, as :mod:`agent.provision` does) or a key of
    another role in the very root the device trusts cannot sign a desired document: only the
    targets role's keys release models."""
    device_key = CryptoSigner(Ed25519PrivateKey.generate())
    key = {"device": device_key, "root": ROOT_KEY, "timestamp": OTHER_KEY}[signer]
    with pytest.raises(DesiredDocumentError) as err:
        verify_desired(sign_desired(_doc(), key), ROOT_BYTES, NOW, device_id="dev-7")
    assert _reason(err) == DesiredFailure.BAD_SIGNATURE
    assert key.public_key.keyid[:8] in str(err.value)  # says who signed, and who may


def test_key_revoked_by_a_newer_root_is_refused() -> None:
    new_key = CryptoSigner.generate_ed25519()
    root_v2 = _root([new_key], version=2).signed
    old_wire = sign_desired(_doc(), TARGETS_KEY)
    assert verify_desired(old_wire, ROOT_BYTES, NOW)
    with pytest.raises(DesiredDocumentError) as err:
        verify_desired(old_wire, root_v2, NOW)
    assert _reason(err) == DesiredFailure.BAD_SIGNATURE
    assert verify_desired(sign_desired(_doc(), new_key), root_v2, NOW) == _doc()


def test_threshold_of_two_needs_two_signatures() -> None:
    second = CryptoSigner.generate_ed25519()
    root = _root([TARGETS_KEY, second], threshold=2).signed
    with pytest.raises(DesiredDocumentError) as err:
        verify_desired(sign_desired(_doc(), TARGETS_KEY), root, NOW)
    assert _reason(err) == DesiredFailure.BAD_SIGNATURE
    assert "1 of the 2 required" in str(err.value)
    assert verify_desired(sign_desired(_doc(), [TARGETS_KEY, second]), root, NOW) == _doc()


def test_same_signature_twice_does_not_count_twice() -> None:
    second = CryptoSigner.generate_ed25519()
    root = _root([TARGETS_KEY, second], threshold=2).signed
    envelope = json.loads(sign_desired(_doc(), TARGETS_KEY))
    envelope["signatures"] = envelope["signatures"] * 2
    with pytest.raises(DesiredDocumentError) as err:
        verify_desired(canonical_json(envelope), root, NOW)
    assert _reason(err) == DesiredFailure.MALFORMED


def test_expired_document_is_refused() -> None:
    wire = sign_desired(_doc(), TARGETS_KEY)
    assert verify_desired(wire, ROOT_BYTES, NOW + timedelta(hours=5, minutes=59))
    with pytest.raises(DesiredDocumentError) as err:
        verify_desired(wire, ROOT_BYTES, NOW + timedelta(hours=6))
    assert _reason(err) == DesiredFailure.EXPIRED


@pytest.mark.parametrize("last_serial", [12, 13, 100])
def test_replayed_older_document_is_refused(last_serial: int) -> None:
    wire = sign_desired(_doc(serial=12), TARGETS_KEY)
    with pytest.raises(DesiredDocumentError) as err:
        verify_desired(wire, ROOT_BYTES, NOW, last_serial=last_serial)
    assert _reason(err) == DesiredFailure.REPLAYED


def test_document_for_another_device_is_refused() -> None:
    wire = sign_desired(_doc(), TARGETS_KEY)
    with pytest.raises(DesiredDocumentError) as err:
        verify_desired(wire, ROOT_BYTES, NOW, device_id="dev-8")
    assert _reason(err) == DesiredFailure.WRONG_DEVICE


@pytest.mark.parametrize(
    "root",
    [b"", b"{}", b"not json", ROOT_BYTES.replace(b'"version":1', b'"version":2')],
    ids=["empty", "empty-object", "garbage", "tampered"],
)
def test_invalid_trusted_root_is_refused(root: bytes) -> None:
    with pytest.raises(DesiredDocumentError) as err:
        verify_desired(sign_desired(_doc(), TARGETS_KEY), root, NOW)
    assert _reason(err) == DesiredFailure.BAD_ROOT


def test_pretty_printed_wire_is_refused() -> None:
    pretty = json.dumps(json.loads(sign_desired(_doc(), TARGETS_KEY)), indent=1).encode()
    with pytest.raises(DesiredDocumentError) as err:
        verify_desired(pretty, ROOT_BYTES, NOW)
    assert _reason(err) == DesiredFailure.MALFORMED


def test_upper_case_signature_hex_is_refused() -> None:
    envelope = json.loads(sign_desired(_doc(), TARGETS_KEY))
    envelope["signatures"][0]["sig"] = envelope["signatures"][0]["sig"].upper()
    with pytest.raises(DesiredDocumentError) as err:
        verify_desired(canonical_json(envelope), ROOT_BYTES, NOW)
    assert _reason(err) == DesiredFailure.MALFORMED


@pytest.mark.parametrize(
    "changes",
    [
        {"target_path": "other/3/model.onnx"},
        {"target_path": "pdm/2/model.onnx"},
        {"target_path": "pdm/3/"},
        {"target_path": "pdm/3/../4/model.onnx"},
        {"serial": 0},
        {"model_version": True},
        {"device_id": ""},
        {"expires": NOW},
        {"issued_at": datetime(2025, 3, 1)},
        {"rollout_id": ""},
        {"model": "a/b"},
    ],
)
def test_malformed_documents_cannot_be_built(changes: dict[str, object]) -> None:
    with pytest.raises(DesiredDocumentError) as err:
        _doc(**changes)
    assert _reason(err) == DesiredFailure.MALFORMED


def test_signed_but_malformed_document_is_refused_as_malformed() -> None:
    signed = _doc().to_dict() | {"extra": 1}
    sig = TARGETS_KEY.sign(canonical_json(signed))
    wire = canonical_json(
        {"signed": signed, "signatures": [{"keyid": sig.keyid, "sig": sig.signature}]}
    )
    with pytest.raises(DesiredDocumentError) as err:
        verify_desired(wire, ROOT_BYTES, NOW)
    assert _reason(err) == DesiredFailure.MALFORMED
    assert "extra" in str(err.value)


# --- properties -------------------------------------------------------------------------------

_FIELD_CHANGES = st.sampled_from(
    [
        ("device_id", "dev-8"),
        ("serial", 13),
        ("issued_at", "2025-03-01T12:00:01Z"),
        ("expires", "2025-03-01T19:00:00Z"),
        ("model", "pdn"),
        ("model_version", 4),
        ("target_path", "pdm/3/model.int8.tflite"),
        ("rollback", True),
        ("rollout_id", "r-2"),
        ("_type", "edgefleet-desired/2"),
    ]
)


@given(change=_FIELD_CHANGES)
def test_any_single_field_change_breaks_verification(change: tuple[str, object]) -> None:
    envelope = json.loads(sign_desired(_doc(), TARGETS_KEY))
    name, value = change
    envelope["signed"][name] = value
    with pytest.raises(DesiredDocumentError) as err:
        verify_desired(canonical_json(envelope), ROOT_BYTES, NOW)
    assert _reason(err) in (DesiredFailure.BAD_SIGNATURE, DesiredFailure.MALFORMED)


def test_unchanged_envelope_still_verifies_after_reencoding() -> None:
    """The control of the properties: decoding and re-encoding alone breaks nothing."""
    wire = sign_desired(_doc(), TARGETS_KEY)
    assert verify_desired(canonical_json(json.loads(wire)), ROOT_BYTES, NOW) == _doc()


WIRE = sign_desired(_doc(), TARGETS_KEY)


@settings(max_examples=500)
@given(index=st.integers(0, len(WIRE) - 1), value=st.integers(0, 255))
def test_any_byte_change_fails_with_desired_document_error(index: int, value: int) -> None:
    assume(WIRE[index] != value)
    tampered = bytearray(WIRE)
    tampered[index] = value
    with pytest.raises(DesiredDocumentError):
        verify_desired(bytes(tampered), ROOT_BYTES, NOW)


@given(st.binary(max_size=300))
def test_arbitrary_bytes_fail_with_desired_document_error(data: bytes) -> None:
    with pytest.raises(DesiredDocumentError):
        verify_desired(data, ROOT_BYTES, NOW)


def test_signed_bytes_are_what_the_signature_covers() -> None:
    doc = _doc()
    sig = json.loads(sign_desired(doc, TARGETS_KEY))["signatures"][0]
    assert sig["keyid"] == TARGETS_KEY.public_key.keyid
    assert canonical_json(json.loads(signed_bytes(doc))) == signed_bytes(doc)
