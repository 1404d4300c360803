"""Device reports on the wire: the envelope, the typed bodies, encoding and parsing.

Every message a device publishes is one compact JSON object, the **envelope**::

    {"v": 1, "device": "cam-0042", "seq": 1234, "ts": 1718000000.25, "body": {...}}

* ``v``: the envelope schema version, ``1``. Any change to the envelope or to a body (a field
  added, removed or retyped) bumps it; parsers refuse versions they do not know, and refuse
  unknown fields, so a typo never passes silently.
* ``device``: the sender's device id; it must equal the id in the topic.
* ``seq``: the device's sequence number, ``1 <= seq < 2**63``. It comes from one persistent
  counter per device (the agent's outbox), so it survives restarts and is never reused; it is
  increasing in the order reports were made, but not dense (state messages and evicted reports
  leave gaps). The fleet stores each ``(device, seq)`` once, so a redelivered message is
  harmless, and among ``state`` messages the highest ``seq`` is the device's current state.
* ``ts``: when the report was made, seconds since the Unix epoch (UTC), a float.
* ``body``: the report itself; its type is given by the topic (:class:`protocol.topics.TopicKind`):
  ``state`` -> :class:`StateBody`, ``telemetry/heartbeat`` -> :class:`HeartbeatBody`,
  ``telemetry/drift`` -> :class:`protocol.drift.DriftSummary`, ``update`` -> :class:`UpdateBody`.

**Birth and Last Will.** A device publishes a retained ``state`` with ``online: true`` on every
connect, and registers a retained ``state`` with ``online: false`` as its Last Will. The will is
handed to the broker when the connection is opened, so its envelope is built then: for each
connection attempt the device reserves a block of consecutive sequence numbers (8, see
:mod:`agent.mqtt_link`); the birth carries the first, state refreshes on the same connection the
next ones, and the will the last (with the ``ts`` of the attempt). A clean shutdown publishes
that same will payload itself, so a connection ends in at most one offline seq, and the next
connection's block is higher: its birth outranks every earlier will. A device that needs more
refreshes than its block holds ends the connection with a clean DISCONNECT (so the broker drops
that will and the last online state stays retained) and connects again at once: the new birth,
with the current state, takes the first seq of a new, higher block. So the number of refreshes
per connection is not limited, the ``state`` with the highest ``seq`` is always the current one,
and a connection's will always carries the highest seq of that connection.

The body classes live in :mod:`protocol.bodies` and are re-exported here. This module is pure:
it turns values into bytes and bytes into values. It does not publish, subscribe, store or count
anything; the MQTT link (:mod:`agent.mqtt_link`) and the fleet's ingester do that.
:func:`parse_message` raises :class:`MessageRejected` and nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from protocol.bodies import (
    MAX_SEQ,
    UPDATE_STATES,
    ActiveModel,
    HeartbeatBody,
    Latency,
    ModelRef,
    StateBody,
    UpdateBody,
    WireBody,
    kind_name,
    need_fields,
    need_float,
    need_int,
    set_field,
)
from protocol.drift import DriftSummary
from protocol.errors import MessageError, MessageRejected, ProtocolError, TopicError
from protocol.topics import DEVICE_REPORTS, TopicKind, is_device_id, parse_topic

# the bodies are part of this module's public face: the fleet imports everything from here
__all__ = [
    "MAX_MESSAGE_BYTES",
    "MAX_SEQ",
    "UPDATE_STATES",
    "VERSION",
    "ActiveModel",
    "Body",
    "DriftSummary",
    "Envelope",
    "HeartbeatBody",
    "Latency",
    "Message",
    "ModelRef",
    "RejectReason",
    "StateBody",
    "UpdateBody",
    "WireBody",
    "body_type",
    "encode",
    "parse_message",
]

VERSION = 1
# the fleet's default cap on one message; the agent refuses to queue anything larger
MAX_MESSAGE_BYTES = 256 * 1024


class RejectReason(StrEnum):
    """Why :func:`parse_message` dropped a message; one ingestion counter per value."""

    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    SCHEMA = "schema"
    WRONG_DEVICE = "wrong_device"
    UNKNOWN_TOPIC = "unknown_topic"


# the body of each device-report topic
Body = StateBody | HeartbeatBody | DriftSummary | UpdateBody
_BODIES: dict[TopicKind, type] = {
    TopicKind.STATE: StateBody,
    TopicKind.HEARTBEAT: HeartbeatBody,
    TopicKind.DRIFT: DriftSummary,
    TopicKind.UPDATE: UpdateBody,
}


def _parse_drift(doc: Any) -> DriftSummary:
    try:
        return DriftSummary.from_dict(doc)
    except ProtocolError:
        raise
    except Exception as exc:  # the ingester must survive any summary
        # DriftSummary.from_dict raises DriftError only; anything else would be its bug, and a
        # device must not be able to crash the ingester with it
        raise MessageError(
            f"drift summary refused by protocol.drift ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None


_PARSERS: dict[TopicKind, Callable[[Any], Body]] = {
    TopicKind.STATE: StateBody.from_dict,
    TopicKind.HEARTBEAT: HeartbeatBody.from_dict,
    TopicKind.DRIFT: _parse_drift,
    TopicKind.UPDATE: UpdateBody.from_dict,
}


def body_type(kind: TopicKind) -> type:
    """The body class carried on a device-report topic of ``kind``."""
    try:
        return _BODIES[kind]
    except KeyError:
        raise MessageError(f"{kind!s} is not a device-report topic") from None


# --- the envelope -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Envelope:
    """One device report: who sent it, its sequence number, when it was made, and the body."""

    kind: TopicKind
    device: str
    seq: int
    ts: float
    body: Body

    def __post_init__(self) -> None:
        if self.kind not in DEVICE_REPORTS:
            raise MessageError(
                f"{self.kind!r} is not a device report; use one of "
                + ", ".join(k.value for k in DEVICE_REPORTS)
            )
        set_field(self, "kind", TopicKind(self.kind))
        if not is_device_id(self.device):
            raise MessageError(
                f"envelope.device {self.device!r} is not a valid device id ([a-z0-9-]{{1,64}})"
            )
        need_int("envelope", "seq", self.seq, 1, MAX_SEQ)
        set_field(self, "ts", need_float("envelope", "ts", self.ts))
        expected = body_type(self.kind)
        if not isinstance(self.body, expected):
            raise MessageError(
                f"a {self.kind.value} report carries a {expected.__name__}, "
                f"not a {type(self.body).__name__}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "device": self.device,
            "seq": self.seq,
            "ts": self.ts,
            "body": self.body.to_dict(),
        }


# the fleet-side name for a parsed report
Message = Envelope


def encode(envelope: Envelope) -> bytes:
    """The envelope as compact UTF-8 JSON (the MQTT payload)."""
    try:
        text = json.dumps(
            envelope.to_dict(), separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except ValueError as exc:
        raise MessageError(f"{envelope.kind.value} body cannot be encoded: {exc}") from None
    return text.encode("utf-8")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise ValueError("duplicate key in object")
    return doc


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _decode(payload: Any, max_bytes: int) -> Any:
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise MessageRejected(RejectReason.MALFORMED, f"payload is {kind_name(payload)}, not bytes")
    size = payload.nbytes if isinstance(payload, memoryview) else len(payload)
    if size > max_bytes:
        raise MessageRejected(
            RejectReason.OVERSIZED, f"payload is {size} bytes; the limit is {max_bytes}"
        )
    try:
        text = bytes(payload).decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeError are ValueErrors
        raise MessageRejected(RejectReason.MALFORMED, f"not JSON: {str(exc)[:200]}") from None


def parse_message(topic: str, payload: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Envelope:
    """Parse and check one device report received on ``topic``.

    Raises :class:`MessageRejected` (and nothing else) with ``reason`` one of
    :class:`RejectReason`'s values; the caller counts the reason and drops the message.
    """
    try:
        device, kind = parse_topic(topic)
    except TopicError as exc:
        raise MessageRejected(RejectReason.UNKNOWN_TOPIC, str(exc)) from None
    if kind not in DEVICE_REPORTS:
        raise MessageRejected(
            RejectReason.UNKNOWN_TOPIC, f"{kind.value!r} is not a topic devices report on"
        )
    doc = _decode(payload, max_bytes)
    if not isinstance(doc, dict):
        raise MessageRejected(
            RejectReason.MALFORMED, f"payload is a JSON {kind_name(doc)}, not object"
        )
    try:
        version = doc.get("v")
        if type(version) is not int or version != VERSION:
            raise MessageError(f"envelope version {str(version)[:20]!r} is unknown (expected 1)")
        d = need_fields("envelope", doc, ("v", "device", "seq", "ts", "body"))
        if not is_device_id(d["device"]):
            raise MessageError(f"envelope.device {str(d['device'])[:80]!r} is not a device id")
        if d["device"] != device:
            raise MessageRejected(
                RejectReason.WRONG_DEVICE,
                f"envelope.device {d['device']!r} sent on the topic of {device!r}",
            )
        body = _PARSERS[kind](d["body"])
        return Envelope(kind, device, d["seq"], d["ts"], body)
    except MessageRejected:
        raise
    except ProtocolError as exc:  # MessageError, DriftError
        raise MessageRejected(RejectReason.SCHEMA, str(exc)[:500]) from None
