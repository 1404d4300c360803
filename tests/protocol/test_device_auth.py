"""Device request signatures: what verifies, and every way a header is refused."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.device_auth import (
    SCHEME,
    DeviceAuthError,
    DeviceAuthFailure,
    PublicKeyError,
    load_public_key,
    parse_header,
    public_key_hex,
    sign_request,
    signing_payload,
    verify_request,
)

NOW = 1_900_000_000.0
KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()
DEVICE = "dev-0123456789ab"
PATH = "/tuf/metadata/timestamp.json"


def keys(device_id: str) -> bytes | None:
    return {
        DEVICE: bytes.fromhex(public_key_hex(KEY)),
        "dev-other": bytes.fromhex(public_key_hex(OTHER)),
    }.get(device_id)


def refused(
    header: str, method: str = "GET", path: str = PATH, now: float = NOW
) -> DeviceAuthFailure:
    with pytest.raises(DeviceAuthError) as err:
        verify_request(header, keys, method, path, now)
    return err.value.reason


def test_a_signed_request_verifies() -> None:
    header = sign_request(KEY, DEVICE, "get", PATH, NOW)
    assert header.startswith(f"{SCHEME} device={DEVICE},ts={int(NOW)},sig=")
    assert verify_request(header, keys, "GET", PATH, NOW) == DEVICE
    # within the allowed skew, either way
    assert verify_request(header, keys, "GET", PATH, NOW + 300) == DEVICE
    assert verify_request(header, keys, "GET", PATH, NOW - 300) == DEVICE


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/tuf/metadata/1.root.json"),  # another path
        ("GET", PATH + "?x=1"),  # the query is part of the target
        ("GET", "/tuf/metadata/timestamp%2Ejson"),  # the raw target, not a decoded one
        ("POST", PATH),  # another method
        ("HEAD", PATH),
    ],
)
def test_a_signature_is_for_one_method_and_target(method: str, path: str) -> None:
    header = sign_request(KEY, DEVICE, "GET", PATH, NOW)
    assert refused(header, method, path) is DeviceAuthFailure.BAD_SIGNATURE


@pytest.mark.parametrize("offset", [-301, 301, -86_400, 10**6])
def test_an_old_or_future_timestamp_is_refused(offset: float) -> None:
    header = sign_request(KEY, DEVICE, "GET", PATH, NOW + offset)
    assert refused(header) is DeviceAuthFailure.STALE


def test_another_devices_key_is_refused() -> None:
    # signed with the other device's key but claiming to be DEVICE
    assert refused(sign_request(OTHER, DEVICE, "GET", PATH, NOW)) is DeviceAuthFailure.BAD_SIGNATURE
    # a genuine signature of dev-other, relabelled as DEVICE
    header = sign_request(OTHER, "dev-other", "GET", PATH, NOW).replace("dev-other", DEVICE)
    assert refused(header) is DeviceAuthFailure.BAD_SIGNATURE


def test_an_unknown_device_is_refused() -> None:
    header = sign_request(KEY, "dev-unknown", "GET", PATH, NOW)
    assert refused(header) is DeviceAuthFailure.UNKNOWN_DEVICE


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_flipped_signature_byte_is_refused(data: st.DataObject) -> None:
    header = sign_request(KEY, DEVICE, "GET", PATH, NOW)
    sig = bytearray(parse_header(header).signature)
    index = data.draw(st.integers(0, len(sig) - 1))
    sig[index] ^= data.draw(st.integers(1, 255))
    forged = (
        header.rsplit("sig=", 1)[0] + "sig=" + base64.urlsafe_b64encode(sig).rstrip(b"=").decode()
    )
    assert refused(forged) is DeviceAuthFailure.BAD_SIGNATURE


def test_a_non_canonical_signature_encoding_is_refused() -> None:
    header = sign_request(KEY, DEVICE, "GET", PATH, NOW)
    text = header.rsplit("sig=", 1)[1]
    # the last character of 86 carries 2 unused bits: set one, the bytes decode the same
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = text[:-1] + alphabet[alphabet.index(text[-1]) ^ 1]
    assert base64.urlsafe_b64decode(twin + "==") == base64.urlsafe_b64decode(text + "==")
    assert refused(header.replace(text, twin)) is DeviceAuthFailure.MALFORMED


@pytest.mark.parametrize(
    "header",
    [
        "",
        "Bearer efo_abc",
        f"{SCHEME} device={DEVICE},ts={int(NOW)}",
        f"{SCHEME} device={DEVICE},ts=soon,sig=" + "A" * 86,
        f"{SCHEME} device=DEV-UPPER,ts={int(NOW)},sig=" + "A" * 86,
        f"{SCHEME} device={DEVICE},ts={int(NOW)},sig=" + "A" * 85,
        f"{SCHEME} ts={int(NOW)},device={DEVICE},sig=" + "A" * 86,
    ],
)
def test_malformed_headers_are_refused_with_the_expected_form(header: str) -> None:
    with pytest.raises(DeviceAuthError) as err:
        verify_request(header, keys, "GET", PATH, NOW)
    assert err.value.reason is DeviceAuthFailure.MALFORMED
    assert "device=" in str(err.value)


def test_the_payload_binds_every_field() -> None:
    base = signing_payload(DEVICE, "GET", PATH, 1)
    assert base.startswith(b"edgefleet-device-auth-v1\n")
    variants = [
        signing_payload("dev-x", "GET", PATH, 1),
        signing_payload(DEVICE, "PUT", PATH, 1),
        signing_payload(DEVICE, "GET", PATH + "x", 1),
        signing_payload(DEVICE, "GET", PATH, 2),
    ]
    assert len({base, *variants}) == 5
    with pytest.raises(ValueError, match="must start with '/'"):
        signing_payload(DEVICE, "GET", "tuf/x", 1)


def test_errors_survive_pickling() -> None:
    import pickle

    err = DeviceAuthError(DeviceAuthFailure.STALE, "late")
    back = pickle.loads(pickle.dumps(err))
    assert (back.reason, back.detail, str(back)) == (err.reason, err.detail, str(err))


# --- public keys ------------------------------------------------------------------------------


def test_public_keys_load_from_hex_and_pem() -> None:
    raw_hex = public_key_hex(KEY)
    pem = KEY.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    assert load_public_key(raw_hex).hex() == raw_hex
    assert load_public_key(raw_hex.upper()).hex() == raw_hex
    assert load_public_key(f"  {pem}\n").hex() == raw_hex


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("ab" * 31, "64 hex digits"),
        ("ab" * 33, "64 hex digits"),
        ("", "64 hex digits"),
        ("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n", "cannot be read"),
        (
            ec.generate_private_key(ec.SECP256R1())
            .public_key()
            .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
            .decode(),
            "not Ed25519",
        ),
    ],
)
def test_bad_public_keys_say_what_is_expected(text: str, expect: str) -> None:
    with pytest.raises(PublicKeyError, match=expect):
        load_public_key(text)
