"""Broker security against a real Mosquitto run like production (TLS with the fleet CA, no
anonymous, the fleet's password and ACL files, a device listener that forces client id =
username): the attacks of one enrolled device on another are refused and change nothing; a
decommissioned device is kicked and refused at once while the others carry on; a provisioned
agent pins the fleet CA, reports over TLS (also with mutual TLS) and refuses a broker with
another CA; the fleet API serves HTTPS."""

from __future__ import annotations

import contextlib
import logging
import queue
import ssl
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID
from fastapi import FastAPI
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import AgentConfig, DeviceConfig, MqttConfig
from agent.mqtt_link import LinkConfig, MqttLink
from agent.outbox import Outbox
from agent.provision import ProvisionError, make_csr, new_tls_key, provision
from agent.reporter import Reporter
from agent.tls import https_context, mqtt_context
from fleet.broker_auth import BrokerAuthFiles, render_acl
from fleet.cli import main as fleet_main
from fleet.errors import BrokerReloadError
from fleet.server import BackgroundServer
from fleet.settings import FleetSettings, load_settings
from fleet.store import Store, connect
from fleet.tls import TlsPaths, create_ca, issue_server_cert, write_pair
from fleet.tuf_repo import TufRepository
from protocol.device_auth import public_key_hex
from protocol.messages import Envelope, HeartbeatBody, StateBody, encode
from protocol.topics import TopicKind, desired_topic, device_topic, heartbeat_topic, state_topic
from simulators.broker import BrokerAuth, BrokerTls, MosquittoBroker

FLEET_USER = "edgefleet-fleet"
FLEET_PASSWORD = "fleet-password-for-tests"
WAIT = 10.0
HOSTS = ["127.0.0.1", "localhost"]


def make_ca(directory: Path) -> TlsPaths:
    """A CA with a broker and a fleet server certificate for the loopback names."""
    paths = TlsPaths(directory)
    now = datetime.now(UTC)
    ca = create_ca(now)
    write_pair(paths.ca_cert, paths.ca_key, ca.cert, ca.key)
    for name in ("broker", "fleet"):
        cert, key = issue_server_cert(ca, HOSTS, now)
        write_pair(paths.cert(name), paths.key(name), cert, key)
    return paths


@pytest.fixture
def clock() -> Callable[[], datetime]:
    """Wall time: the certificates the fleet signs are checked against the real clock."""
    return lambda: datetime.now(UTC)


@pytest.fixture(scope="module")
def fleet_ca(tmp_path_factory: pytest.TempPathFactory) -> TlsPaths:
    return make_ca(tmp_path_factory.mktemp("fleet-ca"))


@pytest.fixture(scope="module")
def rogue_ca(tmp_path_factory: pytest.TempPathFactory) -> TlsPaths:
    return make_ca(tmp_path_factory.mktemp("rogue-ca"))


def broker_tls(paths: TlsPaths, require_certificate: bool = False) -> BrokerTls:
    return BrokerTls(paths.ca_cert, paths.cert("broker"), paths.key("broker"), require_certificate)


@pytest.fixture
def mutual_tls() -> bool:
    """Parametrised indirectly: the broker requires client certificates."""
    return False


@pytest.fixture
def broker(tmp_path: Path, fleet_ca: TlsPaths, mutual_tls: bool) -> Iterator[MosquittoBroker]:
    directory = tmp_path / "mosquitto"
    b = MosquittoBroker(
        directory,
        auth=BrokerAuth(directory / "passwd", directory / "acl"),
        tls=broker_tls(fleet_ca, mutual_tls),
    )
    yield b
    b.stop()


@pytest.fixture
def settings(tmp_path: Path, broker: MosquittoBroker, fleet_ca: TlsPaths) -> FleetSettings:
    assert broker.auth is not None
    return load_settings(
        data_dir=tmp_path / "data",
        public_base_url="http://fleet.test:8080",
        broker={"host": broker.host, "port": broker.port, "tls": True},
        mqtt={
            "host": broker.host,
            "port": broker.fleet_port,
            "tls": True,
            "ca_file": fleet_ca.ca_cert,
            "username": FLEET_USER,
            "password": FLEET_PASSWORD,
        },
        broker_auth={
            "enabled": True,
            "password_file": broker.auth.password_file,
            "acl_file": broker.auth.acl_file,
            "pid_file": broker.pid_file,
        },
        tls={"ca_file": fleet_ca.ca_cert, "ca_key_file": fleet_ca.ca_key},
        ingest={"enabled": True, "shared": True},
    )


@pytest.fixture
def secure_broker(
    app: FastAPI,
    settings: FleetSettings,
    broker: MosquittoBroker,
    tuf_repo: TufRepository,
    clock: Callable[[], datetime],
) -> MosquittoBroker:
    """The broker started on the files the fleet writes (the app has migrated the database)."""
    BrokerAuthFiles(settings, Store(settings.db_path), clock).safe_sync(clock())
    broker.start()  # no broker yet at the sync above: the reload is left pending
    return broker


@dataclass(frozen=True)
class Enrolled:
    device_id: str
    password: str


def enroll(http: httpx.Client, admin: dict[str, str], count: int) -> list[Enrolled]:
    token = http.post("/v1/enrollment-tokens", json={"uses": count}, headers=admin)
    assert token.status_code == 201, token.text
    out = []
    for _ in range(count):
        reply = http.post(
            "/v1/enroll",
            json={
                "token": token.json()["secret"],
                "public_key": public_key_hex(Ed25519PrivateKey.generate()),
                "profile": "x86_64-gateway",
                "facts": {"arch": "x86_64", "ram_mb": 512, "agent_version": "0.1.0"},
            },
        )
        assert reply.status_code == 201, reply.text
        doc = reply.json()
        assert doc["mqtt_username"] == doc["device_id"]
        out.append(Enrolled(doc["device_id"], doc["mqtt_password"]))
    return out


class Client:
    """A paho MQTT 5 client that records CONNACK, SUBACK, messages and disconnects."""

    def __init__(
        self,
        port: int,
        username: str,
        password: str,
        client_id: str = "",
        *,
        context: ssl.SSLContext,
    ) -> None:
        self.connacks: queue.Queue[ReasonCode] = queue.Queue()
        self.subacks: queue.Queue[list[ReasonCode]] = queue.Queue()
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.disconnects: queue.Queue[ReasonCode] = queue.Queue()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or username,
            protocol=mqtt.MQTTv5,
        )
        self.client.username_pw_set(username, password)
        self.client.on_connect = lambda c, u, f, rc, p: self.connacks.put(rc)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put(list(rcs))
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))
        self.client.on_disconnect = lambda c, u, f, rc, p: self.disconnects.put(rc)
        self.client.tls_set_context(context)
        self.client.reconnect_delay_set(60, 60)  # no automatic reconnect inside a test
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def connected(self) -> bool:
        """The CONNACK: True if accepted."""
        return not self.connacks.get(timeout=WAIT).is_failure

    def subscribe(self, *topics: str) -> list[ReasonCode]:
        self.client.subscribe([(t, 1) for t in topics])
        return self.subacks.get(timeout=WAIT)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(WAIT)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def pinned(fleet_ca: TlsPaths) -> ssl.SSLContext:
    """What a device that pinned the fleet CA verifies the broker with."""
    return ssl.create_default_context(cafile=str(fleet_ca.ca_cert))


@pytest.fixture
def clients(pinned: ssl.SSLContext) -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(*args: Any, **kwargs: Any) -> Client:
        kwargs.setdefault("context", pinned)
        made.append(Client(*args, **kwargs))
        return made[-1]

    yield make
    for c in made:
        c.close()


def heartbeat(device: str, seq: int) -> bytes:
    body = HeartbeatBody(1.0, 2.0, 3, 4, 5, 0, 0, seq, 0)
    return encode(Envelope(TopicKind.HEARTBEAT, device, seq, 100.0 + seq, body))


def birth(device: str, seq: int) -> bytes:
    body = StateBody(True, "9.9.9", "x86_64-gateway")
    return encode(Envelope(TopicKind.STATE, device, seq, 100.0 + seq, body))


def stored(settings: FleetSettings, device: str) -> list[int]:
    with closing(connect(settings.db_path)) as db:
        return [
            int(r[0])
            for r in db.execute(
                "SELECT seq FROM telemetry_messages WHERE device_id = ? ORDER BY seq", [device]
            )
        ]


def device_state(settings: FleetSettings, device: str) -> tuple[Any, ...] | None:
    with closing(connect(settings.db_path)) as db:
        row = db.execute(
            "SELECT online, agent_version FROM device_state WHERE device_id = ?", [device]
        ).fetchone()
        return tuple(row) if row else None


def wait_until(check: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def no_message(client: Client, seconds: float = 0.5) -> bool:
    try:
        client.messages.get(timeout=seconds)
    except queue.Empty:
        return True
    return False


def test_acl_file_lets_devices_write_only_their_reports_and_read_only_their_desired() -> None:
    acl = render_acl(FLEET_USER)
    assert "pattern read edgefleet/v1/devices/%u/desired" in acl
    assert "pattern write edgefleet/v1/devices/%u/telemetry/heartbeat" in acl
    assert "pattern write edgefleet/v1/devices/%u/desired" not in acl
    assert "topic readwrite edgefleet/v1/devices/+/desired" in acl
    for bad in ("", "a b", "a\nuser x", "#"):
        with pytest.raises(ValueError):
            render_acl(bad)


def test_anonymous_and_wrong_passwords_are_refused(
    secure_broker: MosquittoBroker,
    http: httpx.Client,
    admin: dict[str, str],
    clients: Callable[..., Client],
    pinned: ssl.SSLContext,
) -> None:
    (a,) = enroll(http, admin, 1)
    assert clients(secure_broker.port, a.device_id, a.password).connected()
    assert not clients(secure_broker.port, a.device_id, a.password + "x", "other").connected()
    anonymous = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="anon", protocol=mqtt.MQTTv5)
    codes: queue.Queue[ReasonCode] = queue.Queue()
    anonymous.on_connect = lambda c, u, f, rc, p: codes.put(rc)
    anonymous.tls_set_context(pinned)
    anonymous.connect("127.0.0.1", secure_broker.port)
    anonymous.loop_start()
    try:
        assert codes.get(timeout=WAIT).is_failure
    finally:
        anonymous.loop_stop()


def test_device_a_publishing_as_device_b_changes_nothing(
    secure_broker: MosquittoBroker,
    settings: FleetSettings,
    http: httpx.Client,
    admin: dict[str, str],
    clients: Callable[..., Client],
) -> None:
    a, b = enroll(http, admin, 2)
    victim = clients(secure_broker.port, b.device_id, b.password)
    assert victim.connected()
    assert not any(rc.is_failure for rc in victim.subscribe(desired_topic(b.device_id)))
    # B's reports, B's retained birth and a desired document for B, all sent by A (Mosquitto
    # answers a refused QoS 1 publish "not authorized", or drops the connection of a refused
    # retained one: each forgery gets its own connection)
    forgeries = [
        (heartbeat_topic(b.device_id), heartbeat(b.device_id, 1), False),
        (state_topic(b.device_id), birth(b.device_id, 2), True),
        (desired_topic(b.device_id), b'{"forged": true}', True),
    ]
    for topic, payload, retain in forgeries:
        attacker = clients(secure_broker.port, a.device_id, a.password)
        assert attacker.connected()
        with contextlib.suppress(RuntimeError):  # the broker may close the connection
            attacker.publish(topic, payload, retain=retain)
    # A's own report, sent after the forgeries: once it is stored, they have been handled
    attacker = clients(secure_broker.port, a.device_id, a.password)
    assert attacker.connected()
    attacker.publish(heartbeat_topic(a.device_id), heartbeat(a.device_id, 1))
    wait_until(lambda: stored(settings, a.device_id) == [1])
    time.sleep(0.3)
    assert stored(settings, b.device_id) == []
    assert device_state(settings, b.device_id) is None
    assert no_message(victim)  # no forged desired document reached B
    # nothing forged is retained for B either: a fresh subscriber of the fleet sees nothing
    fleet = clients(secure_broker.fleet_port, FLEET_USER, FLEET_PASSWORD, "fleet-check")
    assert fleet.connected()
    fleet.subscribe(state_topic(b.device_id), desired_topic(b.device_id))
    assert no_message(fleet)
    # B's own reports still go through
    victim.publish(heartbeat_topic(b.device_id), heartbeat(b.device_id, 1))
    wait_until(lambda: stored(settings, b.device_id) == [1])
    # a device cannot take over (and so kick) B's session with B's client id either
    impostor = clients(secure_broker.port, a.device_id, a.password, b.device_id)
    assert impostor.connected()
    assert victim.disconnects.empty()
    victim.publish(heartbeat_topic(b.device_id), heartbeat(b.device_id, 2))
    wait_until(lambda: stored(settings, b.device_id) == [1, 2])


def test_device_a_subscribing_to_device_b_receives_nothing(
    secure_broker: MosquittoBroker,
    http: httpx.Client,
    admin: dict[str, str],
    clients: Callable[..., Client],
) -> None:
    a, b = enroll(http, admin, 2)
    victim = clients(secure_broker.port, b.device_id, b.password)
    assert victim.connected()
    victim.subscribe(desired_topic(b.device_id))
    attacker = clients(secure_broker.port, a.device_id, a.password)
    assert attacker.connected()
    codes = attacker.subscribe(
        desired_topic(b.device_id),
        "edgefleet/v1/devices/+/desired",
        device_topic(b.device_id, TopicKind.HEARTBEAT),
        "#",
    )
    assert len(codes) == 4
    fleet = clients(secure_broker.fleet_port, FLEET_USER, FLEET_PASSWORD, "fleet-publisher")
    assert fleet.connected()
    fleet.publish(desired_topic(b.device_id), b'{"for": "b"}', retain=True)
    victim.publish(heartbeat_topic(b.device_id), heartbeat(b.device_id, 1))
    assert victim.messages.get(timeout=WAIT) == (desired_topic(b.device_id), b'{"for": "b"}')
    assert no_message(attacker, 0.5)
    # nor by subscribing again later, when the retained document would be sent at once
    attacker.subscribe(desired_topic(b.device_id))
    assert no_message(attacker, 0.5)


def test_a_decommissioned_device_is_kicked_and_refused_at_once(
    secure_broker: MosquittoBroker,
    settings: FleetSettings,
    http: httpx.Client,
    admin: dict[str, str],
    clients: Callable[..., Client],
) -> None:
    a, b = enroll(http, admin, 2)
    retired = clients(secure_broker.port, a.device_id, a.password)
    other = clients(secure_broker.port, b.device_id, b.password)
    assert retired.connected() and other.connected()
    other.subscribe(desired_topic(b.device_id))
    retired.publish(heartbeat_topic(a.device_id), heartbeat(a.device_id, 1))
    wait_until(lambda: stored(settings, a.device_id) == [1])

    started = time.monotonic()
    done = http.post(f"/v1/devices/{a.device_id}/decommission", headers=admin)
    assert done.status_code == 200, done.text
    retired.disconnects.get(timeout=WAIT)  # the broker closes its open connection
    kicked = time.monotonic() - started
    while True:  # the reload is asynchronous: reconnect until refused (bounded by WAIT)
        again = clients(secure_broker.port, a.device_id, a.password, f"{a.device_id}-again")
        if not again.connected():
            break
        assert time.monotonic() - started < WAIT, "a decommissioned device could reconnect"
    refused = time.monotonic() - started
    print(
        f"decommission -> kicked {kicked * 1000:.0f} ms, reconnect refused {refused * 1000:.0f} ms"
    )

    # its history stays; the other device and the fleet carry on, nothing lost
    assert stored(settings, a.device_id) == [1]
    other.publish(heartbeat_topic(b.device_id), heartbeat(b.device_id, 1))
    wait_until(lambda: stored(settings, b.device_id) == [1])
    assert other.disconnects.empty()
    fleet = clients(secure_broker.fleet_port, FLEET_USER, FLEET_PASSWORD, "fleet-publisher")
    assert fleet.connected()
    fleet.publish(desired_topic(b.device_id), b"still here", retain=True)
    assert other.messages.get(timeout=WAIT) == (desired_topic(b.device_id), b"still here")
    status = http.get("/v1/security/broker", headers=admin).json()
    assert status["enabled"] and status["users"] == 2 and status["last_error"] is None


def test_a_burst_of_enrollments_coalesces_reloads_and_every_device_connects_at_once(
    secure_broker: MosquittoBroker,
    live: str,
    admin: dict[str, str],
    clients: Callable[..., Client],
    caplog: pytest.LogCaptureFixture,
) -> None:
    count = 16
    with httpx.Client(base_url=live, timeout=30) as http:
        token = http.post("/v1/enrollment-tokens", json={"uses": count}, headers=admin).json()

    def enroll_and_connect(_: int) -> bool:
        with httpx.Client(base_url=live, timeout=30) as http:
            reply = http.post(
                "/v1/enroll",
                json={
                    "token": token["secret"],
                    "public_key": public_key_hex(Ed25519PrivateKey.generate()),
                    "profile": PROFILE,
                    "facts": FACTS,
                },
            )
        assert reply.status_code == 201, reply.text
        doc = reply.json()  # the broker must know the device as soon as enrollment returns
        return clients(secure_broker.port, doc["device_id"], doc["mqtt_password"]).connected()

    caplog.set_level(logging.INFO, logger="fleet.broker_auth")
    with ThreadPoolExecutor(8) as pool:
        connected = list(pool.map(enroll_and_connect, range(count)))
    reloads = sum(r.getMessage() == "broker reloaded" for r in caplog.records)
    print(f"{count} concurrent enrollments -> {reloads} broker reloads")
    assert all(connected)
    assert 1 <= reloads < count


def test_files_the_broker_does_not_read_are_an_error_not_silence(
    settings: FleetSettings,
    secure_broker: MosquittoBroker,
    clock: Callable[[], datetime],
    tmp_path: Path,
) -> None:
    elsewhere = settings.model_copy(
        update={
            "broker_auth": settings.broker_auth.model_copy(
                update={"password_file": tmp_path / "not-the-broker's" / "passwd"}
            )
        }
    )
    files = BrokerAuthFiles(elsewhere, Store(settings.db_path), clock)
    files.probe.timeout = 1.0
    with pytest.raises(BrokerReloadError, match="check that broker_auth.password_file"):
        files.sync(clock())
    assert files.safe_sync(clock()) is None  # retried, still failing, and said so
    assert files.last_error is not None and "password_file" in files.last_error


# --- TLS: a provisioned agent pins the fleet CA --------------------------------------------------

PROFILE = "x86_64-gateway"
FACTS = {"arch": "x86_64", "ram_mb": 512, "agent_version": "0.1.0"}


@pytest.fixture
def https_fleet(app: FastAPI, fleet_ca: TlsPaths, secure_broker: MosquittoBroker) -> Iterator[str]:
    """The fleet API over HTTPS with the fleet CA's server certificate (as ``fleet serve``)."""
    with BackgroundServer(
        app, certfile=fleet_ca.cert("fleet"), keyfile=fleet_ca.key("fleet")
    ) as server:
        yield server.url


def verify(paths: TlsPaths) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(paths.ca_cert))


def enrollment_secret(url: str, admin: dict[str, str], ca: Path, uses: int = 1) -> str:
    reply = httpx.post(
        url + "/v1/enrollment-tokens",
        json={"uses": uses},
        headers=admin,
        verify=ssl.create_default_context(cafile=str(ca)),
    )
    assert reply.status_code == 201, reply.text
    return str(reply.json()["secret"])


@dataclass
class Agent:
    """The agent's reporting path (outbox, MQTT link, reporter) built from its config."""

    config: AgentConfig
    outbox: Outbox
    link: MqttLink
    reporter: Reporter

    @classmethod
    def start(cls, config: AgentConfig, port: int | None = None) -> Agent:
        outbox = Outbox(config.paths.db, config.device.id)
        mqtt_config = config.mqtt
        link = MqttLink(
            LinkConfig(
                config.device.id,
                mqtt_config.host,
                port or mqtt_config.port,
                username=mqtt_config.username,
                password=mqtt_config.password,
                tls_context=mqtt_context(mqtt_config),
                reconnect_max_s=1,
            ),
            outbox,
            lambda: StateBody(True, "0.1.0", PROFILE),
        )
        link.start()
        return cls(config, outbox, link, Reporter(outbox, link))

    def stop(self) -> None:
        self.link.stop(1.0)
        self.outbox.close()


def test_a_provisioned_agent_pins_the_fleet_ca_and_reports_over_tls(
    mutual_tls: bool,
    settings: FleetSettings,
    https_fleet: str,
    admin: dict[str, str],
    fleet_ca: TlsPaths,
    tmp_path: Path,
) -> None:
    secret = enrollment_secret(https_fleet, admin, fleet_ca.ca_cert)
    config = provision(
        tmp_path / "device", https_fleet, secret, PROFILE, FACTS, ca_file=fleet_ca.ca_cert
    )
    paths = config.paths
    assert config.mqtt.tls and config.mqtt.ca_file == str(paths.ca_cert)
    assert config.device.ca_file == str(paths.ca_cert)
    assert paths.ca_cert.read_bytes() == fleet_ca.ca_cert.read_bytes()
    assert config.mqtt.cert_file == str(paths.tls_cert) and paths.tls_cert.exists()
    assert paths.tls_key.stat().st_mode & 0o077 == 0
    agent = Agent.start(config)
    try:
        seq = agent.reporter.report_heartbeat(HeartbeatBody(1.0, 2.0, 3, 4, 5, 0, 0, 1, 0))
        wait_until(lambda: seq in stored(settings, config.device.id))
        assert device_state(settings, config.device.id) == (1, "0.1.0")
        assert agent.link.status().connected
    finally:
        agent.stop()


def test_provisioning_over_https_needs_the_fleet_ca_and_then_pins_it(
    https_fleet: str, admin: dict[str, str], fleet_ca: TlsPaths, tmp_path: Path
) -> None:
    secret = enrollment_secret(https_fleet, admin, fleet_ca.ca_cert)
    state = tmp_path / "device"
    with pytest.raises(ProvisionError, match="does not trust .*--ca-file"):
        provision(state, https_fleet, secret, PROFILE, FACTS)
    assert not (state / "agent.toml").exists()
    config = provision(state, https_fleet, secret, PROFILE, FACTS, ca_file=fleet_ca.ca_cert)
    # later requests to the fleet verify it with the pinned CA
    https = DeviceConfig(config.device.id, PROFILE, https_fleet, config.device.ca_file)
    with urllib.request.urlopen(https_fleet + "/healthz", context=https_context(https)) as r:
        assert r.status == 200
    assert https_context(DeviceConfig("d", PROFILE, "http://fleet.test", "")) is None


def test_an_agent_refuses_a_broker_with_another_ca(
    tmp_path: Path, fleet_ca: TlsPaths, rogue_ca: TlsPaths
) -> None:
    rogue = MosquittoBroker(tmp_path / "rogue", tls=broker_tls(rogue_ca))  # anonymous
    with rogue:
        for pinned, accepted in ((fleet_ca, False), (rogue_ca, True)):
            config = AgentConfig(
                tmp_path / f"device-{accepted}",
                DeviceConfig("dev-pinned", PROFILE, "https://fleet.test"),
                MqttConfig(rogue.host, rogue.port, tls=True, ca_file=str(pinned.ca_cert)),
            )
            config.paths.root.mkdir()
            agent = Agent.start(config)
            status = agent.link.status
            try:
                if accepted:  # the control: pinning the broker's own CA connects
                    wait_until(lambda: status().connected)  # noqa: B023
                else:
                    wait_until(lambda: status().last_error is not None)  # noqa: B023
                    time.sleep(1.5)  # a few reconnect attempts
                    assert status().connects_total == 0
            finally:
                agent.stop()
    # the agent hung up in the handshake: the broker saw no client of it before the control
    log = rogue.log_path.read_text()
    assert "failed" in log.split("New client connected")[0]


def tls_refused(port: int, username: str, password: str, context: ssl.SSLContext) -> bool:
    """True if the broker refuses this client: the handshake, CONNACK, or closing at once."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=username, protocol=mqtt.MQTTv5)
    client.username_pw_set(username, password)
    client.tls_set_context(context)
    outcome: list[bool] = []
    client.on_connect = lambda c, u, f, rc, p: outcome.append(not rc.is_failure)
    client.on_disconnect = lambda c, u, f, rc, p: outcome.append(False)
    try:
        client.connect("127.0.0.1", port)
        deadline = time.monotonic() + WAIT
        while not outcome and time.monotonic() < deadline:
            client.loop(0.05)
    except (OSError, ssl.SSLError):
        return True
    finally:
        client.disconnect()
    assert outcome, "no answer from the broker"
    return not outcome[0]


@pytest.mark.parametrize("mutual_tls", [True])
def test_mutual_tls_needs_the_certificate_the_fleet_signed(
    mutual_tls: bool,
    settings: FleetSettings,
    https_fleet: str,
    admin: dict[str, str],
    fleet_ca: TlsPaths,
    rogue_ca: TlsPaths,
    secure_broker: MosquittoBroker,
    tmp_path: Path,
) -> None:
    secret = enrollment_secret(https_fleet, admin, fleet_ca.ca_cert)
    config = provision(
        tmp_path / "device", https_fleet, secret, PROFILE, FACTS, ca_file=fleet_ca.ca_cert
    )
    user, password = config.mqtt.username, config.mqtt.password
    # the right password without a certificate, or with one from another CA, is refused
    no_cert = ssl.create_default_context(cafile=str(fleet_ca.ca_cert))
    assert tls_refused(secure_broker.port, user, password, no_cert)
    rogue = ssl.create_default_context(cafile=str(fleet_ca.ca_cert))
    rogue.load_cert_chain(rogue_ca.cert("broker"), rogue_ca.key("broker"))
    assert tls_refused(secure_broker.port, user, password, rogue)
    # the device's own certificate and password: accepted, and its reports arrive
    assert not tls_refused(secure_broker.port, user, password, mqtt_context(config.mqtt))
    agent = Agent.start(config)
    try:
        seq = agent.reporter.report_heartbeat(HeartbeatBody(1.0, 2.0, 3, 4, 5, 0, 0, 1, 0))
        wait_until(lambda: seq in stored(settings, config.device.id))
    finally:
        agent.stop()
    # its certificate names the device; a decommissioned device is refused despite it
    cert = x509.load_pem_x509_certificate(config.paths.tls_cert.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == config.device.id
    done = httpx.post(
        f"{https_fleet}/v1/devices/{config.device.id}/decommission",
        headers=admin,
        verify=verify(fleet_ca),
    )
    assert done.status_code == 200
    wait_until(lambda: tls_refused(secure_broker.port, user, password, mqtt_context(config.mqtt)))


def test_a_csr_the_fleet_cannot_sign_refuses_enrollment_and_uses_nothing(
    https_fleet: str, admin: dict[str, str], fleet_ca: TlsPaths
) -> None:
    secret = enrollment_secret(https_fleet, admin, fleet_ca.ca_cert)
    body = {
        "token": secret,
        "public_key": public_key_hex(Ed25519PrivateKey.generate()),
        "profile": PROFILE,
        "facts": FACTS,
    }
    ed_csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .sign(Ed25519PrivateKey.generate(), None)
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )
    for bad in ("not a csr", ed_csr):
        reply = httpx.post(
            https_fleet + "/v1/enroll", json={**body, "tls_csr": bad}, verify=verify(fleet_ca)
        )
        assert reply.status_code == 422 and "tls_csr" in reply.text, reply.text
    good = httpx.post(
        https_fleet + "/v1/enroll",
        json={**body, "tls_csr": make_csr(new_tls_key())},
        verify=verify(fleet_ca),
    )
    assert good.status_code == 201, good.text  # the single-use token was not used up
    assert good.json()["ca_pem"] == fleet_ca.ca_cert.read_text()


def test_cli_keys_tls_creates_the_ca_once_and_issues_server_certificates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tls_dir = tmp_path / "tls"
    args = ["keys", "tls", "--tls-dir", str(tls_dir), "--broker-host", "mqtt.example.com"]
    assert fleet_main([*args, "--broker-host", "10.0.0.5", "--fleet-host", "fleet.local"]) == 0
    paths = TlsPaths(tls_dir)
    ca = paths.ca_cert.read_bytes()
    for key in (paths.ca_key, paths.key("broker"), paths.key("fleet")):
        assert key.stat().st_mode & 0o077 == 0
    broker = x509.load_pem_x509_certificate(paths.cert("broker").read_bytes())
    names = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["mqtt.example.com"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert fleet_main(args) == 0  # again: the same CA signs a new broker certificate
    assert paths.ca_cert.read_bytes() == ca
    assert "fleet CA created" in capsys.readouterr().out
    assert fleet_main(["keys", "tls", "--tls-dir", str(tls_dir)]) == 2
    assert "--broker-host" in capsys.readouterr().err
