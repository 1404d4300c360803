"""The agent's MQTT link: one paho client, its connection lifecycle, and the outbox flusher.

What it does, after Home Assistant's MQTT client:

* builds the paho client (callback API v2, MQTT 5, client id = device id, username/password,
  an optional TLS context) separately from running it; paho reconnects on its own with
  exponential backoff (``reconnect_delay_set``), and a broker that is missing at start is just
  the first outage: one clear log line, and reports keep queuing in the outbox;
* sets the Last Will (retained ``state`` with ``online: false``) before every connection attempt
  and publishes the retained birth (``online: true``) after every successful connect. Both
  envelopes take their sequence numbers from a block reserved in the outbox for that connection
  (birth first, will last: see :mod:`protocol.messages`), prepared ahead so that paho's network
  thread never waits for SQLite;
* refreshes the retained state on request (:meth:`MqttLink.refresh_state`) with the block's next
  seq; when the block is used up it reconnects on purpose: it publishes nothing new until what
  is in flight is acknowledged (at most ``DRAIN_S``), disconnects cleanly (reason 0, so the
  broker drops that connection's will and the last online state stays retained), and at once
  opens a new connection with a new block and a new will, whose birth carries the current state
  (the pending refresh folded in) with a seq above every earlier state. No outage is logged for
  it, and unacknowledged reports are re-sent as after any reconnect;
* keeps a subscription registry and re-subscribes on every connect;
* flushes the outbox: publishes rows in ``seq`` order with QoS 1 and at most ``inflight_window``
  unacknowledged, and deletes a row only when its PUBACK arrives. After every (re)connect it
  starts again from the oldest row still in the outbox, so unacknowledged reports are re-sent in
  order (a few may arrive twice; the fleet keeps each ``(device, seq)`` once).

One thread per link drives paho through its external-loop API (``socket``, ``want_write``,
``loop_read``, ``loop_write``, ``loop_misc``, ``reconnect``) with ``poll``: it sleeps until the
broker's socket is readable (or writable while paho has bytes to send), the link is woken
(a report in the outbox, a refresh, a subscription, stop), a reconnect is due, or the keepalive
needs checking (every ``keepalive / 4`` s: paho pings once ``keepalive`` s have passed without
traffic, Mosquitto drops a client after 1.5 keepalives of silence). An idle connected agent thus
wakes for its own reports and their acks and a few times a keepalive, not every second as
paho's ``loop_start`` thread does (``select`` with a fixed 1 s timeout), and with ``poll`` a
socket numbered past 1024 is no problem. paho's callbacks run on that thread and only post
events; the worker step that follows each wake-up does the work (publishing, acknowledging rows
in SQLite). A second thread, started with the first incoming message, calls the handlers of
incoming messages. :meth:`MqttLink.stop` waits for the link thread and then shuts it out of the
outbox, so the outbox can be closed right after it returns even if the thread is still stuck
(a SQLite lock, a connect under way).

It does not decide what to report (:mod:`agent.reporter`) nor verify desired documents.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from agent.errors import LinkError
from agent.outbox import OutboxRow
from protocol.messages import Envelope, StateBody, encode
from protocol.topics import TopicKind, state_topic, validate_device_id

log = logging.getLogger(__name__)

# sequence numbers reserved per connection: the birth and up to STATE_BLOCK - 2 state refreshes
# (e.g. after a model update) take the lower ones, the Last Will the highest; one more refresh
# makes the link reconnect on purpose to get a new block
STATE_BLOCK = 8
# how long a planned reconnect waits for the acks of what is in flight before it disconnects
DRAIN_S = 2.0
# how often the link thread looks at its deadlines while a drain or a stop is under way
DEADLINE_TICK_S = 0.05
# the link thread wakes at least this often even with nothing to do (a safety net: every
# report, ack, connection change and request wakes it anyway)
IDLE_WAKE_S = 60.0
# a failed worker step (disk full, ...) is tried again this soon
STEP_RETRY_S = 0.5
# stop waits this long beyond its flush timeout for the link thread before shutting it out
STOP_GRACE_S = 5.0
Handler = Callable[[str, bytes], None]


class OutboxPort(Protocol):
    """What the link needs of :class:`agent.outbox.Outbox`."""

    def reserve(self, n: int = 1) -> int: ...

    def peek(self, n: int, after: int = 0) -> list[OutboxRow]: ...

    def ack_many(self, seqs: Iterable[int]) -> int: ...

    def depth(self) -> int: ...


@dataclass(frozen=True)
class LinkConfig:
    device_id: str
    host: str
    port: int = 1883
    username: str = ""
    password: str = field(default="", repr=False)
    keepalive: int = 30
    tls_context: ssl.SSLContext | None = None  # built by the caller (CA file, client cert)
    inflight_window: int = 20
    reconnect_min_s: int = 1
    reconnect_max_s: int = 60


@dataclass(frozen=True)
class LinkStatus:
    """For the health endpoint and the heartbeat."""

    connected: bool
    last_connect: float | None  # wall-clock time of the last successful connect
    last_error: str | None  # the last connection problem, None once a connect succeeded
    inflight: int  # reports published and not yet acknowledged
    published_total: int
    acked_total: int
    connects_total: int


@dataclass(frozen=True)
class _Block:
    """Sequence numbers of one connection: births/refreshes ``first..last-1``, the will ``last``."""

    first: int
    will_payload: bytes = b""

    @property
    def will_seq(self) -> int:
        return self.first + STATE_BLOCK - 1


# events posted by paho's callbacks (and the public methods) to the worker thread
@dataclass(frozen=True)
class _Connected:
    block: _Block | None  # None only if the block could not be prepared (no birth then)


@dataclass(frozen=True)
class _Disconnected:
    pass


@dataclass(frozen=True)
class _Acked:
    mid: int
    reason: ReasonCode | None


@dataclass(frozen=True)
class _Wake:
    pass


@dataclass(frozen=True)
class _Resubscribe:
    topic_filter: str


@dataclass(frozen=True)
class _RefreshState:
    pass


@dataclass(frozen=True)
class _ReserveBlock:
    pass


@dataclass(frozen=True)
class _Stop:
    deadline: float


_Event = (
    _Connected
    | _Disconnected
    | _Acked
    | _Wake
    | _Resubscribe
    | _RefreshState
    | _ReserveBlock
    | _Stop
)


def build_client(config: LinkConfig) -> mqtt.Client:
    """The paho client for ``config``; nothing is connected yet."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=validate_device_id(config.device_id),
        protocol=mqtt.MQTTv5,
        reconnect_on_failure=True,
    )
    if config.username:
        client.username_pw_set(config.username, config.password or None)
    if config.tls_context is not None:
        client.tls_set_context(config.tls_context)
    client.reconnect_delay_set(config.reconnect_min_s, config.reconnect_max_s)
    client.max_inflight_messages_set(config.inflight_window)
    return client


def check_interval(keepalive: int) -> float:
    """How often the link thread lets paho check the keepalive: a quarter of it, so a PINGREQ
    goes out at most 1.25 keepalives after the last packet, within the broker's 1.5."""
    return IDLE_WAKE_S if keepalive <= 0 else min(IDLE_WAKE_S, keepalive / 4)


class _ShutOut(Exception):
    """The link was stopped: its thread must not touch the outbox any more."""


class _GuardedOutbox:
    """The outbox as the link's threads see it: every call holds the guard, and after
    :meth:`shut` no call reaches the outbox (it raises :class:`_ShutOut`)."""

    def __init__(self, outbox: OutboxPort) -> None:
        self._outbox = outbox
        self._guard = threading.Lock()
        self._shut = False

    def shut(self) -> None:
        """Wait for a call under way, then refuse every later one."""
        with self._guard:
            self._shut = True

    @property
    def is_shut(self) -> bool:
        return self._shut

    def reserve(self, n: int = 1) -> int:
        with self._guard:
            if self._shut:
                raise _ShutOut
            return self._outbox.reserve(n)

    def peek(self, n: int, after: int = 0) -> list[OutboxRow]:
        with self._guard:
            if self._shut:
                raise _ShutOut
            return self._outbox.peek(n, after)

    def ack_many(self, seqs: Iterable[int]) -> int:
        with self._guard:
            if self._shut:
                raise _ShutOut
            return self._outbox.ack_many(seqs)

    def depth(self) -> int:
        with self._guard:
            if self._shut:
                raise _ShutOut
            return self._outbox.depth()


class MqttLink:
    """The device's connection to the broker (see the module docstring).

    ``state`` returns the device's current :class:`StateBody` (its ``online`` field is set by
    the link); it is called on the link thread before each connect, so it must be cheap and
    must not block.
    """

    def __init__(
        self,
        config: LinkConfig,
        outbox: OutboxPort,
        state: Callable[[], StateBody],
        clock: Callable[[], float] = time.time,
    ) -> None:
        if config.inflight_window < 1:
            raise LinkError(f"inflight_window must be >= 1, got {config.inflight_window}")
        self.config = config
        self._outbox = _GuardedOutbox(outbox)
        self._state = state
        self._clock = clock
        # posted by paho's callbacks (on the link thread) and the public methods (any thread)
        self._events: deque[_Event] = deque()
        self._inbound: queue.Queue[mqtt.MQTTMessage | None] = queue.Queue()
        self._subscriptions: dict[str, tuple[int, Handler]] = {}
        self._lock = threading.Lock()  # guards the fields below, shared by the threads
        self._next_block: _Block | None = None
        self._attempt_block: _Block | None = None
        self._connected = False
        self._last_connect: float | None = None
        self._last_error: str | None = None
        self._outage_logged = False
        self._closing = False
        self._planned_disconnect = False  # the worker ended the connection to reconnect at once
        self._wake_pending = False
        self._inflight_count = 0
        self._published_total = 0
        self._acked_total = 0
        self._connects_total = 0
        self._client: mqtt.Client | None = None
        self._thread: threading.Thread | None = None
        self._inbound_thread: threading.Thread | None = None  # started by the first message
        self._wake_r: socket.socket | None = None  # the link thread polls it; _wake writes
        self._wake_w: socket.socket | None = None
        self._retry_delay: float | None = None  # reconnect backoff; None after a good connect

    # --- public API ---------------------------------------------------------------------------

    def start(self) -> None:
        """Build the client and start connecting in the background; never raises for an
        unreachable broker (the link keeps retrying with backoff)."""
        if self._client is not None:
            raise LinkError("the MQTT link is already started; create a new MqttLink to restart")
        self._next_block = _Block(self._outbox.reserve(STATE_BLOCK))
        client = build_client(self.config)
        client.on_pre_connect = self._on_pre_connect
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        # only records the host, port and options; the link thread connects
        client.connect_async(
            self.config.host, self.config.port, self.config.keepalive, clean_start=True
        )
        self._client = client
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread = threading.Thread(
            target=self._run, args=(client,), name="mqtt-link", daemon=True
        )
        self._thread.start()

    def notify(self) -> None:
        """Tell the link that new rows are in the outbox (cheap; coalesced)."""
        with self._lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        self._post(_Wake())

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Register ``handler(topic, payload)`` for ``topic_filter``; kept across reconnects.

        Handlers run on the link's inbound thread, one message at a time.
        """
        if not topic_filter or qos not in (0, 1, 2):
            raise LinkError(f"cannot subscribe to {topic_filter!r} with QoS {qos}")
        with self._lock:
            self._subscriptions[topic_filter] = (qos, handler)
        self._post(_Resubscribe(topic_filter))

    def refresh_state(self) -> None:
        """Publish the retained state again (e.g. after the active model changed).

        Up to ``STATE_BLOCK - 2`` refreshes per connection take the seqs between the birth's and
        the will's; the next one makes the link reconnect cleanly (see the module docstring), and
        the new connection's birth publishes the state then current. Several refreshes asked for
        while a reconnect is under way end up in that one birth.
        """
        self._post(_RefreshState())

    def status(self) -> LinkStatus:
        with self._lock:
            return LinkStatus(
                connected=self._connected,
                last_connect=self._last_connect,
                last_error=self._last_error,
                inflight=self._inflight_count,
                published_total=self._published_total,
                acked_total=self._acked_total,
                connects_total=self._connects_total,
            )

    def stop(self, timeout: float = 5.0) -> None:
        """Flush what it can, publish the offline state, wait for acks, and disconnect.

        Spends at most about ``timeout`` seconds; whatever is not acknowledged by then stays in
        the outbox for the next start. When it returns the link no longer uses the outbox (if
        its thread is stuck beyond ``timeout`` + ``STOP_GRACE_S``, in a SQLite lock or a connect,
        it is shut out: it ends without touching the outbox again), so the caller may close it.
        """
        client, thread = self._client, self._thread
        if client is None or thread is None:
            return
        with self._lock:
            self._closing = True
        self._post(_Stop(time.monotonic() + timeout))
        thread.join(timeout + STOP_GRACE_S)
        if thread.is_alive():
            log.warning(
                "the MQTT link thread did not end within %.0f s; it will not touch the outbox "
                "again and ends once its current call returns",
                timeout + STOP_GRACE_S,
            )
        self._outbox.shut()  # waits for an outbox call under way
        inbound = self._inbound_thread
        if inbound is not None:
            self._inbound.put(None)
            inbound.join(5)
        with self._lock:
            self._connected = False
        self._client = None

    # --- paho callbacks (on the link thread): record and post, nothing else -------------------

    def _on_pre_connect(self, client: mqtt.Client, userdata: Any) -> None:
        try:
            with self._lock:
                block, self._next_block = self._next_block, None
            if block is None:  # the worker has not prepared one yet: reserve here, rarely
                block = _Block(self._outbox.reserve(STATE_BLOCK))
            payload = self._state_payload(block.will_seq, online=False)
            block = dataclasses.replace(block, will_payload=payload)
            client.will_set(state_topic(self.config.device_id), payload, qos=1, retain=True)
            with self._lock:
                self._attempt_block = block
            self._events.append(_ReserveBlock())
        except _ShutOut:
            pass
        except Exception:  # the connection attempt goes on
            log.exception("cannot prepare the Last Will; connecting with the previous one")

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Any,
    ) -> None:
        if reason.is_failure:
            error = f"the broker refused the connection: {reason}"
            hint = (
                "check mqtt.username/password and the broker's ACL"
                if reason.value in (0x86, 0x87)  # bad user name or password, not authorized
                else "check the broker configuration"
            )
            with self._lock:
                repeated = self._last_error == error
                self._last_error = error
            if not repeated:
                log.error("MQTT %s (%s); reports stay queued in the outbox", error, hint)
            return
        self._retry_delay = None
        with self._lock:
            block, self._attempt_block = self._attempt_block, None
            self._connected = True
            self._last_connect = self._clock()
            self._last_error = None
            self._connects_total += 1
            recovered = self._outage_logged
            self._outage_logged = False
        if recovered:
            log.info("MQTT connected to %s:%d again", self.config.host, self.config.port)
        else:
            log.info("MQTT connected to %s:%d", self.config.host, self.config.port)
        self._events.append(_Connected(block))

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Any,
    ) -> None:
        with self._lock:
            was_connected, self._connected = self._connected, False
            closing = self._closing
            planned, self._planned_disconnect = self._planned_disconnect, False
        if was_connected:
            self._events.append(_Disconnected())
        if was_connected and not closing and not planned:
            self._outage(f"lost the connection to the MQTT broker ({reason})")

    def _outage(self, error: str) -> None:
        with self._lock:
            self._last_error = error
            first, self._outage_logged = not self._outage_logged, True
        if not first:
            return
        try:
            waiting = str(self._outbox.depth())
        except _ShutOut:
            waiting = "?"
        log.warning(
            "%s; reports stay queued in the outbox (%s waiting) and are sent when it is "
            "back; retrying every %d-%d s",
            error,
            waiting,
            self.config.reconnect_min_s,
            self.config.reconnect_max_s,
        )

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Any
    ) -> None:
        self._events.append(_Acked(mid, reason))

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self._outbox.is_shut:
            return
        self._inbound.put(message)
        if self._inbound_thread is None:  # only this (the link) thread starts it
            self._inbound_thread = threading.Thread(
                target=self._dispatch, name="mqtt-inbound", daemon=True
            )
            self._inbound_thread.start()

    # --- the link thread -------------------------------------------------------------------------

    def _post(self, event: _Event) -> None:
        self._events.append(event)
        wake = self._wake_w
        if wake is not None:
            # the pipe is full (the thread wakes anyway) or closed (stopped)
            with contextlib.suppress(OSError):
                wake.send(b"\0")

    def _take_events(self) -> list[_Event]:
        batch = []
        while True:
            try:
                batch.append(self._events.popleft())
            except IndexError:
                return batch

    def _state_payload(self, seq: int, online: bool) -> bytes:
        body = dataclasses.replace(self._state(), online=online)
        return encode(Envelope(TopicKind.STATE, self.config.device_id, seq, self._clock(), body))

    def _next_retry_delay(self) -> float:
        """paho's backoff: the minimum, doubled after each failed attempt up to the maximum."""
        delay = self._retry_delay
        delay = self.config.reconnect_min_s if delay is None else delay * 2
        self._retry_delay = min(float(delay), float(self.config.reconnect_max_s))
        return self._retry_delay

    def _connect(self, client: mqtt.Client) -> None:
        try:
            client.reconnect()  # on_pre_connect, TCP (and TLS) connect, CONNECT queued
        except _ShutOut:
            raise
        except Exception as exc:  # OSError mostly; the link keeps retrying whatever it is
            log.debug("MQTT connect failed: %s", exc)
            self._outage(f"cannot reach the MQTT broker at {self.config.host}:{self.config.port}")

    def _run(self, client: mqtt.Client) -> None:
        try:
            self._loop(client, _Flusher(self, client))
        except _ShutOut:
            pass  # stopped while this thread was stuck: it leaves the outbox alone
        except Exception:  # never expected: say so rather than die silently
            log.exception("the MQTT link thread failed; reports stay in the outbox")
        finally:
            for sock in (self._wake_r, self._wake_w):
                if sock is not None:
                    sock.close()
            self._wake_w = None

    def _loop(self, client: mqtt.Client, flusher: _Flusher) -> None:
        assert self._wake_r is not None
        wake = self._wake_r.fileno()
        keepalive_s = check_interval(self.config.keepalive)
        connect_at: float | None = time.monotonic()
        step_failed = False
        while not flusher.done and not self._outbox.is_shut:
            now = time.monotonic()
            sock = client.socket()
            if sock is None:
                attempted = connect_at is not None and now >= connect_at
                if attempted:
                    connect_at = None
                    self._connect(client)
                    sock = client.socket()
                if sock is None and connect_at is None and not flusher.stopping:
                    # a planned reconnect goes at once; after a loss or a failed attempt, back off
                    planned = flusher.reconnecting and not attempted
                    connect_at = now if planned else now + self._next_retry_delay()
            if flusher.deadline_pending:
                timeout = DEADLINE_TICK_S
            elif sock is not None:
                timeout = keepalive_s
            elif connect_at is not None:
                timeout = min(IDLE_WAKE_S, max(0.0, connect_at - time.monotonic()))
            else:
                timeout = IDLE_WAKE_S
            poller = select.poll()
            poller.register(wake, select.POLLIN)
            buffered = 0
            if sock is not None:
                pending = getattr(sock, "pending", None)  # TLS: bytes already decrypted
                buffered = pending() if pending is not None else 0
                mask = select.POLLIN | (select.POLLOUT if client.want_write() else 0)
                poller.register(sock, mask)
            if step_failed:
                timeout = min(timeout, STEP_RETRY_S)
            ready = dict(poller.poll(0 if buffered else int(timeout * 1000) + 1))
            if wake in ready:
                with contextlib.suppress(BlockingIOError):
                    self._wake_r.recv(4096)
            try:
                if sock is not None and sock is client.socket():
                    self._network(client, ready.get(sock.fileno(), 0), buffered)
                flusher.step(self._take_events())
                step_failed = False
            except _ShutOut:
                raise
            except Exception:  # keep flushing whatever happens (disk full, ...)
                log.exception("MQTT link step failed; retrying")
                step_failed = True
        if not self._outbox.is_shut:
            flusher.finish()
            self._send_what_is_queued(client)

    @staticmethod
    def _network(client: mqtt.Client, mask: int, buffered: int) -> None:
        """paho's part of a wake-up: read, write, and the keepalive."""
        if buffered or mask & (select.POLLIN | select.POLLERR | select.POLLHUP):
            client.loop_read()
        if mask & select.POLLOUT and client.socket() is not None:
            client.loop_write()
        if client.socket() is not None:
            client.loop_misc()  # the keepalive: PINGREQ, or drop a silent broker

    def _send_what_is_queued(self, client: mqtt.Client, timeout: float = 1.0) -> None:
        """After the DISCONNECT: write what paho still holds (a full socket buffer)."""
        deadline = time.monotonic() + timeout
        while (sock := client.socket()) is not None and client.want_write():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            poller = select.poll()
            poller.register(sock, select.POLLOUT)
            if poller.poll(int(left * 1000) + 1):
                client.loop_write()

    def _dispatch(self) -> None:
        while (message := self._inbound.get()) is not None:
            with self._lock:
                handlers = [
                    h
                    for f, (_, h) in self._subscriptions.items()
                    if mqtt.topic_matches_sub(f, message.topic)
                ]
            for handler in handlers:
                try:
                    handler(message.topic, bytes(message.payload))
                except Exception:
                    log.exception("handler for %s failed", message.topic)


class _Flusher:
    """The link thread's worker state: what is in flight on the current connection."""

    def __init__(self, link: MqttLink, client: mqtt.Client) -> None:
        self.link = link
        self.client = client
        self.connected = False
        self.block: _Block | None = None
        self.state_seq = 0  # last state seq used from the block
        self.inflight: dict[int, int] = {}  # mid -> seq
        self.cursor = 0  # highest seq published on this connection
        self.state_mids: set[int] = set()  # state publishes not yet acknowledged
        # the block is used up: until this monotonic deadline publish nothing new and wait for
        # the acks of what is in flight, then disconnect cleanly (see _drain_for_a_new_block)
        self.drain_until: float | None = None
        # disconnected cleanly to reconnect at once (set until the next connect)
        self.reconnecting = False
        self.stop_deadline: float | None = None
        self.offline_mid: int | None = None
        self.offline_acked = False
        self.done = False

    @property
    def deadline_pending(self) -> bool:
        """A drain or a stop is under way: its deadline needs watching."""
        return self.stop_deadline is not None or self.drain_until is not None

    @property
    def stopping(self) -> bool:
        """Stopping, and not in the middle of a planned reconnect: do not connect again."""
        return self.stop_deadline is not None and not self.reconnecting

    def step(self, batch: list[_Event]) -> None:
        acked: list[int] = []
        for event in batch:
            try:
                self._handle(event, acked)
            except _ShutOut:
                raise
            except Exception:  # one failed event must not swallow the acks after it
                log.exception("MQTT flusher could not handle %s", type(event).__name__)
        if acked:
            self.link._outbox.ack_many(acked)
        if self.connected and self.drain_until is None:
            self._fill()
        if self.connected and self.drain_until is not None:
            self._drained()
        if self.stop_deadline is not None:
            self._stopping()
        with self.link._lock:
            self.link._inflight_count = len(self.inflight)
            self.link._acked_total += len(acked)

    def _handle(self, event: _Event, acked: list[int]) -> None:
        if isinstance(event, _Acked):
            self._acked(event, acked)
        elif isinstance(event, _Connected):
            self._connected(event.block)
        elif isinstance(event, _Disconnected):
            self.connected = False
            self.inflight.clear()
            self.state_mids.clear()
            self.cursor = 0
            self.drain_until = None  # lost while draining: reconnect as after any loss
        elif isinstance(event, _Wake):
            with self.link._lock:
                self.link._wake_pending = False
        elif isinstance(event, _Resubscribe) and self.connected:
            self._subscribe(event.topic_filter)
        elif isinstance(event, _RefreshState) and self.connected:
            self._publish_state()
        elif isinstance(event, _ReserveBlock):
            block = _Block(self.link._outbox.reserve(STATE_BLOCK))
            with self.link._lock:
                self.link._next_block = block
        elif isinstance(event, _Stop):
            self.stop_deadline = event.deadline
            self.drain_until = None  # stopping: this block's will is the offline state

    def _acked(self, event: _Acked, acked: list[int]) -> None:
        if event.mid == self.offline_mid:
            self.offline_acked = True
            return
        if event.mid in self.state_mids:
            self.state_mids.discard(event.mid)
            return
        seq = self.inflight.pop(event.mid, None)
        if seq is None:
            return  # a birth, a re-sent message of an earlier connection, ...
        if event.reason is not None and event.reason.is_failure:
            # the row stays and is retried after the next reconnect
            error = f"the broker refused report seq {seq}: {event.reason}"
            with self.link._lock:
                self.link._last_error = error
            log.error("MQTT %s; check the broker's ACL and message size limit", error)
            return
        acked.append(seq)

    def _connected(self, block: _Block | None) -> None:
        self.connected = True
        self.reconnecting = False
        self.drain_until = None
        self.state_mids.clear()
        self.block = block
        self.state_seq = 0
        self.inflight.clear()
        self.cursor = 0  # re-send everything still unacknowledged, oldest first
        with self.link._lock:
            filters = list(self.link._subscriptions)
        for topic_filter in filters:
            self._subscribe(topic_filter)
        self._publish_state()

    def _subscribe(self, topic_filter: str) -> None:
        with self.link._lock:
            qos = self.link._subscriptions[topic_filter][0]
        self.client.subscribe(topic_filter, qos=qos)

    def _publish_state(self) -> None:
        block = self.block
        if block is None:
            return
        seq = block.first if self.state_seq == 0 else self.state_seq + 1
        if seq >= block.will_seq:
            self._drain_for_a_new_block()
            return
        self.state_seq = seq
        payload = self.link._state_payload(seq, online=True)
        topic = state_topic(self.link.config.device_id)
        self.state_mids.add(self.client.publish(topic, payload, qos=1, retain=True).mid)

    def _drain_for_a_new_block(self) -> None:
        """The block is used up: stop publishing and let what is in flight be acknowledged.

        Mosquitto drops a connection's will on a clean DISCONNECT, but only if it reads that
        DISCONNECT: a PUBACK it still has to write to the closed socket fails first, and it
        then treats the connection as lost and publishes the will. So the link disconnects
        only when nothing it published is unacknowledged (or after ``DRAIN_S``).
        """
        with self.link._lock:
            if self.link._closing:  # stopping: the offline state (this block's will) comes next
                return
        if self.drain_until is not None:
            return  # already under way; the new birth carries the state then current
        log.info(
            "MQTT reconnecting: the %d state seqs of this connection are used up, the next "
            "connection's birth publishes the current state",
            STATE_BLOCK,
        )
        self.drain_until = time.monotonic() + DRAIN_S

    def _drained(self) -> None:
        assert self.drain_until is not None
        if (self.inflight or self.state_mids) and time.monotonic() < self.drain_until:
            return
        with self.link._lock:
            self.link._planned_disconnect = True
        self.connected = False  # nothing more is published on this connection
        self.reconnecting = True
        self.drain_until = None
        self.inflight.clear()
        self.state_mids.clear()
        self.cursor = 0
        if self.client.disconnect() != mqtt.MQTT_ERR_SUCCESS:
            # the connection was already lost: paho reports it (an outage, logged as such)
            with self.link._lock:
                self.link._planned_disconnect = False

    def _fill(self) -> None:
        room = self.link.config.inflight_window - len(self.inflight)
        if room <= 0:
            return
        rows = self.link._outbox.peek(room, after=self.cursor)
        for row in rows:
            info = self.client.publish(row.topic, row.payload, qos=1)
            # rc NO_CONN: paho keeps it queued and the next connect re-sends from the outbox
            self.inflight[info.mid] = row.seq
            self.cursor = row.seq
        if rows:
            with self.link._lock:
                self.link._published_total += len(rows)

    def _stopping(self) -> None:
        assert self.stop_deadline is not None
        now = time.monotonic()
        if self.reconnecting and now < self.stop_deadline:
            return  # wait for the new connection: the offline state is published on it
        if not self.connected or self.block is None:
            self.done = True
            return
        if self.offline_mid is None:
            drained = not self.inflight and not self.link._outbox.peek(1, after=self.cursor)
            # leave a quarter of the time (at most 1 s) for the offline state's ack
            reserve = min(1.0, max(self.stop_deadline - now, 0.0) / 4)
            if drained or now >= self.stop_deadline - reserve:
                info = self.client.publish(
                    state_topic(self.link.config.device_id),
                    self.block.will_payload,
                    qos=1,
                    retain=True,
                )
                self.offline_mid = info.mid
        elif self.offline_acked or now >= self.stop_deadline:
            self.done = True

    def finish(self) -> None:
        """Disconnect: cleanly if the offline state was acknowledged, else with the will."""
        client = self.client
        if self.offline_acked or not self.connected:
            client.disconnect()
        else:
            # 0x04 "Disconnect with Will Message": the broker publishes the same offline state
            client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=0x04))
