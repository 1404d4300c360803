"""The test harness itself: a real Mosquitto that carries QoS 1 without loss."""

from __future__ import annotations

import threading
import time
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from simulators.broker import MosquittoBroker


def _client(client_id: str) -> mqtt.Client:
    return mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)


def _connect(c: mqtt.Client, broker: MosquittoBroker, clean_start: bool) -> None:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    c.connect(broker.host, broker.port, clean_start=clean_start, properties=props)


def test_round_trip(broker: MosquittoBroker) -> None:
    got: list[bytes] = []
    done = threading.Event()
    sub = _client("sub-" + uuid.uuid4().hex)
    subscribed = threading.Event()
    sub.on_subscribe = lambda *a: subscribed.set()

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        got.append(msg.payload)
        done.set()

    sub.on_message = on_message
    _connect(sub, broker, True)
    sub.subscribe("edgefleet/v1/test", qos=1)
    sub.loop_start()
    assert subscribed.wait(5)
    pub = _client("pub-" + uuid.uuid4().hex)
    _connect(pub, broker, True)
    pub.loop_start()
    pub.publish("edgefleet/v1/test", b"hello", qos=1).wait_for_publish(5)
    assert done.wait(5)
    assert got == [b"hello"]
    for c in (pub, sub):
        c.disconnect()
        c.loop_stop()


def test_offline_persistent_session_keeps_more_than_1000_qos1_messages(
    broker: MosquittoBroker,
) -> None:
    """Mosquitto's default queue limit (1000) would drop most of these; our config must not."""
    n = 3000
    sub_id = "fleet-" + uuid.uuid4().hex
    sub = _client(sub_id)
    subscribed = threading.Event()
    sub.on_subscribe = lambda *a: subscribed.set()
    _connect(sub, broker, True)
    sub.subscribe("edgefleet/v1/load", qos=1)
    sub.loop_start()
    assert subscribed.wait(5)
    sub.disconnect()
    sub.loop_stop()

    pub = _client("pub-" + uuid.uuid4().hex)
    _connect(pub, broker, True)
    pub.loop_start()
    infos = [pub.publish("edgefleet/v1/load", str(i).encode(), qos=1) for i in range(n)]
    for info in infos:
        info.wait_for_publish(10)
    pub.disconnect()
    pub.loop_stop()

    seen: set[int] = set()
    all_in = threading.Event()

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        seen.add(int(msg.payload))
        if len(seen) == n:
            all_in.set()

    sub2 = _client(sub_id)
    sub2.on_message = on_message
    _connect(sub2, broker, False)  # resume the persistent session
    sub2.loop_start()
    all_in.wait(30)
    sub2.disconnect()
    sub2.loop_stop()
    assert len(seen) == n


def _client311(client_id: str) -> mqtt.Client:
    c = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv311,
        clean_session=False,
    )
    return c


def test_broker_restart_keeps_persistent_session(broker: MosquittoBroker) -> None:
    """Queued QoS 1 messages survive a broker restart for an MQTT 3.1.1 persistent session.

    Mosquitto 2.0.11 (Debian 12) does not restore MQTT 5 sessions (Session Expiry Interval)
    from its persistence file after a restart, but does restore 3.1.1 ``clean_session=False``
    sessions: that is why the fleet's ingestion subscriber connects with 3.1.1.
    """
    sub_id = "fleet-" + uuid.uuid4().hex
    sub = _client311(sub_id)
    subscribed = threading.Event()
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.connect(broker.host, broker.port)
    sub.subscribe("edgefleet/v1/persist", qos=1)
    sub.loop_start()
    assert subscribed.wait(5)
    sub.disconnect()
    sub.loop_stop()
    pub = _client("pub-" + uuid.uuid4().hex)
    _connect(pub, broker, True)
    pub.loop_start()
    pub.publish("edgefleet/v1/persist", b"kept", qos=1).wait_for_publish(5)
    pub.disconnect()
    pub.loop_stop()
    time.sleep(1.2)  # autosave_interval 1
    broker.restart()
    got: list[bytes] = []
    ev = threading.Event()

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        got.append(msg.payload)
        ev.set()

    sub2 = _client311(sub_id)
    sub2.on_message = on_message
    sub2.connect(broker.host, broker.port)
    sub2.loop_start()
    assert ev.wait(10)
    sub2.disconnect()
    sub2.loop_stop()
    assert got == [b"kept"]
