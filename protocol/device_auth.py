"""Device request signatures: how a device proves who it is to the fleet's HTTP endpoints.

A device holds an Ed25519 key pair made at provisioning; the fleet registered the public key at
enrollment. For every HTTP request (TUF metadata and model downloads) the device sends::

    Authorization: Edgefleet-Ed25519 device=<device id>,ts=<unix seconds>,sig=<base64url>

where ``sig`` signs :func:`signing_payload`: a context string, the device id, the upper-case
method, the request target (the path exactly as sent on the wire, percent-encoding included,
plus ``?query`` if there is one) and the timestamp. A signature is therefore useless for another
path, method or device, and the server refuses timestamps more than ``max_skew`` seconds from
its own clock (default 5 minutes), which bounds replay of a captured header to that window for
the same request; TLS keeps headers from being captured in the first place.

Pure: takes strings, keys and ``now`` (unix seconds) and returns values or raises
:class:`DeviceAuthError`. It does not look devices up (the caller passes ``public_key_for``),
does not read key files and knows nothing of HTTP frameworks.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_public_key,
)

from protocol.errors import ProtocolError

SCHEME = "Edgefleet-Ed25519"
HEADER = "Authorization"
CONTEXT = b"edgefleet-device-auth-v1"
DEFAULT_MAX_SKEW = 300.0
_DEVICE_ID = re.compile(r"[a-z0-9-]{1,64}")
_HEADER = re.compile(
    rf"{re.escape(SCHEME)} device=(?P<device>[^,\s]+),ts=(?P<ts>[0-9]{{1,12}}),"
    r"sig=(?P<sig>[A-Za-z0-9_-]{86})"
)
_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")


class DeviceAuthFailure(StrEnum):
    MALFORMED = "malformed"
    UNKNOWN_DEVICE = "unknown_device"
    STALE = "stale"
    BAD_SIGNATURE = "bad_signature"


class DeviceAuthError(ProtocolError):
    """A device request signature is refused; ``reason`` is a :class:`DeviceAuthFailure`."""

    def __init__(self, reason: DeviceAuthFailure, message: str) -> None:
        self.reason = reason
        self.detail = message
        super().__init__(f"device authentication refused ({reason}): {message}")

    def __reduce__(self) -> tuple[type[DeviceAuthError], tuple[DeviceAuthFailure, str]]:
        return (type(self), (self.reason, self.detail))


class PublicKeyError(ProtocolError):
    """A text is not an Ed25519 public key in raw hex or PEM form."""


@dataclass(frozen=True)
class DeviceAuthHeader:
    device_id: str
    timestamp: int
    signature: bytes


def signing_payload(device_id: str, method: str, path: str, timestamp: int) -> bytes:
    """The exact bytes a device signs for one request."""
    if not path.startswith("/"):
        raise ValueError(f"the request target must start with '/', got {path!r}")
    fields = (device_id, method.upper(), path, str(int(timestamp)))
    return CONTEXT + b"\n" + "\n".join(fields).encode("utf-8")


def sign_request(
    private_key: Ed25519PrivateKey, device_id: str, method: str, path: str, now: float
) -> str:
    """The ``Authorization`` header value for one request made at ``now`` (unix seconds)."""
    if not _DEVICE_ID.fullmatch(device_id):
        raise ValueError(f"device id {device_id!r} is not valid ([a-z0-9-]{{1,64}})")
    ts = int(now)
    sig = private_key.sign(signing_payload(device_id, method, path, ts))
    return f"{SCHEME} device={device_id},ts={ts},sig={_b64(sig)}"


def parse_header(value: str) -> DeviceAuthHeader:
    """Split a header value into its fields; :class:`DeviceAuthError` (malformed) if it is not
    exactly the form :func:`sign_request` writes."""
    match = _HEADER.fullmatch(value.strip())
    if not match or not _DEVICE_ID.fullmatch(match.group("device")):
        raise DeviceAuthError(
            DeviceAuthFailure.MALFORMED,
            f"expected `{HEADER}: {SCHEME} device=<id>,ts=<unix seconds>,sig=<base64url>` "
            "(protocol.device_auth.sign_request writes it)",
        )
    try:
        sig = base64.urlsafe_b64decode(match.group("sig") + "==")
    except (binascii.Error, ValueError):
        sig = b""
    # one spelling per signature: the last character's unused bits must be zero
    if len(sig) != 64 or _b64(sig) != match.group("sig"):
        raise DeviceAuthError(DeviceAuthFailure.MALFORMED, "sig is not canonical base64url")
    return DeviceAuthHeader(match.group("device"), int(match.group("ts")), sig)


def verify_request(
    header: str,
    public_key_for: Callable[[str], bytes | None],
    method: str,
    path: str,
    now: float,
    max_skew: float = DEFAULT_MAX_SKEW,
) -> str:
    """Check a request's header; return the authenticated device id.

    ``public_key_for(device_id)`` returns the device's raw 32-byte public key, or None when the
    device is unknown. Raises :class:`DeviceAuthError` with the reason otherwise.
    """
    parsed = parse_header(header)
    if abs(now - parsed.timestamp) > max_skew:
        raise DeviceAuthError(
            DeviceAuthFailure.STALE,
            f"the request timestamp {parsed.timestamp} is more than {max_skew:.0f}s from the "
            f"server's clock ({int(now)}); sync the device clock (NTP) and sign each request anew",
        )
    raw = public_key_for(parsed.device_id)
    if raw is None:
        raise DeviceAuthError(
            DeviceAuthFailure.UNKNOWN_DEVICE,
            f"device {parsed.device_id} is not enrolled; enroll it (`edge-agent provision`)",
        )
    try:
        Ed25519PublicKey.from_public_bytes(raw).verify(
            parsed.signature, signing_payload(parsed.device_id, method, path, parsed.timestamp)
        )
    except (InvalidSignature, ValueError):
        raise DeviceAuthError(
            DeviceAuthFailure.BAD_SIGNATURE,
            "the signature does not match this device's key, method and path; sign the exact "
            "request target with the key made at enrollment",
        ) from None
    return parsed.device_id


def load_public_key(text: str) -> bytes:
    """An Ed25519 public key given as 64 hex digits (raw 32 bytes) or PEM
    (SubjectPublicKeyInfo); returns the raw 32 bytes."""
    text = text.strip()
    if _HEX_KEY.fullmatch(text):
        raw = bytes.fromhex(text)
        try:
            Ed25519PublicKey.from_public_bytes(raw)
        except ValueError as exc:
            raise PublicKeyError(f"not an Ed25519 public key: {exc}") from None
        return raw
    if text.startswith("-----BEGIN PUBLIC KEY-----"):
        try:
            key = load_pem_public_key(text.encode("ascii"))
        except (ValueError, UnsupportedAlgorithm, UnicodeEncodeError) as exc:
            raise PublicKeyError(f"the PEM public key cannot be read: {exc}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise PublicKeyError(
                f"the PEM public key is {type(key).__name__.removeprefix('_')}, not Ed25519; "
                "generate the device key with Ed25519"
            )
        return key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    raise PublicKeyError(
        "the public key must be an Ed25519 key as 64 hex digits (raw 32 bytes) or a PEM "
        "`-----BEGIN PUBLIC KEY-----` block"
    )


def public_key_hex(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """The raw public key as 64 hex digits (what enrollment sends and stores)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")
