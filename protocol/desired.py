"""The signed per-device desired document: which release a device should run.

The fleet publishes one per device (retained, on ``edgefleet/v1/devices/{id}/desired``). It names
the TUF target path and model version the device should install — or, with ``rollback``, the
older release it must return to —, a serial that grows strictly per device (the agent refuses a
replayed older document) and an expiry (the agent refuses a stale one). It is signed by a key of
the TUF ``targets`` role, and checked against that role's keys and threshold *as the device's
trusted root lists them*, so a key revoked by a newer root version no longer verifies.

Wire form (canonical JSON, :mod:`protocol.canonical`; no whitespace, so every byte counts)::

    {"signatures":[{"keyid":"<hex>","sig":"<hex>"}],"signed":{"_type":"edgefleet-desired/1",...}}

The signature covers the canonical JSON of ``signed``. :func:`verify_desired` refuses anything
that is not exactly the canonical encoding of a well-formed envelope, so any changed byte fails
with :class:`~protocol.errors.DesiredDocumentError` and never another exception type.

This module signs and checks documents; it does not remember the last serial a device accepted
(the agent's state store does and passes it in), does not compare the model version with the
installed one (the update state machine does), and does no I/O. ``now`` is passed in.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, NoReturn

from securesystemslib.exceptions import Error as SslibError
from securesystemslib.signer import Signature, Signer
from tuf.api.exceptions import RepositoryError
from tuf.api.metadata import Metadata, Root, Targets

from protocol.canonical import canonical_json
from protocol.errors import DesiredDocumentError, ProtocolError
from protocol.release import release_prefix

FORMAT = "edgefleet-desired/1"
MAX_WIRE_BYTES = 64 * 1024
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_TIME_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
_HEX_RE = re.compile(r"(?:[0-9a-f]{2})+")
_SIGNED_FIELDS = frozenset(
    {
        "_type",
        "device_id",
        "serial",
        "issued_at",
        "expires",
        "model",
        "model_version",
        "target_path",
        "rollback",
        "rollout_id",
    }
)


class DesiredFailure(StrEnum):
    """Why a desired document was refused (``DesiredDocumentError.reason``)."""

    MALFORMED = "malformed"  # not a well-formed, canonical desired document
    BAD_SIGNATURE = "bad_signature"  # not signed by a threshold of the targets role's keys
    EXPIRED = "expired"
    REPLAYED = "replayed"  # serial not above the last accepted one
    WRONG_DEVICE = "wrong_device"
    BAD_ROOT = "bad_root"  # the trusted root handed in is not a valid root


def _fail(reason: DesiredFailure, message: str) -> NoReturn:
    raise DesiredDocumentError(reason.value, message)


def _utc(value: datetime, name: str) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None:
        _fail(DesiredFailure.MALFORMED, f"{name} must be a timezone-aware datetime")
    return value.astimezone(UTC).replace(microsecond=0)


def _format_time(value: datetime) -> str:
    return value.strftime(_TIME_FORMAT)


def _parse_time(value: Any, name: str) -> datetime:
    if not isinstance(value, str) or not _TIME_RE.fullmatch(value):
        _fail(DesiredFailure.MALFORMED, f"{name} must be a UTC time like 2025-01-31T12:00:00Z")
    try:
        return datetime.strptime(value, _TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        _fail(DesiredFailure.MALFORMED, f"{name} {value!r} is not a valid date and time")


@dataclass(frozen=True)
class DesiredDocument:
    """What one device should run. Times are normalised to whole seconds in UTC."""

    device_id: str
    serial: int  # strictly growing per device; the agent refuses serial <= last accepted
    issued_at: datetime
    expires: datetime
    model: str
    model_version: int
    target_path: str  # the TUF target of the artifact for this device's profile
    rollback: bool = False  # an explicit, signed order to go back to an older version
    rollout_id: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "issued_at", _utc(self.issued_at, "issued_at"))
        object.__setattr__(self, "expires", _utc(self.expires, "expires"))
        for name in ("device_id", "model", "target_path"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                _fail(DesiredFailure.MALFORMED, f"{name} must be a non-empty string")
        for name in ("serial", "model_version"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                _fail(DesiredFailure.MALFORMED, f"{name} must be a positive integer, not {value!r}")
        if not isinstance(self.rollback, bool):
            _fail(DesiredFailure.MALFORMED, "rollback must be true or false")
        if self.rollout_id is not None and (
            not isinstance(self.rollout_id, str) or not self.rollout_id
        ):
            _fail(DesiredFailure.MALFORMED, "rollout_id must be a non-empty string or absent")
        if self.expires <= self.issued_at:
            _fail(DesiredFailure.MALFORMED, "expires must be later than issued_at")
        try:
            prefix = release_prefix(self.model, self.model_version)
        except ProtocolError as exc:
            _fail(DesiredFailure.MALFORMED, str(exc))
        rest = self.target_path[len(prefix) :]
        if not self.target_path.startswith(prefix) or not rest or ".." in rest.split("/"):
            _fail(
                DesiredFailure.MALFORMED,
                f"target_path {self.target_path!r} is not a file of release {prefix!r}",
            )

    def to_dict(self) -> dict[str, Any]:
        """The ``signed`` part of the wire form (canonical-JSON safe)."""
        doc: dict[str, Any] = {
            "_type": FORMAT,
            "device_id": self.device_id,
            "serial": self.serial,
            "issued_at": _format_time(self.issued_at),
            "expires": _format_time(self.expires),
            "model": self.model,
            "model_version": self.model_version,
            "target_path": self.target_path,
            "rollback": self.rollback,
        }
        if self.rollout_id is not None:
            doc["rollout_id"] = self.rollout_id
        return doc

    @classmethod
    def from_dict(cls, doc: Any) -> DesiredDocument:
        """Parse the ``signed`` part; :class:`DesiredDocumentError` (malformed) if it is not."""
        if not isinstance(doc, Mapping) or doc.get("_type") != FORMAT:
            _fail(DesiredFailure.MALFORMED, f"the signed part is not an {FORMAT} document")
        unknown = set(doc) - _SIGNED_FIELDS
        if unknown:
            _fail(DesiredFailure.MALFORMED, f"unknown fields {sorted(unknown)}")
        missing = _SIGNED_FIELDS - {"rollout_id"} - set(doc)
        if missing:
            _fail(DesiredFailure.MALFORMED, f"missing fields {sorted(missing)}")
        return cls(
            device_id=doc["device_id"],
            serial=doc["serial"],
            issued_at=_parse_time(doc["issued_at"], "issued_at"),
            expires=_parse_time(doc["expires"], "expires"),
            model=doc["model"],
            model_version=doc["model_version"],
            target_path=doc["target_path"],
            rollback=doc["rollback"],
            rollout_id=doc.get("rollout_id"),
        )


def signed_bytes(doc: DesiredDocument) -> bytes:
    """The bytes a signature covers: canonical JSON of the ``signed`` part."""
    return canonical_json(doc.to_dict())


def sign_desired(doc: DesiredDocument, signers: Signer | Sequence[Signer]) -> bytes:
    """The wire form of ``doc`` signed by ``signers`` (keys of the ``targets`` role)."""
    signer_list = [signers] if isinstance(signers, Signer) else list(signers)
    if not signer_list:
        raise ValueError("sign_desired needs at least one signer")
    payload = signed_bytes(doc)
    signatures = {}
    for signer in signer_list:
        sig = signer.sign(payload)
        signatures[sig.keyid] = {"keyid": sig.keyid, "sig": sig.signature}
    return canonical_json(
        {"signed": doc.to_dict(), "signatures": [signatures[k] for k in sorted(signatures)]}
    )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key in JSON object")
    return out


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not allowed")


def _reject_float(text: str) -> NoReturn:
    raise ValueError(f"float {text} is not allowed")


def _parse_envelope(wire: bytes) -> tuple[Mapping[str, Any], dict[str, Signature]]:
    if not isinstance(wire, bytes | bytearray | memoryview):
        _fail(DesiredFailure.MALFORMED, f"expected bytes, got {type(wire).__name__}")
    wire = bytes(wire)
    if len(wire) > MAX_WIRE_BYTES:
        _fail(DesiredFailure.MALFORMED, f"{len(wire)} bytes, more than {MAX_WIRE_BYTES}")
    try:
        envelope = json.loads(
            wire.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
            parse_float=_reject_float,
        )
        canonical = canonical_json(envelope)
    except (UnicodeDecodeError, ValueError, RecursionError, ProtocolError) as exc:
        _fail(DesiredFailure.MALFORMED, f"not canonical JSON ({exc})")
    if canonical != wire:
        _fail(DesiredFailure.MALFORMED, "not in canonical JSON form (re-encoding changes it)")
    if not isinstance(envelope, dict) or set(envelope) != {"signed", "signatures"}:
        _fail(DesiredFailure.MALFORMED, "expected an object with 'signed' and 'signatures'")
    raw_sigs = envelope["signatures"]
    if not isinstance(raw_sigs, list) or not raw_sigs:
        _fail(DesiredFailure.MALFORMED, "'signatures' must be a non-empty list")
    signatures: dict[str, Signature] = {}
    for raw in raw_sigs:
        if not isinstance(raw, dict) or set(raw) != {"keyid", "sig"}:
            _fail(DesiredFailure.MALFORMED, "each signature must have exactly 'keyid' and 'sig'")
        keyid, sig = raw["keyid"], raw["sig"]
        # Lower-case hex only: bytes.fromhex() would read "AB" as "ab", a second spelling.
        if not isinstance(keyid, str) or not _HEX_RE.fullmatch(keyid):
            _fail(DesiredFailure.MALFORMED, "a signature's keyid is not lower-case hex")
        if not isinstance(sig, str) or not _HEX_RE.fullmatch(sig):
            _fail(DesiredFailure.MALFORMED, "a signature is not lower-case hex")
        if keyid in signatures:
            _fail(DesiredFailure.MALFORMED, f"two signatures by key {keyid}")
        signatures[keyid] = Signature(keyid, sig)
    signed = envelope["signed"]
    if not isinstance(signed, dict):
        _fail(DesiredFailure.MALFORMED, "'signed' must be an object")
    return signed, signatures


def _load_root(trusted_root: bytes | Root) -> Root:
    if isinstance(trusted_root, Root):
        return trusted_root
    try:
        md = Metadata[Root].from_bytes(bytes(trusted_root))
        root = md.signed
        valid = isinstance(root, Root)
        if valid:
            root.verify_delegate(Root.type, md.signed_bytes, md.signatures)
    except (RepositoryError, SslibError, ValueError, TypeError, KeyError) as exc:
        _fail(
            DesiredFailure.BAD_ROOT,
            f"the trusted root is not valid, self-signed root metadata ({exc}); pass the root "
            "the device's TUF client verified",
        )
    if not valid:
        _fail(DesiredFailure.BAD_ROOT, f"the trusted root is {root.type} metadata, not root")
    return root


def verify_desired(
    wire: bytes,
    trusted_root: bytes | Root,
    now: datetime,
    *,
    device_id: str | None = None,
    last_serial: int | None = None,
) -> DesiredDocument:
    """Check ``wire`` and return the document it carries.

    Checks, in order: canonical well-formed envelope; signatures by a threshold of the
    ``targets`` role's keys in ``trusted_root``; document fields; ``device_id`` (if given);
    expiry against ``now``; ``serial`` above ``last_serial`` (if given). Raises
    :class:`DesiredDocumentError` whose ``reason`` names the failed check.
    """
    if now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    signed, signatures = _parse_envelope(wire)
    root = _load_root(trusted_root)
    try:
        payload = canonical_json(signed)
        result = root.get_verification_result(Targets.type, payload, signatures)
    except (ProtocolError, SslibError, ValueError) as exc:
        _fail(DesiredFailure.BAD_SIGNATURE, f"signature check failed ({exc})")
    if not result.verified:
        role = root.roles[Targets.type]
        _fail(
            DesiredFailure.BAD_SIGNATURE,
            f"{len(result.signed)} of the {role.threshold} required signatures by keys of the "
            f"targets role in root v{root.version} verify (signed by "
            f"{', '.join(k[:8] for k in sorted(signatures))}; trusted targets keys "
            f"{', '.join(k[:8] for k in sorted(role.keyids))}); refresh the TUF metadata or "
            "re-sign the document with the current targets key",
        )
    doc = DesiredDocument.from_dict(signed)
    if device_id is not None and doc.device_id != device_id:
        _fail(
            DesiredFailure.WRONG_DEVICE,
            f"the document is for device {doc.device_id!r}, this is {device_id!r}",
        )
    if now.astimezone(UTC) >= doc.expires:
        _fail(
            DesiredFailure.EXPIRED,
            f"the document expired at {_format_time(doc.expires)} (now "
            f"{_format_time(now.astimezone(UTC))}); the fleet must publish a fresh one",
        )
    if last_serial is not None and doc.serial <= last_serial:
        _fail(
            DesiredFailure.REPLAYED,
            f"serial {doc.serial} is not above the last accepted serial {last_serial}: an "
            "older document was replayed",
        )
    return doc
