"""The fleet's MQTT telemetry subscriber: durable, batched, exactly-once storage of device reports.

How it holds its promises:

* **Persistent session, stable id.** paho (callback API v2) connects with MQTT 3.1.1 and
  ``clean_session=False`` under the client id ``{mqtt.client_id}-ingest-{worker}``. Mosquitto
  2.0.11 restores 3.1.1 sessions (subscriptions and queued QoS 1 messages) after a broker
  restart, but not MQTT 5 ones, hence 3.1.1. It subscribes with QoS 1 to
  ``$share/{group}/edgefleet/v1/devices/+/...`` (Mosquitto honours shared subscriptions for
  3.1.1 clients, and keeps their queued messages across a restart too: checked in
  ``tests/fleet/test_ingest.py``) and re-subscribes on every connect.
* **Acknowledged only after commit.** The client uses paho's manual acknowledgements. The
  callbacks only put ``(topic, payload, mid)`` on a queue; the writer thread takes up to
  ``batch_max`` messages or waits ``batch_wait_ms``, stores the batch in one transaction
  (:class:`fleet.ingest_writer.BatchWriter`) and only then sends the PUBACKs, in arrival order.
  A crash between receipt and commit leaves the messages unacknowledged and the broker
  redelivers them; the store ignores a ``(device, seq)`` it has, so each report is stored once.
  An acknowledgement is only sent on the connection the message came in on: after a reconnect
  the broker redelivers whatever was in flight, and that copy is acknowledged instead.
* **Nothing crashes it.** Rejected messages are counted per reason (Prometheus
  ``edgefleet_ingest_rejected_total`` and the persistent ``ingest_counters`` table) and
  acknowledged, i.e. dropped. A database error keeps the batch and retries it with backoff,
  unacknowledged.

Flow control comes from the broker: with QoS 1 it sends at most ``max_inflight_messages``
unacknowledged messages per client, so keep ``batch_max`` at or below it (both 100 by default).

This module does not parse or store messages itself (:mod:`fleet.ingest_writer`) and answers
no queries (:mod:`fleet.telemetry`).
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode
from prometheus_client import CollectorRegistry, Counter, Histogram

from fleet.ingest_writer import KINDS, REJECT_REASONS, BatchResult, BatchWriter, Received
from fleet.settings import FleetSettings
from fleet.store import Store, connect
from protocol.messages import MAX_MESSAGE_BYTES
from protocol.topics import fleet_filters, report_filters

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


@dataclass(frozen=True)
class IngestConfig:
    """Where and how to subscribe, and how to batch."""

    host: str
    port: int
    client_id: str
    group: str = "fleet"
    shared: bool = True
    username: str | None = None
    password: str | None = None
    tls_context: ssl.SSLContext | None = None
    keepalive: int = 30
    batch_max: int = 100
    batch_wait_s: float = 0.02
    max_message_bytes: int = MAX_MESSAGE_BYTES
    reconnect_min_s: int = 1
    reconnect_max_s: int = 30

    @property
    def filters(self) -> tuple[str, ...]:
        return fleet_filters(self.group) if self.shared else report_filters()

    @classmethod
    def from_settings(cls, settings: FleetSettings) -> IngestConfig:
        m, i = settings.mqtt, settings.ingest
        return cls(
            host=m.host,
            port=m.port,
            client_id=f"{m.client_id}-ingest-{i.worker}",
            group=m.shared_group,
            shared=i.shared,
            username=m.username,
            password=m.password_value(),
            tls_context=m.tls_context(),
            keepalive=m.keepalive_seconds,
            batch_max=i.batch_max,
            batch_wait_s=i.batch_wait_ms / 1000,
            max_message_bytes=settings.limits.max_message_bytes,
        )


class IngestMetrics:
    """The ingester's Prometheus series, registered once per registry (per app)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.stored = Counter(
            "edgefleet_ingest_stored_total",
            "Device reports stored, by kind (this process)",
            ["kind"],
            registry=registry,
        )
        self.duplicates = Counter(
            "edgefleet_ingest_duplicates_total",
            "Redelivered reports ignored: (device, seq) already stored (this process)",
            registry=registry,
        )
        self.rejected = Counter(
            "edgefleet_ingest_rejected_total",
            "Device messages dropped, by reason (this process; all-time in ingest_counters)",
            ["reason"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "edgefleet_ingest_batch_size",
            "Messages per committed batch",
            buckets=(1, 5, 10, 25, 50, 100, 250, 1000),
            registry=registry,
        )
        self.write_errors = Counter(
            "edgefleet_ingest_write_errors_total",
            "Batches whose transaction failed (retried, not acknowledged)",
            registry=registry,
        )
        for kind in KINDS:
            self.stored.labels(kind)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)

    def record(self, result: BatchResult, size: int) -> None:
        for kind, n in result.stored.items():
            self.stored.labels(kind).inc(n)
        for reason, n in result.rejected.items():
            self.rejected.labels(reason).inc(n)
        if result.duplicates:
            self.duplicates.inc(result.duplicates)
        self.batch_size.observe(size)


def build_client(config: IngestConfig) -> mqtt.Client:
    """The paho client: 3.1.1, persistent session, manual acknowledgements, TLS, backoff."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=config.client_id,
        protocol=mqtt.MQTTv311,
        clean_session=False,
        manual_ack=True,
    )
    if config.username:
        client.username_pw_set(config.username, config.password)
    if config.tls_context is not None:
        client.tls_set_context(config.tls_context)
    client.reconnect_delay_set(config.reconnect_min_s, config.reconnect_max_s)
    return client


class Ingester:
    """One subscriber and its writer thread; ``start()``/``stop()``, or a context manager."""

    def __init__(
        self,
        config: IngestConfig,
        store: Store,
        metrics: IngestMetrics | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics or IngestMetrics(CollectorRegistry())
        self.clock = clock or (lambda: datetime.now(UTC))
        self.writer = BatchWriter(config.max_message_bytes)
        self._queue: queue.SimpleQueue[Received] = queue.SimpleQueue()
        self._generation = 0
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._client: mqtt.Client | None = None
        self._thread: threading.Thread | None = None
        self.batches = 0  # committed batches (for tests and the bench)

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Connect (in the background: a missing broker is an outage, retried) and start."""
        client = build_client(self.config)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"ingest-{self.config.client_id}", daemon=True
        )
        self._thread.start()
        client.connect_async(self.config.host, self.config.port, self.config.keepalive)
        client.loop_start()
        log.info(
            "ingesting from %s:%d as %s",
            self.config.host,
            self.config.port,
            self.config.client_id,
            extra={"filters": list(self.config.filters)},
        )

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking messages, store and acknowledge what was received, then disconnect."""
        client, thread = self._client, self._thread
        if client is None or thread is None:
            return
        client.on_message = None  # nothing more is queued; the broker keeps the rest
        self._stopping.set()
        thread.join(timeout)
        client.disconnect()
        client.loop_stop()
        self._client = self._thread = None
        self._connected.clear()

    def __enter__(self) -> Ingester:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- paho callbacks (network thread): hand over, never work --------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Any,
    ) -> None:
        if reason.is_failure:
            log.warning("broker refused the ingester: %s", reason)
            return
        self._generation += 1
        client.subscribe([(f, 1) for f in self.config.filters])
        self._connected.set()
        log.info(
            "ingester connected (session %s)",
            "resumed" if flags.session_present else "new",
        )

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Any,
    ) -> None:
        self._connected.clear()
        if not self._stopping.is_set():
            log.warning("ingester lost the broker (%s); reconnecting", reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._queue.put(Received(msg.topic, bytes(msg.payload), msg.mid, msg.qos, self._generation))

    # --- the writer thread ----------------------------------------------------------------------

    def _take(self) -> list[Received]:
        """Up to ``batch_max`` messages: block briefly for the first, then wait at most
        ``batch_wait_s`` for the rest."""
        try:
            first = self._queue.get(timeout=0.1)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.config.batch_wait_s
        while len(batch) < self.config.batch_max:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(self._queue.get(timeout=left))
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        db = None
        pending: list[Received] = []
        backoff = 0.05
        while True:
            if not pending:
                if self._stopping.is_set() and self._queue.empty():
                    break
                pending = self._take()
                if not pending:
                    continue
            try:
                if db is None:
                    db = connect(self.store.path, self.store.busy_timeout_ms)
                result = self.writer.write(db, pending, self.clock())
            except Exception:
                # a locked or full database, or a bug: keep the batch unacknowledged and retry
                self.metrics.write_errors.inc()
                log.exception("ingest batch of %d failed; retrying in %.2fs", len(pending), backoff)
                if db is not None:
                    db.close()
                    db = None
                if self._stopping.wait(backoff):
                    break  # stopping: the broker redelivers the unacknowledged batch
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.05
            self.batches += 1
            self.metrics.record(result, len(pending))
            self._ack(pending)
            pending = []
        if db is not None:
            db.close()

    def _ack(self, batch: list[Received]) -> None:
        client = self._client
        if client is None:
            return
        generation = self._generation
        for item in batch:
            # an ack is valid only on the connection the message arrived on; after a reconnect
            # the broker resends what was in flight, and that copy gets acknowledged
            if item.qos > 0 and item.generation == generation:
                client.ack(item.mid, item.qos)


def retire_session(config: IngestConfig, timeout: float = 10.0) -> None:
    """Delete a worker's persistent session on the broker (scaling down for good).

    A member of the shared subscription that is offline keeps receiving its share of the
    messages into its session queue; a worker id that never comes back would strand them. Run
    this after the worker was stopped (its received messages are stored): it connects once
    with ``clean_session=True`` under the worker's client id, which discards the session, its
    subscriptions and anything still queued for it, then disconnects.
    """
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=config.client_id,
        protocol=mqtt.MQTTv311,
        clean_session=True,
    )
    if config.username:
        client.username_pw_set(config.username, config.password)
    if config.tls_context is not None:
        client.tls_set_context(config.tls_context)
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    client.connect(config.host, config.port, config.keepalive)
    client.loop_start()
    try:
        if not connected.wait(timeout):
            raise TimeoutError(f"could not reach the broker to retire {config.client_id}")
    finally:
        client.disconnect()
        client.loop_stop()
