"""A small in-memory MQTT broker (3.1.1 and 5) so the demo runs where Mosquitto is not installed.

It implements what edgefleet's parts use, for both protocol versions, on one asyncio loop in a
background thread:

* CONNECT/CONNACK with the Last Will (and the MQTT 5 will delay), clean session / clean start,
  session expiry (3.1.1 persistent sessions never expire), session take-over by client id;
* PUBLISH with QoS 0 and 1 both ways, PUBACK; QoS 1 messages for a persistent session are
  queued while it is offline and those unacknowledged are re-sent (DUP) on reconnect, in order,
  at most the client's Receive Maximum (100 for 3.1.1) in flight;
* retained messages (an empty payload clears), sent on subscribe with the retain flag; MQTT 5
  subscription options No Local, Retain As Published and Retain Handling;
* SUBSCRIBE/UNSUBSCRIBE with ``+`` and ``#`` and shared subscriptions ``$share/{group}/{filter}``
  (each message goes to one member, connected members first, round robin), overlapping plain
  subscriptions delivered once at the highest QoS;
* PINGREQ, DISCONNECT (a clean one drops the will; MQTT 5 reason 0x04 keeps it), keepalive
  timeout (1.5 x keepalive) and lost connections publish the will.

It refuses the rest with the reason code MQTT 5 has for it (3.1.1 has none: it closes the
connection, or answers CONNACK 0x01 to another protocol version): publishing with QoS 2
(``Maximum QoS 1`` in CONNACK, 0x9B; a subscription asking for QoS 2 is granted 1), topic
aliases (0x94), subscription identifiers (0xA1), enhanced authentication (0x8C), packets over
2 MiB (0x95), malformed packets (0x81) and protocol errors (0x82).

MQTT 5 message properties (content type, user properties, ...) are forwarded unchanged to MQTT 5
subscribers; a message expiry interval is not enforced.

It deliberately does not authenticate (any user name and password are accepted), check ACLs,
speak TLS or WebSockets, or write anything to disk: it is for loopback development and demos
(:func:`simulators.local_broker.start_broker` picks it only when ``mosquitto`` is missing).
Its state (sessions, queued messages, retained messages) lives in the :class:`EmbeddedBroker`
object, so ``restart`` keeps it, as Mosquitto's persistence does. It runs in the caller's
process, sharing its CPU: enough for a demo fleet of a few hundred devices; a bigger load wants
Mosquitto.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum

log = logging.getLogger(__name__)

MAX_PACKET = 2 * 1024 * 1024  # bytes of one packet's remaining length
V311, V5 = 4, 5
INFLIGHT_V311 = 100  # Mosquitto's max_inflight_messages in our config
CONNECT_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 30.0
LINGER_S = 2.0  # after a refusal, how long unread input is drained so the client reads why


class Reason(IntEnum):
    """The MQTT 5 reason codes this broker sends."""

    SUCCESS = 0x00
    DISCONNECT_WITH_WILL = 0x04
    NO_SUBSCRIPTION_EXISTED = 0x11
    MALFORMED = 0x81
    PROTOCOL_ERROR = 0x82
    CLIENT_ID_INVALID = 0x85
    BAD_AUTH_METHOD = 0x8C
    KEEPALIVE_TIMEOUT = 0x8D
    SESSION_TAKEN_OVER = 0x8E
    TOPIC_FILTER_INVALID = 0x8F
    TOPIC_NAME_INVALID = 0x90
    TOPIC_ALIAS_INVALID = 0x94
    PACKET_TOO_LARGE = 0x95
    QOS_NOT_SUPPORTED = 0x9B
    SUBSCRIPTION_IDS_NOT_SUPPORTED = 0xA1


class PacketType(IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14


class _Refused(Exception):
    """End the connection, telling an MQTT 5 client ``reason`` (in CONNACK before it is up)."""

    def __init__(self, reason: Reason, why: str) -> None:
        super().__init__(why)
        self.reason = reason


class _ClientDisconnected(Exception):
    def __init__(self, with_will: bool) -> None:
        super().__init__()
        self.with_will = with_will


# --- wire format ------------------------------------------------------------------------------

# MQTT 5 property identifier -> type; the ones a PUBLISH forwards are FORWARDED
_PROPERTY_TYPES = {
    0x01: "u8", 0x02: "u32", 0x03: "str", 0x08: "str", 0x09: "bin", 0x0B: "varint",
    0x11: "u32", 0x12: "str", 0x13: "u16", 0x15: "str", 0x16: "bin", 0x17: "u8", 0x18: "u32",
    0x19: "u8", 0x1A: "str", 0x1C: "str", 0x1F: "str", 0x21: "u16", 0x22: "u16", 0x23: "u16",
    0x24: "u8", 0x25: "u8", 0x26: "pair", 0x27: "u32", 0x28: "u8", 0x29: "u8", 0x2A: "u8",
}  # fmt: skip
_FORWARDED = {0x01, 0x02, 0x03, 0x08, 0x09, 0x26}
Property = tuple[int, object]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def _text(s: str) -> bytes:
    raw = s.encode()
    return _u16(len(raw)) + raw


def _encode_properties(props: list[Property]) -> bytes:
    body = bytearray()
    for pid, value in props:
        kind = _PROPERTY_TYPES[pid]
        body += _varint(pid)
        if kind == "u8":
            body.append(int(value))  # type: ignore[call-overload]
        elif kind == "u16":
            body += _u16(int(value))  # type: ignore[call-overload]
        elif kind == "u32":
            body += int(value).to_bytes(4, "big")  # type: ignore[call-overload]
        elif kind == "varint":
            body += _varint(int(value))  # type: ignore[call-overload]
        elif kind == "str":
            body += _text(str(value))
        elif kind == "bin":
            assert isinstance(value, bytes)
            body += _u16(len(value)) + value
        else:
            assert isinstance(value, tuple)
            body += _text(value[0]) + _text(value[1])
    return _varint(len(body)) + bytes(body)


def _packet(ptype: PacketType, flags: int, body: bytes) -> bytes:
    return bytes([ptype << 4 | flags]) + _varint(len(body)) + body


class _Reader:
    """A cursor over one packet's body; running past its end is a malformed packet."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise _Refused(Reason.MALFORMED, "packet shorter than its fields")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def varint(self) -> int:
        value = 0
        for shift in range(0, 28, 7):
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
        raise _Refused(Reason.MALFORMED, "variable byte integer longer than 4 bytes")

    def binary(self) -> bytes:
        return self.take(self.u16())

    def text(self) -> str:
        try:
            return self.binary().decode()
        except UnicodeDecodeError:
            raise _Refused(Reason.MALFORMED, "string is not UTF-8") from None

    def properties(self) -> list[Property]:
        end = self.varint() + self.pos
        props: list[Property] = []
        while self.pos < end:
            pid = self.varint()
            kind = _PROPERTY_TYPES.get(pid)
            if kind is None:
                raise _Refused(Reason.MALFORMED, f"unknown property 0x{pid:02x}")
            read = {"u8": self.u8, "u16": self.u16, "u32": self.u32, "varint": self.varint,
                    "str": self.text, "bin": self.binary}.get(kind)  # fmt: skip
            props.append((pid, read() if read else (self.text(), self.text())))
        if self.pos != end:
            raise _Refused(Reason.MALFORMED, "properties overrun their length")
        return props


# --- topics -----------------------------------------------------------------------------------


def valid_topic(topic: str) -> bool:
    return bool(topic) and "+" not in topic and "#" not in topic and "\0" not in topic


def valid_filter(topic_filter: str) -> bool:
    if not topic_filter or "\0" in topic_filter:
        return False
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def split_shared(topic_filter: str) -> tuple[str | None, str] | None:
    """``(group, filter)`` of ``$share/{group}/{filter}``, ``(None, filter)`` of a plain filter,
    or None if it is not a valid filter."""
    if topic_filter.startswith("$share/"):
        _, group, *rest = topic_filter.split("/", 2)
        if not group or "+" in group or "#" in group or not rest or not valid_filter(rest[0]):
            return None
        return group, rest[0]
    return (None, topic_filter) if valid_filter(topic_filter) else None


def matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter`` (wildcards never match a leading ``$``)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    want, have = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(have) or (level != "+" and level != have[i]):
            return False
    return len(want) == len(have)


# --- sessions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: list[Property] = field(default_factory=list)  # MQTT 5, forwarded ones only


@dataclass(frozen=True)
class _Subscription:
    group: str | None
    topic_filter: str
    qos: int
    no_local: bool = False
    retain_as_published: bool = False


@dataclass(frozen=True)
class _Outgoing:
    message: Message
    qos: int
    retain: bool


@dataclass(frozen=True)
class _Will:
    message: Message
    delay_s: float


class _Session:
    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.subscriptions: dict[str, _Subscription] = {}  # by the filter as subscribed
        self.pending: deque[_Outgoing] = deque()  # QoS 1, not sent yet
        self.inflight: dict[int, _Outgoing] = {}  # packet id -> sent, not acknowledged
        self.expiry_s = 0.0
        self.expires_at = math.inf  # monotonic; set when the connection ends
        self.connection: _Connection | None = None
        self.will_timer: asyncio.TimerHandle | None = None
        self._ids = itertools.cycle(range(1, 65536))

    def next_packet_id(self) -> int:
        while (pid := next(self._ids)) in self.inflight:
            pass
        return pid


class _Connection:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.version = V311
        self.session: _Session | None = None
        self.will: _Will | None = None
        self.receive_max = INFLIGHT_V311
        self.max_packet = MAX_PACKET
        self.closed = False

    def send(self, data: bytes) -> None:
        if not self.closed:
            self.writer.write(data)

    def close(self) -> None:
        self.closed = True
        self.writer.close()


class _FilterIndex:
    """Which sessions subscribe to each (plain) filter, so that a publish looks only at the
    sessions it may reach: exact filters by topic, wildcard filters (a few) one by one."""

    def __init__(self) -> None:
        self._exact: dict[str, set[str]] = {}
        self._wildcard: dict[str, set[str]] = {}

    def _table(self, topic_filter: str) -> dict[str, set[str]]:
        return self._wildcard if "+" in topic_filter or "#" in topic_filter else self._exact

    def add(self, topic_filter: str, client_id: str) -> None:
        self._table(topic_filter).setdefault(topic_filter, set()).add(client_id)

    def discard(self, topic_filter: str, client_id: str) -> None:
        table = self._table(topic_filter)
        ids = table.get(topic_filter, set())
        ids.discard(client_id)
        if not ids:
            table.pop(topic_filter, None)

    def sessions(self, topic: str) -> set[str]:
        found = set(self._exact.get(topic, ()))
        for topic_filter, ids in self._wildcard.items():
            if matches(topic_filter, topic):
                found |= ids
        return found


# --- the broker -------------------------------------------------------------------------------


class EmbeddedBroker:
    """The broker on ``host:port`` (a free port when 0); ``start``/``stop``/``restart`` keep the
    port and the in-memory state. Same interface as :class:`simulators.broker.MosquittoBroker`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._sessions: dict[str, _Session] = {}
        self._index = _FilterIndex()
        self._retained: dict[str, Message] = {}
        self._share_turns: dict[tuple[str, str], int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._connections: dict[asyncio.Task[None], _Connection] = {}

    # --- lifecycle (caller's thread) ------------------------------------------------------------

    def start(self) -> None:
        if self.running:
            return
        loop = asyncio.new_event_loop()
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._serve, self.host, self.port, reuse_address=True)
            )
        except OSError:
            loop.close()
            raise
        self.port = self._server.sockets[0].getsockname()[1]
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="mqtt-broker", daemon=True)
        self._thread.start()
        log.info("embedded MQTT broker up on %s:%d", self.host, self.port)

    def stop(self) -> None:
        """Close the listener and every connection (no wills: a broker shutdown is not a
        client failure); sessions and retained messages stay for the next ``start``."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(STOP_TIMEOUT_S)
        except TimeoutError:  # a starved loop (a very busy machine): stop it all the same
            log.warning("embedded broker: connections still closing after %ss", STOP_TIMEOUT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        self._loop = self._thread = self._server = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for session in list(self._sessions.values()):
            if session.will_timer:
                session.will_timer.cancel()
                session.will_timer = None
            if session.connection:
                session.connection.will = None
                self._closed(session.connection, publish_will=False)
        for conn in self._connections.values():  # those still in CONNECT (no will yet)
            conn.close()
        if self._connections:  # each ends on its closed socket
            await asyncio.wait(self._connections, timeout=5)
        await self._server.wait_closed()

    # --- one connection (the loop's thread from here on) ----------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(writer)
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = conn
        publish_will = True
        try:
            ptype, _, body = await asyncio.wait_for(_read_packet(reader), CONNECT_TIMEOUT_S)
            if ptype != PacketType.CONNECT:
                raise _Refused(Reason.PROTOCOL_ERROR, "the first packet must be CONNECT")
            keepalive = self._connect(conn, body)
            while True:
                read = _read_packet(reader)
                ptype, flags, body = await (
                    asyncio.wait_for(read, keepalive * 1.5) if keepalive else read
                )
                if conn.closed:  # taken over, or the broker is stopping
                    break
                self._handle(conn, ptype, flags, body)
        except _ClientDisconnected as done:
            publish_will = done.with_will
        except _Refused as refused:
            log.info("embedded broker: closing a connection: %s", refused)
            if conn.session is not None and conn.version == V5:
                conn.send(_packet(PacketType.DISCONNECT, 0, bytes([refused.reason, 0])))
                await _linger(reader, writer)
        except TimeoutError:
            if conn.version == V5 and conn.session is not None:
                conn.send(_packet(PacketType.DISCONNECT, 0, bytes([Reason.KEEPALIVE_TIMEOUT, 0])))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:  # a bug here must not take the other connections down
            log.exception("embedded broker: connection failed")
        finally:
            del self._connections[task]
            self._closed(conn, publish_will)
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _closed(self, conn: _Connection, publish_will: bool) -> None:
        if conn.closed and conn.session is None:
            return
        conn.close()
        session, conn.session = conn.session, None
        if session is None or session.connection is not conn:
            return
        session.connection = None
        session.expires_at = time.monotonic() + session.expiry_s
        if session.expiry_s == 0:
            self._forget(session)
        will, conn.will = conn.will, None
        if publish_will and will is not None:
            delay = min(will.delay_s, session.expiry_s)
            if delay > 0:
                assert self._loop is not None
                session.will_timer = self._loop.call_later(delay, self._publish, will.message, "")
            else:
                self._publish(will.message, "")

    def _connect(self, conn: _Connection, body: bytes) -> int:
        """Set the connection up from its CONNECT and answer CONNACK; returns the keepalive."""
        r = _Reader(body)
        name, version = r.text(), r.u8()
        if name != "MQTT" or version not in (V311, V5):
            conn.send(_packet(PacketType.CONNACK, 0, b"\x00\x01"))  # unacceptable version
            raise _Refused(Reason.PROTOCOL_ERROR, f"unsupported protocol {name!r} {version}")
        conn.version = version
        flags, keepalive = r.u8(), r.u16()
        props = dict(r.properties()) if version == V5 else {}
        client_id = r.text()
        will = None
        if flags & 0x04:
            will_props = r.properties() if version == V5 else []
            topic, payload = r.text(), r.binary()
            qos = flags >> 3 & 3
            forwarded = [p for p in will_props if p[0] in _FORWARDED]
            delay = float(dict(will_props).get(0x18, 0))  # type: ignore[arg-type]
            will = _Will(Message(topic, payload, qos, bool(flags & 0x20), forwarded), delay)
        if flags & 0x80:
            r.text()  # user name: accepted, not checked
        if flags & 0x40:
            r.binary()  # password
        clean = bool(flags & 0x02)
        refusal: tuple[Reason, str] | None = None
        if flags & 0x01 or (not flags & 0x04 and flags & 0x38):
            refusal = (Reason.MALFORMED, "reserved CONNECT flags set")
        elif will is not None and will.message.qos > 1:
            refusal = (Reason.QOS_NOT_SUPPORTED, "will QoS 2 is not supported")
        elif will is not None and not valid_topic(will.message.topic):
            refusal = (Reason.TOPIC_NAME_INVALID, f"invalid will topic {will.message.topic!r}")
        elif 0x15 in props:
            refusal = (Reason.BAD_AUTH_METHOD, "enhanced authentication is not supported")
        elif props.get(0x21) == 0 or props.get(0x27) == 0:
            refusal = (Reason.PROTOCOL_ERROR, "Receive Maximum and Maximum Packet Size must be > 0")
        elif not client_id and version == V311 and not clean:
            refusal = (Reason.CLIENT_ID_INVALID, "an empty client id needs a clean session")
        if refusal is not None:
            code = refusal[0] if version == V5 else (2 if refusal[0] == 0x85 else None)
            if code is not None:
                extra = _encode_properties([]) if version == V5 else b""
                conn.send(_packet(PacketType.CONNACK, 0, bytes([0, code]) + extra))
            raise _Refused(*refusal)

        connack_props: list[Property] = [(0x24, 1), (0x29, 0)]  # Maximum QoS 1, no sub ids
        if not client_id:
            client_id = f"auto-{uuid.uuid4().hex}"
            connack_props.append((0x12, client_id))
        if version == V5:
            conn.receive_max = int(props.get(0x21, 65535))  # type: ignore[call-overload]
            conn.max_packet = int(props.get(0x27, MAX_PACKET))  # type: ignore[call-overload]
            expiry = float(props.get(0x11, 0))  # type: ignore[arg-type]
            expiry = math.inf if expiry == 0xFFFFFFFF else expiry
        else:
            expiry = 0.0 if clean else math.inf

        session = self._sessions.get(client_id)
        if session is not None and session.connection is not None:  # taken over
            old = session.connection
            if old.version == V5:
                old.send(_packet(PacketType.DISCONNECT, 0, bytes([Reason.SESSION_TAKEN_OVER, 0])))
            self._closed(old, publish_will=True)
            session = self._sessions.get(client_id)
        if session is not None and session.will_timer:  # back within the will delay
            session.will_timer.cancel()
            session.will_timer = None
        if session is not None and (clean or session.expires_at <= time.monotonic()):
            self._forget(session)
            session = None
        present = session is not None
        if session is None:
            session = self._sessions[client_id] = _Session(client_id)
        session.expiry_s = expiry
        session.expires_at = math.inf
        session.connection, conn.session, conn.will = conn, session, will
        extra = _encode_properties(connack_props) if version == V5 else b""
        conn.send(_packet(PacketType.CONNACK, 0, bytes([int(present), 0]) + extra))
        for pid, out in session.inflight.items():  # re-send what was unacknowledged, in order
            conn.send(_publish_packet(out, pid, conn.version, dup=True))
        self._fill(session)
        return keepalive

    def _handle(self, conn: _Connection, ptype: int, flags: int, body: bytes) -> None:
        session = conn.session
        assert session is not None
        r = _Reader(body)
        if ptype == PacketType.PUBLISH:
            self._on_publish(conn, flags, r)
        elif ptype == PacketType.PUBACK:
            session.inflight.pop(r.u16(), None)
            self._fill(session)
        elif ptype == PacketType.SUBSCRIBE and flags == 2:
            self._on_subscribe(conn, r)
        elif ptype == PacketType.UNSUBSCRIBE and flags == 2:
            pid = r.u16()
            if conn.version == V5:
                r.properties()
            codes = bytearray()
            while r.left:
                gone = session.subscriptions.pop(r.text(), None)
                codes.append(Reason.NO_SUBSCRIPTION_EXISTED if gone is None else Reason.SUCCESS)
                if gone and all(
                    s.topic_filter != gone.topic_filter for s in session.subscriptions.values()
                ):
                    self._index.discard(gone.topic_filter, session.client_id)
            reply = _u16(pid) + (_encode_properties([]) + codes if conn.version == V5 else b"")
            conn.send(_packet(PacketType.UNSUBACK, 0, reply))
        elif ptype == PacketType.PINGREQ:
            conn.send(_packet(PacketType.PINGRESP, 0, b""))
        elif ptype == PacketType.DISCONNECT:
            reason = r.u8() if conn.version == V5 and r.left else 0
            props = dict(r.properties()) if conn.version == V5 and r.left else {}
            if 0x11 in props:
                if session.expiry_s == 0 and props[0x11] != 0:
                    raise _Refused(Reason.PROTOCOL_ERROR, "session expiry raised at DISCONNECT")
                session.expiry_s = float(props[0x11])  # type: ignore[arg-type]
            raise _ClientDisconnected(with_will=reason == Reason.DISCONNECT_WITH_WILL)
        else:
            raise _Refused(Reason.PROTOCOL_ERROR, f"unexpected packet type {ptype}")

    def _on_publish(self, conn: _Connection, flags: int, r: _Reader) -> None:
        qos, retain = flags >> 1 & 3, bool(flags & 1)
        if qos == 3:
            raise _Refused(Reason.MALFORMED, "PUBLISH with QoS 3")
        if qos == 2:
            raise _Refused(Reason.QOS_NOT_SUPPORTED, "QoS 2 is not supported")
        topic = r.text()
        pid = r.u16() if qos else 0
        props = r.properties() if conn.version == V5 else []
        if any(p[0] == 0x23 for p in props):
            raise _Refused(Reason.TOPIC_ALIAS_INVALID, "topic aliases are not supported")
        if not valid_topic(topic):
            raise _Refused(Reason.TOPIC_NAME_INVALID, f"cannot publish to {topic!r}")
        forwarded = [p for p in props if p[0] in _FORWARDED]
        message = Message(topic, r.take(r.left), qos, retain, forwarded)
        assert conn.session is not None
        self._publish(message, conn.session.client_id)
        if qos == 1:
            conn.send(_packet(PacketType.PUBACK, 0, _u16(pid)))

    def _on_subscribe(self, conn: _Connection, r: _Reader) -> None:
        session = conn.session
        assert session is not None
        pid = r.u16()
        if conn.version == V5 and any(p[0] == 0x0B for p in r.properties()):
            raise _Refused(Reason.SUBSCRIPTION_IDS_NOT_SUPPORTED, "no subscription identifiers")
        codes = bytearray()
        retained: list[_Outgoing] = []
        while r.left:
            topic_filter, options = r.text(), r.u8()
            qos = options & 3
            if qos == 3 or options & (0xC0 if conn.version == V5 else 0xFC):
                raise _Refused(Reason.MALFORMED, "reserved subscription options set")
            parsed = split_shared(topic_filter)
            if parsed is None:
                codes.append(Reason.TOPIC_FILTER_INVALID if conn.version == V5 else 0x80)
                continue
            group, plain = parsed
            no_local = conn.version == V5 and bool(options & 0x04)
            if group is not None and no_local:
                raise _Refused(Reason.PROTOCOL_ERROR, "No Local on a shared subscription")
            existed = topic_filter in session.subscriptions
            granted = min(qos, 1)
            session.subscriptions[topic_filter] = _Subscription(
                group, plain, granted, no_local, conn.version == V5 and bool(options & 0x08)
            )
            self._index.add(plain, session.client_id)
            codes.append(granted)
            handling = options >> 4 & 3 if conn.version == V5 else 0
            if group is None and (handling == 0 or (handling == 1 and not existed)):
                retained += [
                    _Outgoing(m, min(m.qos, granted), True)
                    for t, m in self._retained.items()
                    if matches(plain, t)
                ]
        if not codes:
            raise _Refused(Reason.PROTOCOL_ERROR, "SUBSCRIBE without topic filters")
        props = _encode_properties([]) if conn.version == V5 else b""
        conn.send(_packet(PacketType.SUBACK, 0, _u16(pid) + props + codes))
        for out in retained:
            self._deliver(session, out)

    # --- routing ----------------------------------------------------------------------------

    def _publish(self, message: Message, sender: str) -> None:
        """Deliver ``message`` to every matching session once, and to one member per shared
        subscription group; keep it if it is retained (the will too)."""
        if message.retain and message.payload:
            self._retained[message.topic] = message
        elif message.retain:
            self._retained.pop(message.topic, None)
        now = time.monotonic()
        groups: dict[tuple[str, str], list[tuple[_Session, _Subscription]]] = {}
        for client_id in self._index.sessions(message.topic):
            session = self._sessions[client_id]
            if session.connection is None and session.expires_at <= now:
                self._forget(session)
                continue
            best: _Subscription | None = None
            retain = False
            for sub in session.subscriptions.values():
                if not matches(sub.topic_filter, message.topic):
                    continue
                if sub.group is not None:
                    groups.setdefault((sub.group, sub.topic_filter), []).append((session, sub))
                elif not (sub.no_local and session.client_id == sender):
                    retain = retain or sub.retain_as_published
                    best = sub if best is None or sub.qos > best.qos else best
            if best is not None:
                qos = min(message.qos, best.qos)
                self._deliver(session, _Outgoing(message, qos, message.retain and retain))
        for key, members in groups.items():
            online = [m for m in members if m[0].connection is not None] or members
            turn = self._share_turns.get(key, 0)
            self._share_turns[key] = turn + 1
            session, sub = online[turn % len(online)]
            self._deliver(session, _Outgoing(message, min(message.qos, sub.qos), False))

    def _forget(self, session: _Session) -> None:
        """End a session: its subscriptions and queued messages go with it."""
        if self._sessions.get(session.client_id) is session:
            del self._sessions[session.client_id]
        for sub in session.subscriptions.values():
            self._index.discard(sub.topic_filter, session.client_id)

    def _deliver(self, session: _Session, out: _Outgoing) -> None:
        if out.qos == 0:
            if session.connection is not None:
                session.connection.send(_publish_packet(out, 0, session.connection.version))
            return
        session.pending.append(out)
        self._fill(session)

    def _fill(self, session: _Session) -> None:
        conn = session.connection
        while conn is not None and session.pending and len(session.inflight) < conn.receive_max:
            out = session.pending.popleft()
            pid = session.next_packet_id()
            packet = _publish_packet(out, pid, conn.version)
            if len(packet) > conn.max_packet:
                log.warning("embedded broker: a message too big for %s dropped", session.client_id)
                continue
            session.inflight[pid] = out
            conn.send(packet)


def _publish_packet(out: _Outgoing, pid: int, version: int, dup: bool = False) -> bytes:
    m = out.message
    body = _text(m.topic) + (_u16(pid) if out.qos else b"")
    if version == V5:
        body += _encode_properties(m.properties)
    flags = (dup and out.qos) << 3 | out.qos << 1 | out.retain
    return _packet(PacketType.PUBLISH, flags, body + m.payload)


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Flush the refusal, then read and drop what the client still sends (the rest of a packet
    that was too large) until it hangs up or ``LINGER_S`` passes: closing a socket with unread
    input resets the connection, and the client would lose the DISCONNECT that says why."""
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(LINGER_S):
            await writer.drain()
            while await reader.read(65536):
                pass


async def _read_packet(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    first = (await reader.readexactly(1))[0]
    length = 0
    for shift in range(0, 28, 7):
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
    else:
        raise _Refused(Reason.MALFORMED, "remaining length longer than 4 bytes")
    if length > MAX_PACKET:
        raise _Refused(Reason.PACKET_TOO_LARGE, f"packet of {length} bytes")
    return first >> 4, first & 0x0F, await reader.readexactly(length)
