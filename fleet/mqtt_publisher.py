"""The fleet's MQTT publisher: retained QoS 1 publishes that return only once the broker has
acknowledged them.

One paho client (callback API v2) per app, MQTT 3.1.1 or 5, under the stable client id
``{mqtt.client_id}-desired`` (one per fleet process: two processes with one id would keep
disconnecting each other). It connects in the background and reconnects with backoff
(``reconnect_delay_set``); the callbacks only flip a connected flag.

:meth:`MqttPublisher.publish` refuses at once, with :class:`PublishFailedError` saying which
broker is unreachable, when there is no connection: it never hands paho a message while
disconnected, because paho would keep it and send it on reconnect, possibly after a newer
document for the same topic, and a retained topic keeps the *last* message it got. A publish
whose PUBACK does not come within the timeout is a failure too. Callers keep what failed in
their own durable outbox (:mod:`fleet.desired_outbox`) and retry; this module keeps nothing.
"""

from __future__ import annotations

import logging
import ssl
import threading
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from fleet.errors import UnavailableError
from fleet.settings import FleetSettings

log = logging.getLogger(__name__)

CLIENT_SUFFIX = "-desired"


class PublishFailedError(UnavailableError):
    """The broker did not take a publish (down, unreachable, refused us, or no PUBACK in time)."""


class Publisher(Protocol):
    """What the desired-state outbox needs from a broker connection."""

    def publish(self, topic: str, payload: bytes, *, retain: bool = True) -> None:
        """Publish with QoS 1; return once acknowledged, else raise PublishFailedError."""
        ...


@dataclass(frozen=True)
class PublisherConfig:
    host: str
    port: int
    client_id: str
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    username: str | None = None
    password: str | None = None
    tls_context: ssl.SSLContext | None = None
    keepalive: int = 30
    timeout_s: float = 5.0  # PUBACK wait
    connect_wait_s: float = 1.0  # how long a publish waits for a connection being made
    reconnect_min_s: int = 1
    reconnect_max_s: int = 30

    @classmethod
    def from_settings(cls, settings: FleetSettings) -> PublisherConfig:
        m, d = settings.mqtt, settings.desired
        return cls(
            host=m.host,
            port=m.port,
            client_id=f"{m.client_id}{CLIENT_SUFFIX}",
            protocol=d.mqtt_protocol,
            username=m.username,
            password=m.password_value(),
            tls_context=m.tls_context(),
            keepalive=m.keepalive_seconds,
            timeout_s=d.publish_timeout.total_seconds(),
        )


def build_client(config: PublisherConfig) -> mqtt.Client:
    """The paho client: clean session (a publisher has no subscriptions to keep), TLS, backoff."""
    if config.protocol == "5":
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=config.client_id, protocol=mqtt.MQTTv5
        )
    else:
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
    client.reconnect_delay_set(config.reconnect_min_s, config.reconnect_max_s)
    return client


class MqttPublisher:
    """One broker connection for retained QoS 1 publishes; ``start()``/``stop()`` or ``with``."""

    def __init__(self, config: PublisherConfig) -> None:
        self.config = config
        self._client: mqtt.Client | None = None
        self._connected = threading.Event()
        self._last_problem = "not connected yet"

    @property
    def where(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    def start(self) -> None:
        """Connect in the background: a broker that is down is retried, not an error here."""
        client = build_client(self.config)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        self._client = client
        client.connect_async(self.config.host, self.config.port, self.config.keepalive)
        client.loop_start()
        log.info(
            "desired-state publisher connecting to %s as %s", self.where, self.config.client_id
        )

    def stop(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        client.disconnect()
        client.loop_stop()
        self._connected.clear()

    def __enter__(self) -> MqttPublisher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def publish(self, topic: str, payload: bytes, *, retain: bool = True) -> None:
        client = self._client
        if client is None:
            raise PublishFailedError("the MQTT publisher is not running (the app is stopping)")
        if not self._connected.wait(self.config.connect_wait_s) or not client.is_connected():
            raise PublishFailedError(
                f"the MQTT broker at {self.where} is not reachable ({self._last_problem}); the "
                "document is kept and published by the retry job once the broker is back "
                "(check the broker and the mqtt.* settings)"
            )
        info = client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise PublishFailedError(
                f"publishing to {topic} on {self.where} failed ({mqtt.error_string(info.rc)}); "
                "it is retried by the retry job"
            )
        try:
            info.wait_for_publish(self.config.timeout_s)
        except (RuntimeError, ValueError) as exc:
            raise PublishFailedError(
                f"publishing to {topic} on {self.where} failed ({exc}); it is retried"
            ) from exc
        if not info.is_published():
            raise PublishFailedError(
                f"the broker at {self.where} did not acknowledge {topic} within "
                f"{self.config.timeout_s:g}s; it is retried by the retry job"
            )

    # --- paho callbacks (network thread): record, never work ------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Any,
    ) -> None:
        if reason.is_failure:
            self._last_problem = f"the broker refused the connection: {reason}"
            log.warning("broker %s refused the desired-state publisher: %s", self.where, reason)
            return
        self._connected.set()
        log.info("desired-state publisher connected to %s", self.where)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._last_problem = "the connection attempt failed"

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Any,
    ) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self._last_problem = f"disconnected: {reason}"
        if was and self._client is not None:
            log.warning("desired-state publisher lost %s (%s); reconnecting", self.where, reason)
