"""The shipped production configs (``deploy/``): the fleet settings pass the production checks,
and the Mosquitto config runs, refuses anonymous clients, speaks only TLS and has the same
security and queue settings as the broker the tests run (``simulators.broker.render_config``).
"""

from __future__ import annotations

import getpass
import queue
import socket
import ssl
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from fleet.broker_auth import render_acl, render_passwords
from fleet.mqtt_credentials import mosquitto_hash
from fleet.settings import load_settings
from fleet.tls import TlsPaths, create_ca, issue_server_cert, write_pair
from simulators.broker import BrokerAuth, BrokerTls, MosquittoBroker, free_port, render_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SAME = (
    "per_listener_settings",
    "allow_anonymous",
    "max_queued_messages",
    "max_queued_bytes",
    "max_inflight_messages",
    "message_size_limit",
    "persistence",
    "tls_version",
    "use_username_as_clientid",
)


def directives(text: str) -> list[list[tuple[str, str]]]:
    """``[global directives, listener 1's, listener 2's, ...]`` as (key, value) pairs."""
    blocks: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        if key == "listener":
            blocks.append([])
        blocks[-1].append((key, value))
    return blocks


def test_production_fleet_settings_pass_the_production_checks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EDGEFLEET_MQTT__PASSWORD", "a-real-secret-for-the-fleet")
    settings = load_settings(DEPLOY / "fleet.toml")
    assert settings.environment == "production" and settings.broker_auth.enabled
    assert settings.base_url.startswith("https://") and settings.tls.certfile is not None


def test_the_deploy_config_has_the_security_and_queue_settings_of_the_test_broker() -> None:
    shipped = directives((DEPLOY / "mosquitto.conf").read_text())
    rendered = directives(
        render_config(
            1,
            Path("/data"),
            auth=BrokerAuth(Path("/p"), Path("/a")),
            tls=BrokerTls(Path("/ca"), Path("/c"), Path("/k")),
            fleet_port=2,
        )
    )
    assert len(shipped) == len(rendered) == 3  # globals, the device and the fleet listener
    for ours, theirs in zip(shipped, rendered, strict=True):
        assert {k: v for k, v in ours if k in SAME} == {k: v for k, v in theirs if k in SAME}
        assert {k for k, _ in ours} >= {k for k, _ in theirs} - {"log_type"}
    assert ("require_certificate", "false") in shipped[2]  # the fleet never needs a cert


def connack(port: int, context: ssl.SSLContext, user: str | None, password: str) -> ReasonCode:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="probe", protocol=mqtt.MQTTv5)
    if user:
        client.username_pw_set(user, password)
    client.tls_set_context(context)
    codes: queue.Queue[ReasonCode] = queue.Queue()
    client.on_connect = lambda c, u, f, rc, p: codes.put(rc)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        return codes.get(timeout=10)
    finally:
        client.disconnect()
        client.loop_stop()


def test_the_deploy_config_runs_tls_only_and_refuses_anonymous_clients(tmp_path: Path) -> None:
    data = tmp_path / "edgefleet"
    paths = TlsPaths(data / "tls")
    now = datetime.now(UTC)
    ca = create_ca(now)
    write_pair(paths.ca_cert, paths.ca_key, ca.cert, ca.key)
    cert, key = issue_server_cert(ca, ["127.0.0.1"], now)
    write_pair(paths.cert("broker"), paths.key("broker"), cert, key)
    (data / "broker").mkdir()
    (data / "broker" / "passwd").write_text(
        render_passwords([("edgefleet-fleet", mosquitto_hash("fleet-secret"))])
    )
    (data / "broker" / "acl").write_text(render_acl("edgefleet-fleet"))
    (data / "mosquitto").mkdir()
    devices, fleet = free_port(), free_port()
    text = (
        (DEPLOY / "mosquitto.conf")
        .read_text()
        .replace("/var/lib/edgefleet", str(data))
        .replace("/run/edgefleet", str(data))
        .replace("user edgefleet", f"user {getpass.getuser()}")
        .replace("log_dest syslog", f"log_dest file {data}/mosquitto.log")
        .replace("listener 8883 0.0.0.0", f"listener {devices} 127.0.0.1")
        .replace("listener 8884 127.0.0.1", f"listener {fleet} 127.0.0.1")
    )
    config = tmp_path / "mosquitto.conf"
    config.write_text(text)
    binary = MosquittoBroker(tmp_path / "unused").binary
    proc = subprocess.Popen([binary, "-c", str(config)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", fleet), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline
                time.sleep(0.05)
        pinned = ssl.create_default_context(cafile=str(paths.ca_cert))
        for port in (devices, fleet):
            assert not connack(port, pinned, "edgefleet-fleet", "fleet-secret").is_failure
            assert connack(port, pinned, None, "").is_failure  # anonymous
            assert connack(port, pinned, "edgefleet-fleet", "wrong").is_failure
            # plain MQTT gets no CONNACK: the listener speaks only TLS
            plain = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
            answered: list[ReasonCode] = []
            plain.on_connect = lambda c, u, f, rc, p, seen=answered: seen.append(rc)
            plain.username_pw_set("edgefleet-fleet", "fleet-secret")
            plain.connect("127.0.0.1", port)
            for _ in range(10):
                plain.loop(0.1)
            assert answered == []
    finally:
        proc.terminate()
        proc.wait(10)
