"""Device MQTT credentials: the stored hash is Mosquitto's own format, a real Mosquitto accepts
a password file written from the registry, and a decommissioned device's line is gone from it."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner

from fleet.audit import Actor
from fleet.devices import DeviceRegistry
from fleet.enrollment import (
    DeviceEndpoints,
    EnrollmentRequest,
    EnrollmentService,
    EnrollmentTokenSpec,
)
from fleet.mqtt_credentials import (
    mosquitto_hash,
    new_password,
    password_file_line,
    verify_mosquitto_hash,
)
from fleet.server import free_port
from fleet.store import connect, migrate
from fleet.tuf_repo import ONLINE_ROLES, TufRepository
from protocol.device_auth import public_key_hex

NOW = datetime(2030, 1, 1, tzinfo=UTC)
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")


@pytest.mark.skipif(MOSQUITTO_PASSWD is None, reason="mosquitto_passwd is not installed")
def test_hashes_written_by_mosquitto_passwd_verify(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    path.write_text("")
    subprocess.run([str(MOSQUITTO_PASSWD), "-b", str(path), "dev-1", "s3cret"], check=True)
    user, encoded = path.read_text().strip().split(":", 1)
    assert user == "dev-1" and encoded.startswith("$7$")
    assert verify_mosquitto_hash("s3cret", encoded)
    assert not verify_mosquitto_hash("s3cret!", encoded)


def test_our_hashes_round_trip_and_differ_per_salt() -> None:
    password = new_password()
    a, b = mosquitto_hash(password), mosquitto_hash(password)
    assert a != b and verify_mosquitto_hash(password, a) and verify_mosquitto_hash(password, b)
    for broken in ("", "$6$1$a$b", "$7$x$a$b", "$7$1$!!$b", a + "$"):
        assert not verify_mosquitto_hash(password, broken)
    with pytest.raises(ValueError):
        password_file_line("a:b", a)


class Broker:
    """A Mosquitto that refuses anonymous clients and reads ``password_file``."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.passwords = directory / "passwords"
        self.passwords.write_text("")
        self.config = directory / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous false\n"
            f"password_file {self.passwords}\nuser {getpass.getuser()}\n"
            f"log_dest file {directory / 'mosquitto.log'}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.config)])
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                assert time.monotonic() < deadline and self.proc.poll() is None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path)
    yield b
    b.stop()


def connects(port: int, username: str, password: str) -> bool:
    outcome: list[bool] = []
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=username, protocol=mqtt.MQTTv311
    )
    client.username_pw_set(username, password)
    client.on_connect = lambda c, u, f, reason, p: outcome.append(not reason.is_failure)
    client.connect("127.0.0.1", port)
    deadline = time.monotonic() + 10
    while not outcome and time.monotonic() < deadline:
        client.loop(0.05)
    client.disconnect()
    assert outcome, "no CONNACK"
    return outcome[0]


def test_a_real_broker_accepts_registry_credentials_until_decommission(
    tmp_path: Path, broker: Broker
) -> None:
    repo = TufRepository(
        tmp_path / "tuf", {r: CryptoSigner.generate_ed25519() for r in ONLINE_ROLES}
    )
    repo.init(CryptoSigner.generate_ed25519(), NOW)
    endpoints = DeviceEndpoints("127.0.0.1", broker.port, False, "http://fleet.test")
    with closing(connect(tmp_path / "fleet.db")) as db:
        migrate(db)
        service, registry = EnrollmentService(db), DeviceRegistry(db)
        secret = service.create_token(EnrollmentTokenSpec(uses=2), Actor.cli("t"), NOW).secret
        enrolled = [
            service.enroll(
                EnrollmentRequest.model_validate(
                    {
                        "token": secret,
                        "public_key": public_key_hex(Ed25519PrivateKey.generate()),
                        "profile": "x86_64-gateway",
                        "facts": {"arch": "x86_64", "ram_mb": 512, "agent_version": "0.1.0"},
                    }
                ),
                NOW,
                repo,
                endpoints,
            )
            for _ in range(2)
        ]
        keep, retire = enrolled
        registry.decommission(retire.device_id, Actor.cli("t"), NOW)
        lines = [password_file_line(u, h) for u, h in registry.broker_credentials()]
    broker.passwords.write_text("\n".join(lines) + "\n")
    broker.start()
    assert connects(broker.port, keep.mqtt_username, keep.mqtt_password)
    assert not connects(broker.port, keep.mqtt_username, keep.mqtt_password + "x")
    assert not connects(broker.port, retire.mqtt_username, retire.mqtt_password)
