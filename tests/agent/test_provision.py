"""Provisioning: the failure sentences, re-running on a provisioned device, the unit file, and a
real enrollment against the fleet app served by uvicorn on a free port."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from securesystemslib.signer import CryptoSigner

from agent.cli import main
from agent.config import (
    AgentConfig,
    DeviceConfig,
    Listen,
    MqttConfig,
    load_config,
    save_config,
)
from agent.provision import ProvisionError, load_private_key, provision, systemd_unit
from fleet.app import create_app
from fleet.audit import Actor
from fleet.server import BackgroundServer
from fleet.settings import ENV_PREFIX, load_settings
from fleet.store import connect, migrate
from fleet.tokens import TokenService
from fleet.tuf_repo import ONLINE_ROLES, TufRepository
from protocol.device_auth import public_key_hex, sign_request
from simulators.broker import free_port

FACTS = {"arch": "x86_64", "cores": 2, "ram_mb": 4096, "board": "", "agent_version": "0.1.0"}


def unreachable() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_fleet_unreachable_is_one_sentence(tmp_path: Path) -> None:
    url = unreachable()
    with pytest.raises(ProvisionError) as err:
        provision(tmp_path / "state", url, "efe_x", "x86_64-gateway", FACTS, timeout=5)
    message = str(err.value)
    assert message.startswith(f"cannot reach the fleet manager at {url}")
    assert "check the device's network and the URL" in message
    assert "\n" not in message
    assert not (tmp_path / "state" / "agent.toml").exists()
    assert not (tmp_path / "state" / "device.key").exists()  # no key kept from a failed run


def test_bad_url_scheme(tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match="must start with http:// or https://"):
        provision(tmp_path, "fleet.example.com", "efe_x", "p", FACTS)


def _unwritable(tmp_path: Path) -> Path:
    if os.geteuid() == 0:
        return Path("/sys/edgefleet-test-state")  # sysfs refuses even root
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return locked / "state"


@pytest.mark.parametrize("kind", ["read-only", "file in the way"])
def test_state_dir_not_writable(tmp_path: Path, kind: str) -> None:
    if kind == "read-only":
        state = _unwritable(tmp_path)
    else:
        (tmp_path / "file").write_text("x")
        state = tmp_path / "file" / "state"
    with pytest.raises(ProvisionError) as err:
        # the URL is unreachable too: the directory is checked before any network call
        provision(state, unreachable(), "efe_x", "x86_64-gateway", FACTS, timeout=5)
    message = str(err.value)
    assert message.startswith(f"the state directory {state} is not writable")
    assert "run as root (sudo) or pass --state-dir DIR" in message


def provisioned(state: Path) -> AgentConfig:
    config = AgentConfig(
        state_dir=state,
        device=DeviceConfig("dev-123", "x86_64-gateway", "http://fleet.example"),
        mqtt=MqttConfig(host="broker.example", username="dev-123", password="secret"),
    )
    state.mkdir(parents=True, exist_ok=True)
    save_config(config)
    return config


def test_rerun_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    provisioned(state)
    before = snapshot(state)
    code = main(
        ["provision", "--fleet", unreachable(), "--token", "efe_x", "--state-dir", str(state)]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "already provisioned as dev-123" in out and "nothing was changed" in out
    assert "--force" in out
    assert snapshot(state) == before


def test_force_on_failure_keeps_the_old_identity(tmp_path: Path) -> None:
    state = tmp_path / "state"
    provisioned(state)
    before = snapshot(state)
    with pytest.raises(ProvisionError, match="cannot reach"):
        provision(state, unreachable(), "efe_x", "x86_64-gateway", FACTS, force=True, timeout=5)
    assert snapshot(state) == before


def test_cli_failure_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = unreachable()
    code = main(["provision", "--fleet", url, "--token", "t", "--state-dir", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and f"cannot reach the fleet manager at {url}" in err


def test_cli_needs_a_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EDGEFLEET_ENROLL_TOKEN", raising=False)
    code = main(["provision", "--fleet", "http://x", "--state-dir", str(tmp_path)])
    assert code == 2 and "no enrollment token" in capsys.readouterr().err


def test_cli_unknown_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["provision", "--fleet", "http://x", "--token", "t", "--profile", "toaster"]
        + ["--state-dir", str(tmp_path)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "no firmware profile named 'toaster'" in err and "x86_64-gateway" in err


def test_systemd_unit(tmp_path: Path) -> None:
    unit = systemd_unit(Path("/var/lib/edge fleet"), ["/opt/venv/bin/edge-agent"])
    lines = unit.splitlines()
    assert "ExecStart=/opt/venv/bin/edge-agent run --state-dir '/var/lib/edge fleet'" in lines
    for needed in (
        "Restart=always",
        "KillSignal=SIGTERM",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/edge fleet",
        "WantedBy=multi-user.target",
    ):
        assert needed in lines
    sections = [line for line in lines if line.startswith("[")]
    assert sections == ["[Unit]", "[Service]", "[Install]"]


# --- against the real fleet app, served by uvicorn on a free port -------------------------------


@dataclass
class Fleet:
    url: str
    admin: dict[str, str]
    root_json: bytes

    def token(self, uses: int = 1) -> str:
        r = httpx.post(
            self.url + "/v1/enrollment-tokens",
            json={"uses": uses, "expires_in": "1h", "note": "pytest"},
            headers=self.admin,
            timeout=10,
        )
        assert r.status_code == 201, r.text
        secret: str = r.json()["secret"]
        return secret


@pytest.fixture
def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    port = free_port()
    settings = load_settings(
        data_dir=tmp_path / "fleet",
        public_base_url=f"http://127.0.0.1:{port}",
        broker={"host": "broker.test", "port": 8883, "tls": True},
    )
    repo = TufRepository(
        settings.tuf_dir, {r: CryptoSigner.generate_ed25519() for r in ONLINE_ROLES}
    )
    repo.init(CryptoSigner.generate_ed25519(), datetime.now(UTC))
    with closing(connect(settings.db_path)) as db:
        migrate(db)
        admin = TokenService(db).create("admin", "admin", Actor.cli("pytest"), datetime.now(UTC))
    with BackgroundServer(create_app(settings), port=port) as server:
        yield Fleet(server.url, {"Authorization": f"Bearer {admin.secret}"}, repo.root_bytes())


def cli(*args: str) -> tuple[int, str, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=60
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_provision_enrolls_and_stores_the_identity(tmp_path: Path, fleet: Fleet) -> None:
    state = tmp_path / "state"
    unit = tmp_path / "edge-agent.service"
    code, out, err = cli(
        "provision",
        "--fleet",
        fleet.url,
        "--token",
        fleet.token(),
        "--state-dir",
        str(state),
        "--profile",
        "rpi4-aarch64",
        "--health-listen",
        "127.0.0.1:18470",
        "--systemd-unit",
        str(unit),
    )
    assert code == 0, err
    config = load_config(state)
    paths = config.paths
    assert f"Provisioned as {config.device.id}" in out and "edge-agent run" in out
    assert config.device.profile == "rpi4-aarch64" and config.device.fleet_url == fleet.url
    assert (config.mqtt.host, config.mqtt.port, config.mqtt.tls) == ("broker.test", 8883, True)
    assert config.mqtt.username == config.device.id and len(config.mqtt.password) >= 16
    assert config.http.health_listen == Listen("127.0.0.1", 18470)
    assert paths.root_json.read_bytes() == fleet.root_json  # pinned verbatim
    assert stat.S_IMODE(paths.private_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(paths.config.stat().st_mode) == 0o600
    assert f"--state-dir {state}" in unit.read_text()

    # the fleet registered the key made on the device: a request signed with it is accepted
    key = load_private_key(paths)
    header = sign_request(key, config.device.id, "GET", "/v1/device", time.time())
    r = httpx.get(fleet.url + "/v1/device", headers={"Authorization": header}, timeout=10)
    assert r.status_code == 200 and r.json()["id"] == config.device.id
    device = httpx.get(f"{fleet.url}/v1/devices/{config.device.id}", headers=fleet.admin).json()
    assert device["public_key"] == public_key_hex(key)
    assert device["facts"]["agent_version"] and device["facts"]["arch"]

    # again: says so, changes nothing, spends no token
    before = snapshot(state)
    code, out, _ = cli("provision", "--fleet", fleet.url, "--token", "x", "--state-dir", str(state))
    assert code == 0 and f"already provisioned as {config.device.id}" in out
    assert snapshot(state) == before

    # --force: a new identity and key; the old outbox database is set aside, not mixed in
    paths.db.write_bytes(b"old outbox")
    again = provision(state, fleet.url, fleet.token(), "rpi4-aarch64", FACTS, force=True)
    assert again.device.id != config.device.id
    assert load_private_key(paths).private_bytes_raw() != key.private_bytes_raw()
    assert not paths.db.exists()
    assert (state / f"agent.db.{config.device.id}").read_bytes() == b"old outbox"
    assert again.http.health_listen == Listen("127.0.0.1", 18470)  # local settings kept


@pytest.mark.parametrize("case", ["unknown", "used up"])
def test_token_rejected_is_one_sentence(tmp_path: Path, fleet: Fleet, case: str) -> None:
    token = "efe_not-a-real-token"
    if case == "used up":
        token = fleet.token(uses=1)
        provision(tmp_path / "first", fleet.url, token, "x86_64-gateway", FACTS)
    with pytest.raises(ProvisionError) as err:
        provision(tmp_path / "state", fleet.url, token, "x86_64-gateway", FACTS)
    message = str(err.value)
    assert message.startswith("the fleet manager refused the enrollment token (")
    assert message.endswith("; ask the fleet operator for a new token")
    assert ("used up" if case == "used up" else "not valid") in message
    assert not (tmp_path / "state" / "agent.toml").exists()


def test_fleet_validation_errors_are_passed_on(tmp_path: Path, fleet: Fleet) -> None:
    with pytest.raises(ProvisionError, match="answered 422") as err:
        provision(tmp_path / "s", fleet.url, fleet.token(), "Not A Profile!", FACTS)
    assert "profile" in str(err.value)


def test_not_a_fleet_manager(tmp_path: Path, fleet: Fleet) -> None:
    with pytest.raises(ProvisionError, match="answered 404"):
        provision(tmp_path / "s", fleet.url + "/nothing-here", "t", "x86_64-gateway", FACTS)
