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

paho's callbacks only post events to a queue; one worker thread does the work (publishing,
acknowledging rows in SQLite) and another calls the handlers of incoming messages.

It does not decide what to report (:mod:`agent.reporter`) nor verify desired documents.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import ssl
import threading
import time
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


def _loop_stop(client: mqtt.Client) -> None:
    """``client.loop_stop()``, safe when paho's network thread is ending by itself.

    After a clean DISCONNECT paho's thread clears its own ``_thread`` reference as it exits;
    if that happens between ``loop_stop``'s ``is None`` check and its ``join``, paho raises
    ``AttributeError: 'NoneType' object has no attribute 'join'``. The thread has ended then,
    which is all ``loop_stop`` waits for.
    """
    with contextlib.suppress(AttributeError):
        client.loop_stop()


class MqttLink:
    """The device's connection to the broker (see the module docstring).

    ``state`` returns the device's current :class:`StateBody` (its ``online`` field is set by
    the link); it is called on paho's network thread before each connect, so it must be cheap
    and must not block.
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
        self._outbox = outbox
        self._state = state
        self._clock = clock
        self._events: queue.Queue[_Event] = queue.Queue()
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
        self._threads: list[threading.Thread] = []

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
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        self._client = client
        self._threads = [
            threading.Thread(target=self._work, name="mqtt-flusher", daemon=True),
            threading.Thread(target=self._dispatch, name="mqtt-inbound", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        client.connect_async(
            self.config.host, self.config.port, self.config.keepalive, clean_start=True
        )
        client.loop_start()

    def notify(self) -> None:
        """Tell the flusher that new rows are in the outbox (cheap; coalesced)."""
        with self._lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        self._events.put(_Wake())

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Register ``handler(topic, payload)`` for ``topic_filter``; kept across reconnects.

        Handlers run on the link's inbound thread, one message at a time.
        """
        if not topic_filter or qos not in (0, 1, 2):
            raise LinkError(f"cannot subscribe to {topic_filter!r} with QoS {qos}")
        with self._lock:
            self._subscriptions[topic_filter] = (qos, handler)
        self._events.put(_Resubscribe(topic_filter))

    def refresh_state(self) -> None:
        """Publish the retained state again (e.g. after the active model changed).

        Up to ``STATE_BLOCK - 2`` refreshes per connection take the seqs between the birth's and
        the will's; the next one makes the link reconnect cleanly (see the module docstring), and
        the new connection's birth publishes the state then current. Several refreshes asked for
        while a reconnect is under way end up in that one birth.
        """
        self._events.put(_RefreshState())

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
        the outbox for the next start.
        """
        client = self._client
        if client is None:
            return
        with self._lock:
            self._closing = True
        self._events.put(_Stop(time.monotonic() + timeout))
        self._threads[0].join(timeout + 5)
        self._inbound.put(None)
        self._threads[1].join(5)
        _loop_stop(client)
        with self._lock:
            self._connected = False
        self._client = None

    # --- paho callbacks (network thread): record and post, nothing else ----------------------

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
            self._events.put(_ReserveBlock())
        except Exception:  # a failing callback would kill paho's thread
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
        self._events.put(_Connected(block))

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._outage(f"cannot reach the MQTT broker at {self.config.host}:{self.config.port}")

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
            self._events.put(_Disconnected())
        if was_connected and not closing and not planned:
            self._outage(f"lost the connection to the MQTT broker ({reason})")

    def _outage(self, error: str) -> None:
        with self._lock:
            self._last_error = error
            first, self._outage_logged = not self._outage_logged, True
        if first:
            log.warning(
                "%s; reports stay queued in the outbox (%d waiting) and are sent when it is "
                "back; retrying every %d-%d s",
                error,
                self._outbox.depth(),
                self.config.reconnect_min_s,
                self.config.reconnect_max_s,
            )

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Any
    ) -> None:
        self._events.put(_Acked(mid, reason))

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._inbound.put(message)

    # --- the worker thread ---------------------------------------------------------------------

    def _state_payload(self, seq: int, online: bool) -> bytes:
        body = dataclasses.replace(self._state(), online=online)
        return encode(Envelope(TopicKind.STATE, self.config.device_id, seq, self._clock(), body))

    def _work(self) -> None:
        flusher = _Flusher(self)
        while not flusher.done:
            try:
                event = self._events.get(timeout=flusher.wait_s())
                batch = [event]
                while True:
                    try:
                        batch.append(self._events.get_nowait())
                    except queue.Empty:
                        break
            except queue.Empty:
                batch = []
            try:
                flusher.step(batch)
            except Exception:  # keep flushing whatever happens (disk full, ...)
                log.exception("MQTT flusher step failed; retrying")
                time.sleep(0.5)
        flusher.finish()

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
    """The worker thread's state: what is in flight on the current connection."""

    def __init__(self, link: MqttLink) -> None:
        self.link = link
        self.connected = False
        self.block: _Block | None = None
        self.state_seq = 0  # last state seq used from the block
        self.inflight: dict[int, int] = {}  # mid -> seq
        self.cursor = 0  # highest seq published on this connection
        self.state_mids: set[int] = set()  # state publishes not yet acknowledged
        # the block is used up: until this monotonic deadline publish nothing new and wait for
        # the acks of what is in flight, then disconnect cleanly (see _drain_for_a_new_block)
        self.drain_until: float | None = None
        # disconnected cleanly: reconnect once paho's loop has ended (set until the next connect)
        self.reconnecting = False
        self.stop_deadline: float | None = None
        self.offline_mid: int | None = None
        self.offline_acked = False
        self.done = False

    @property
    def client(self) -> mqtt.Client:
        client = self.link._client
        assert client is not None
        return client

    def wait_s(self) -> float:
        return 1.0 if self.stop_deadline is None and self.drain_until is None else 0.05

    def step(self, batch: list[_Event]) -> None:
        acked: list[int] = []
        for event in batch:
            try:
                self._handle(event, acked)
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
            self.drain_until = None  # lost while draining: paho reconnects as after any loss
            if self.reconnecting:
                self._restart_loop()
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

    def _restart_loop(self) -> None:
        """After a clean DISCONNECT paho's network thread ends: start it again, connecting."""
        client = self.client
        _loop_stop(client)  # joins the ended thread (this is never paho's own thread)
        config = self.link.config
        client.connect_async(config.host, config.port, config.keepalive, clean_start=True)
        client.loop_start()

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
        client = self.link._client
        if client is None:
            return
        if self.offline_acked or not self.connected:
            client.disconnect()
        else:
            # 0x04 "Disconnect with Will Message": the broker publishes the same offline state
            client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=0x04))
