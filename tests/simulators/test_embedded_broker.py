"""The embedded broker with the real parts and real paho clients of both MQTT versions: the
agent's link (MQTT 5: birth, QoS 1 reports, Last Will), the fleet's desired-document publisher
(retained, 3.1.1 and 5), the fleet's ingester (3.1.1 persistent session, shared subscription,
manual acks, a real SQLite store), and the protocol rules they rely on, refusals included."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from sqlite_utils import Database

from agent.mqtt_link import STATE_BLOCK, LinkConfig, MqttLink
from agent.outbox import Outbox
from agent.reporter import Reporter
from fleet.ingest import IngestConfig, Ingester
from fleet.ingest_writer import read_counters
from fleet.mqtt_publisher import MqttPublisher, PublisherConfig
from fleet.store import Store, connect, migrate
from protocol.messages import Envelope, HeartbeatBody, StateBody, parse_message
from protocol.topics import desired_topic, state_topic
from simulators import local_broker
from simulators.broker import BrokerError, MosquittoBroker
from simulators.embedded_broker import EmbeddedBroker, matches, split_shared
from simulators.local_broker import Broker
from simulators.telemetry_load import make_workload, publish

REPORTING_AGENT = Path(__file__).resolve().parents[1] / "agent" / "reporting_agent.py"
STATE = StateBody(online=True, agent_version="test", profile="x86-generic")
V311, V5 = mqtt.MQTTv311, mqtt.MQTTv5


@pytest.fixture
def embedded() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as broker:
        yield broker


def wait_until(check: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what or check}"
        time.sleep(0.02)


@dataclass(frozen=True)
class Got:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool


class Client:
    """A paho client that records what it receives; ``ack=False`` holds its PUBACKs back."""

    def __init__(
        self,
        broker: Broker,
        client_id: str = "",
        protocol: mqtt.MQTTProtocolVersion = V311,
        *,
        persistent: bool = False,
        ack: bool = True,
        keepalive: int = 30,
        will: tuple[str, bytes] | None = None,
        expiry: int | None = None,
    ) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"c-{uuid.uuid4().hex[:8]}",
            protocol=protocol,
            manual_ack=not ack,
            reconnect_on_failure=False,
            clean_session=None if protocol == V5 else not persistent,
        )
        self.got: list[Got] = []
        self.connack: tuple[bool, int] | None = None
        self.disconnect_reason: int | None = None
        self.granted: list[int] = []
        self.lock = threading.Lock()
        if will:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        props = None
        if protocol == V5 and expiry is not None:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = expiry
        kwargs = {"clean_start": not persistent, "properties": props} if protocol == V5 else {}
        self.client.connect(broker.host, broker.port, keepalive, **kwargs)  # type: ignore[arg-type]
        self.client.loop_start()
        wait_until(lambda: self.connack is not None, what="CONNACK")

    def _on_connect(
        self, _c: object, _u: object, flags: object, reason: object, _p: object
    ) -> None:
        self.connack = (bool(flags.session_present), reason.value)  # type: ignore[attr-defined]

    def _on_disconnect(
        self, _c: object, _u: object, _f: object, reason: object, _p: object
    ) -> None:
        self.disconnect_reason = reason.value  # type: ignore[attr-defined]

    def _on_subscribe(
        self, _c: object, _u: object, _mid: int, codes: list[ReasonCode], _p: object
    ) -> None:
        self.granted = [c.value for c in codes]

    def _on_message(self, _c: object, _u: object, m: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.got.append(Got(m.topic, bytes(m.payload), m.qos, bool(m.retain), bool(m.dup)))

    def subscribe(self, topic_filter: str, qos: int = 1) -> list[int]:
        self.granted = []
        self.client.subscribe(topic_filter, qos)
        wait_until(lambda: bool(self.granted), what="SUBACK")
        return self.granted

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos, retain).wait_for_publish(5)

    def payloads(self) -> list[bytes]:
        with self.lock:
            return [g.payload for g in self.got]

    def drop(self) -> None:
        """Lose the connection without DISCONNECT (as a crash or a pulled cable does)."""
        self.client.loop_stop()
        sock = self.client.socket()
        assert sock is not None
        sock.close()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --- the real parts -------------------------------------------------------------------------


def spawn_agent(broker: EmbeddedBroker, db: Path, device: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(REPORTING_AGENT), "--db", str(db), "--device", device]
        + ["--host", broker.host, "--port", str(broker.port), "--interval", "0.01"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def heartbeat_seqs(sub: Client) -> set[int]:
    with sub.lock:
        got = list(sub.got)
    return {parse_message(g.topic, g.payload).seq for g in got if "heartbeat" in g.topic}


def states(sub: Client, device: str) -> list[tuple[Envelope, bool]]:
    """The device's state envelopes received, each with its ``online`` flag."""
    with sub.lock:
        got = [parse_message(g.topic, g.payload) for g in sub.got if g.topic == state_topic(device)]
    return [(env, env.body.online) for env in got if isinstance(env.body, StateBody)]


def test_agent_link_delivers_qos1_reports_with_birth_and_last_will(
    embedded: EmbeddedBroker, tmp_path: Path
) -> None:
    """A real agent process (MQTT 5): retained birth, every heartbeat acknowledged (its outbox
    empties), SIGKILL -> the broker publishes its retained Last Will, which outranks the birth
    and reaches a late subscriber; a clean stop leaves one offline state, no will after it."""
    fleet = Client(embedded, "fleet", V311, persistent=True)
    fleet.subscribe("edgefleet/v1/devices/#")
    db = tmp_path / "agent.db"
    proc = spawn_agent(embedded, db, "dev-1")
    try:
        assert proc.stdout is not None
        made = [int(proc.stdout.readline()) for _ in range(30)]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        wait_until(lambda: len(states(fleet, "dev-1")) == 2, what="the Last Will")
        late = Client(embedded, "late", V5)
        late.subscribe(state_topic("dev-1"))
        wait_until(lambda: bool(late.got), what="the retained will")
        (birth, birth_online), (will, will_online) = states(fleet, "dev-1")
        assert birth_online and not will_online
        assert will.seq == birth.seq + STATE_BLOCK - 1  # the will outranks the birth
        (retained,) = late.got
        assert retained.retain and parse_message(retained.topic, retained.payload) == will

        proc = spawn_agent(embedded, db, "dev-1")  # a clean run: flush, offline, DISCONNECT
        assert proc.stdout is not None
        made += [int(proc.stdout.readline()) for _ in range(30)]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        wait_until(lambda: len(states(fleet, "dev-1")) == 4, what="birth and offline")
        # the first run's unacknowledged reports were sent by the second from its outbox
        wait_until(lambda: set(made) <= heartbeat_seqs(fleet), what="every report made")
        time.sleep(0.5)  # a will (there must be none) would arrive now
    finally:
        proc.kill()
        proc.wait()
        fleet.close()
    got = states(fleet, "dev-1")
    assert [online for _, online in got] == [True, False, True, False]
    assert [env.seq for env, _ in got] == sorted(env.seq for env, _ in got)
    assert set(made) <= heartbeat_seqs(fleet)
    assert all(g.qos == 1 for g in fleet.got)
    assert Outbox(db, "dev-1").depth() == 0  # every report acknowledged by the broker


def test_agent_link_reconnects_cleanly_for_a_new_block_without_firing_its_will(
    embedded: EmbeddedBroker, tmp_path: Path
) -> None:
    """Refreshes beyond the seq block make the link DISCONNECT cleanly (will dropped) and
    reconnect at once; reports go on; the one offline state is the stop's."""
    fleet = Client(embedded, "fleet", V311, persistent=True)
    fleet.subscribe("edgefleet/v1/devices/#")
    outbox = Outbox(tmp_path / "agent.db", "dev-2")
    link = MqttLink(LinkConfig("dev-2", embedded.host, embedded.port), outbox, lambda: STATE)
    reporter = Reporter(outbox, link)
    link.start()
    try:
        wait_until(lambda: link.status().connected, what="the link")
        for _ in range(STATE_BLOCK):
            link.refresh_state()
        wait_until(lambda: link.status().connects_total == 2, what="the planned reconnect")
        beats = [HeartbeatBody(i, 1.0, 1, 2, 3, 0, 0, i, 0) for i in range(5)]
        seqs = [reporter.report_heartbeat(beat) for beat in beats]
        wait_until(lambda: outbox.depth() == 0, what="the PUBACKs")
    finally:
        link.stop(timeout=3.0)
        outbox.close()
    wait_until(lambda: not states(fleet, "dev-2")[-1][1], what="the offline state")
    time.sleep(0.3)
    fleet.close()
    got = states(fleet, "dev-2")
    assert [online for _, online in got].count(False) == 1
    assert [env.seq for env, _ in got] == sorted(env.seq for env, _ in got)
    assert set(seqs) <= heartbeat_seqs(fleet)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_retained_desired_documents_reach_a_late_subscriber(
    embedded: EmbeddedBroker, tmp_path: Path, protocol: str
) -> None:
    """The fleet's publisher returns once the broker acknowledged; the agent's link subscribing
    later gets the last retained document, then live ones; an empty retained publish clears."""
    config = PublisherConfig(embedded.host, embedded.port, "fleet-desired", protocol=protocol)  # type: ignore[arg-type]
    with MqttPublisher(config) as publisher:
        assert publisher.wait_connected(5)
        publisher.publish(desired_topic("dev-3"), b"release-1")
        publisher.publish(desired_topic("dev-3"), b"release-2")  # replaces release-1
        publisher.publish(desired_topic("dev-4"), b"other")
        outbox = Outbox(tmp_path / "agent.db", "dev-3")
        link = MqttLink(LinkConfig("dev-3", embedded.host, embedded.port), outbox, lambda: STATE)
        got: list[bytes] = []
        link.subscribe(desired_topic("dev-3"), lambda _t, payload: got.append(payload))
        link.start()
        try:
            wait_until(lambda: got == [b"release-2"], what="the retained document")
            publisher.publish(desired_topic("dev-3"), b"release-3")
            wait_until(lambda: got == [b"release-2", b"release-3"], what="the live document")
        finally:
            link.stop(timeout=3.0)
            outbox.close()
        publisher.publish(desired_topic("dev-4"), b"")  # clears the retained document
    late = Client(embedded, protocol=V5)
    late.subscribe("edgefleet/v1/devices/+/desired")
    time.sleep(0.3)
    assert late.got == [Got(desired_topic("dev-3"), b"release-3", 1, True, False)]


# --- the fleet's ingester --------------------------------------------------------------------

DEVICES = tuple(f"dev-{i:02d}" for i in range(4))


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    path = tmp_path / "data" / "fleet.db"
    with closing(connect(path)) as db:
        migrate(db)
        for d in DEVICES:
            db.execute(
                "INSERT INTO devices (id, public_key, profile, enrolled_at, mqtt_username, status)"
                " VALUES (?, ?, 'x86-generic', '2030-01-01T00:00:00.000+00:00', ?, 'active')",
                [d, f"{d}-key", d],
            )
        db.conn.commit()
    return path


def stored(db: Database) -> list[tuple[str, int]]:
    return [(r[0], int(r[1])) for r in db.execute("SELECT device_id, seq FROM telemetry_messages")]


@pytest.mark.parametrize("shared", [True, False])
def test_ingester_stores_every_report_once_across_broker_side_reconnects(
    embedded: EmbeddedBroker, db_path: Path, shared: bool
) -> None:
    """Reports received but not committed (so not acknowledged) when the broker drops the
    ingester's connection (a broker restart), and reports published while it is away, are all
    re-sent to its persistent session; each (device, seq) is stored exactly once."""
    work = make_workload(DEVICES, 1200, malformed=0, duplicates=40, drift_every=0)
    third = len(work.messages) // 3
    config = IngestConfig(embedded.host, embedded.port, "fleet-ingest-0", shared=shared)
    with closing(connect(db_path)) as db, Ingester(config, Store(db_path)) as ingester:
        assert ingester.wait_connected(5)
        time.sleep(0.2)  # the SUBACK
        db.execute("BEGIN IMMEDIATE")  # it receives but cannot commit: nothing is acknowledged
        publish(embedded.host, embedded.port, work.messages[:third])
        time.sleep(0.3)
        embedded.restart()  # every connection dropped; sessions and queues kept
        publish(embedded.host, embedded.port, work.messages[third : 2 * third])  # while away
        db.conn.rollback()
        assert ingester.wait_connected(15)
        publish(embedded.host, embedded.port, work.messages[2 * third :])
        # counters alone could reach the total early: the uncommitted batch is stored after
        # the restart and its re-sent copies count as duplicates
        wait_until(lambda: set(stored(db)) >= work.expected, 60, "every report stored")
        time.sleep(0.3)  # anything more (there must be nothing) would show now
        rows = stored(db)
        counters = read_counters(db)
    assert len(rows) == len(set(rows))
    assert set(rows) == work.expected
    assert counters["duplicates"] >= work.duplicates  # the re-sent in-flight copies too


def test_shared_subscription_gives_each_message_to_one_member(embedded: EmbeddedBroker) -> None:
    a = Client(embedded, "a", V311, persistent=True)
    b = Client(embedded, "b", V5)
    plain = Client(embedded, "plain", V5)
    for c in (a, b):
        assert c.subscribe("$share/fleet/t/+") == [1]
    plain.subscribe("t/#")
    pub = Client(embedded, protocol=V5)
    sent = [f"m{i}".encode() for i in range(40)]
    for p in sent:
        pub.publish("t/x", p)
    wait_until(lambda: len(a.got) + len(b.got) == 40 and len(plain.got) == 40)
    time.sleep(0.2)
    assert sorted(a.payloads() + b.payloads()) == sorted(sent)
    assert a.got and b.got
    assert plain.payloads() == sent  # in order
    a.close()  # an offline persistent member: the connected one takes everything
    pub.publish("t/y", b"late")
    wait_until(lambda: b"late" in b.payloads())


# --- protocol rules ---------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [V311, V5])
def test_unacknowledged_and_queued_messages_are_resent_to_a_persistent_session(
    embedded: EmbeddedBroker, protocol: mqtt.MQTTProtocolVersion
) -> None:
    expiry = 3600 if protocol == V5 else None
    sub = Client(embedded, "ingest", protocol, persistent=True, ack=False, expiry=expiry)
    sub.subscribe("r/#")
    pub = Client(embedded, protocol=protocol)
    for i in range(3):
        pub.publish("r/x", b"m%d" % i)
    wait_until(lambda: len(sub.got) == 3)
    sub.drop()
    for i in range(3, 5):
        pub.publish("r/x", b"m%d" % i)
    again = Client(embedded, "ingest", protocol, persistent=True, expiry=expiry)
    assert again.connack == (True, 0)
    wait_until(lambda: len(again.got) == 5)
    assert again.payloads() == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    assert [g.dup for g in again.got] == [True, True, True, False, False]
    again.close()
    fresh = Client(embedded, "ingest", protocol, persistent=False)  # clean: session discarded
    assert fresh.connack == (False, 0)


def test_an_expired_mqtt5_session_is_gone(embedded: EmbeddedBroker) -> None:
    sub = Client(embedded, "short", V5, persistent=True, expiry=1)
    sub.subscribe("e/#")
    sub.close()
    Client(embedded, protocol=V5).publish("e/x", b"queued")
    back = Client(embedded, "short", V5, persistent=True, expiry=1)
    assert back.connack == (True, 0)
    wait_until(lambda: back.payloads() == [b"queued"])
    back.close()
    time.sleep(1.2)
    again = Client(embedded, "short", V5, persistent=True, expiry=1)
    assert again.connack == (False, 0)


@pytest.mark.parametrize("protocol", [V311, V5])
def test_the_will_fires_on_a_lost_connection_and_keepalive_but_not_on_disconnect(
    embedded: EmbeddedBroker, protocol: mqtt.MQTTProtocolVersion
) -> None:
    watcher = Client(embedded, protocol=V5)
    watcher.subscribe("w/#")
    Client(embedded, "clean", protocol, will=("w/clean", b"gone")).close()
    Client(embedded, "lost", protocol, will=("w/lost", b"gone")).drop()
    silent = Client(embedded, "silent", protocol, keepalive=1, will=("w/silent", b"gone"))
    silent.client.loop_stop()  # no more PINGREQ: 1.5 keepalives later the broker gives up
    wait_until(lambda: {g.topic for g in watcher.got} == {"w/lost", "w/silent"}, 5)
    late = Client(embedded, protocol=protocol)
    late.subscribe("w/#")
    time.sleep(0.2)
    assert sorted((g.topic, g.retain) for g in late.got) == [("w/lost", True), ("w/silent", True)]


def test_mqtt5_disconnect_with_will_message_publishes_it(embedded: EmbeddedBroker) -> None:
    watcher = Client(embedded, protocol=V5)
    watcher.subscribe("w/#")
    c = Client(embedded, "leaving", V5, will=("w/leaving", b"gone"))
    c.client.disconnect(reasoncode=mqtt.ReasonCode(PacketTypes.DISCONNECT, identifier=0x04))
    wait_until(lambda: watcher.payloads() == [b"gone"])


def test_retain_flags_and_qos_downgrade(embedded: EmbeddedBroker) -> None:
    pub = Client(embedded, protocol=V5)
    pub.publish("k/a", b"kept", retain=True)
    pub.publish("k/b", b"kept0", qos=0, retain=True)
    time.sleep(0.1)
    v3 = Client(embedded, protocol=V311)
    assert v3.subscribe("k/#", qos=2) == [1]  # QoS 2 granted as 1
    v5 = Client(embedded, protocol=V5)
    v5.client.subscribe("k/#", options=mqtt.SubscribeOptions(qos=1, retainAsPublished=True))
    wait_until(lambda: len(v3.got) == 2 and len(v5.got) == 2)
    assert sorted((g.topic, g.qos, g.retain) for g in v3.got) == [
        ("k/a", 1, True),
        ("k/b", 0, True),
    ]
    pub.publish("k/a", b"live", retain=True)
    wait_until(lambda: len(v3.got) == 3 and len(v5.got) == 3)
    assert v3.got[-1].retain is False  # a live message: retain cleared (3.1.1)
    assert v5.got[-1].retain is True  # Retain As Published


@pytest.mark.parametrize("protocol", [V311, V5])
def test_unsubscribe_and_clean_start_end_deliveries(
    embedded: EmbeddedBroker, protocol: mqtt.MQTTProtocolVersion
) -> None:
    sub = Client(embedded, "u", protocol, persistent=True, expiry=3600)
    sub.subscribe("u/a")
    sub.subscribe("$share/g/u/a")
    sub.subscribe("u/+")
    pub = Client(embedded, protocol=V5)
    pub.publish("u/a", b"1")  # once to the session for its plain filters, once for the group
    wait_until(lambda: len(sub.got) == 2)
    unsubscribed: list[list[int]] = []
    sub.client.on_unsubscribe = lambda _c, _u, _m, codes, _p: unsubscribed.append(
        [c.value for c in codes]
    )
    sub.client.unsubscribe(["u/+", "$share/g/u/a", "never"])
    wait_until(lambda: bool(unsubscribed))
    if protocol == V5:
        assert unsubscribed == [[0x00, 0x00, 0x11]]  # the last: no subscription existed
    pub.publish("u/a", b"2")  # the exact filter is left
    pub.publish("u/b", b"3")
    wait_until(lambda: len(sub.got) == 3)
    sub.close()
    fresh = Client(embedded, "u", protocol, persistent=False)  # clean: subscriptions gone
    pub.publish("u/a", b"4")
    time.sleep(0.2)
    assert sub.payloads() == [b"1", b"1", b"2"] and fresh.got == []


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("+/+", "a/b", True),
        ("+", "a/b", False),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("a/+/c", "a//c", True),
        ("a/b", "a/b/", False),
    ],
)
def test_topic_matching(topic_filter: str, topic: str, expected: bool) -> None:
    assert matches(topic_filter, topic) is expected
    assert mqtt.topic_matches_sub(topic_filter, topic) is expected  # paho agrees


@pytest.mark.parametrize(
    ("topic_filter", "expected"),
    [
        ("a/#", (None, "a/#")),
        ("$share/g/a/+/b", ("g", "a/+/b")),
        ("a/#/b", None),
        ("a/b#", None),
        ("a+/b", None),
        ("", None),
        ("$share/g", None),
        ("$share//a", None),
        ("$share/g+/a", None),
    ],
)
def test_filters_and_shared_filters(topic_filter: str, expected: object) -> None:
    assert split_shared(topic_filter) == expected


@pytest.mark.parametrize("protocol", [V311, V5])
def test_an_invalid_filter_is_refused_in_suback(
    embedded: EmbeddedBroker, protocol: mqtt.MQTTProtocolVersion
) -> None:
    c = Client(embedded, protocol=protocol)
    assert c.subscribe("$share/g") == [0x8F if protocol == V5 else 0x80]  # no filter
    assert c.subscribe("ok/+") == [1]  # the connection goes on


def test_mqtt5_refusals_carry_their_reason_code(embedded: EmbeddedBroker) -> None:
    qos2 = Client(embedded, protocol=V5)
    qos2.client.publish("q/x", b"x", qos=2)
    wait_until(lambda: qos2.disconnect_reason is not None)
    assert qos2.disconnect_reason == 0x9B  # QoS not supported (CONNACK said Maximum QoS 1)

    alias = Client(embedded, protocol=V5)
    props = Properties(PacketTypes.PUBLISH)
    props.TopicAlias = 1
    alias.client.publish("q/x", b"x", qos=1, properties=props)
    wait_until(lambda: alias.disconnect_reason is not None)
    assert alias.disconnect_reason == 0x94  # topic alias invalid (none allowed)

    sub_id = Client(embedded, protocol=V5)
    props = Properties(PacketTypes.SUBSCRIBE)
    props.SubscriptionIdentifier = 7
    sub_id.client.subscribe("q/#", 1, properties=props)
    wait_until(lambda: sub_id.disconnect_reason is not None)
    assert sub_id.disconnect_reason == 0xA1  # subscription identifiers not supported

    big = Client(embedded, protocol=V5)
    big.client.publish("q/x", bytes(3 * 1024 * 1024), qos=1)
    wait_until(lambda: big.disconnect_reason is not None)
    assert big.disconnect_reason == 0x95  # packet too large

    auth = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="auth", protocol=V5)
    codes: list[int] = []
    auth.on_connect = lambda _c, _u, _f, reason, _p: codes.append(reason.value)
    props = Properties(PacketTypes.CONNECT)
    props.AuthenticationMethod = "SCRAM-SHA-1"
    auth.connect(embedded.host, embedded.port, properties=props)
    auth.loop_start()
    wait_until(lambda: bool(codes))
    auth.loop_stop()
    assert codes == [0x8C]  # bad authentication method


def test_another_protocol_version_is_refused_with_connack_1(embedded: EmbeddedBroker) -> None:
    with socket.create_connection((embedded.host, embedded.port), timeout=5) as s:
        body = b"\x00\x06MQIsdp\x03\x02\x00\x1e\x00\x01x"  # MQTT 3.1
        s.sendall(bytes([0x10, len(body)]) + body)
        assert s.recv(4) == b"\x20\x02\x00\x01"  # unacceptable protocol version
        assert s.recv(1) == b""  # and closed


def test_a_takeover_closes_the_old_connection(embedded: EmbeddedBroker) -> None:
    old = Client(embedded, "same", V5)
    new = Client(embedded, "same", V5)
    wait_until(lambda: old.disconnect_reason is not None)
    assert old.disconnect_reason == 0x8E  # session taken over
    assert new.client.is_connected()


# --- the chooser ------------------------------------------------------------------------------


def test_start_broker_picks_mosquitto_when_installed(tmp_path: Path) -> None:
    broker = local_broker.start_broker(tmp_path / "mq")
    try:
        assert isinstance(broker, MosquittoBroker) and broker.running
        Client(broker, protocol=V5).close()
    finally:
        broker.stop()


def test_start_broker_falls_back_to_the_embedded_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def not_installed(*_a: object, **_k: object) -> MosquittoBroker:
        raise BrokerError("mosquitto is not installed; run ./scripts/setup")

    monkeypatch.setattr(local_broker, "MosquittoBroker", not_installed)
    with caplog.at_level(logging.INFO, logger="simulators"):
        broker = local_broker.start_broker(tmp_path / "mq")
    with broker:
        assert isinstance(broker, EmbeddedBroker) and broker.running
        assert "using the embedded MQTT broker" in caplog.text
        port = broker.port
        broker.restart()
        assert broker.port == port
        Client(broker, protocol=V311).close()
    assert not broker.running
