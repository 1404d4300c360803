"""agent.toml: round trip, every kind of mistake named, atomic 0600 writes, state-dir choice."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent.config import (
    DEFAULT_STATE_DIR,
    STATE_DIR_ENV,
    AgentConfig,
    ConfigError,
    DeviceConfig,
    HttpConfig,
    Listen,
    MqttConfig,
    TelemetryConfig,
    load_config,
    parse_config,
    render_config,
    resolve_state_dir,
    save_config,
)


def sample(state_dir: Path) -> AgentConfig:
    return AgentConfig(
        state_dir=state_dir,
        device=DeviceConfig(id="gw-0001", profile="x86_64-gateway", fleet_url="http://fleet:8000"),
        mqtt=MqttConfig(host="broker.local", port=8883, username="gw-0001", password='p"w\\é\n'),
        http=HttpConfig(predict_listen=Listen("::1", 9000), nan_policy="allow"),
        telemetry=TelemetryConfig(heartbeat_seconds=15, drift_min_rows=50),
    )


def test_round_trip(tmp_path: Path) -> None:
    config = sample(tmp_path)
    save_config(config)
    assert load_config(tmp_path) == config
    assert stat.S_IMODE(os.stat(tmp_path / "agent.toml").st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name != "agent.toml"]  # no temp file left


def test_defaults_fill_missing_sections(tmp_path: Path) -> None:
    text = b'[device]\nid = "d1"\nprofile = "p"\nfleet_url = "http://f"\n[mqtt]\nhost = "b"\n'
    config = parse_config(tmp_path, text)
    assert config.http.predict_listen == Listen("127.0.0.1", 8471)
    assert config.http.health_listen == Listen("0.0.0.0", 8470)
    assert config.mqtt.port == 1883 and config.telemetry.heartbeat_seconds == 60.0


def test_int_accepted_for_float(tmp_path: Path) -> None:
    text = render_config(sample(tmp_path)).replace(
        b"heartbeat_seconds = 15.0", b"heartbeat_seconds = 15"
    )
    assert parse_config(tmp_path, text).telemetry.heartbeat_seconds == 15.0


@pytest.mark.parametrize(
    ("old", "new", "says"),
    [
        (b"port = 8883", b'port = "8883"', "mqtt.port must be int"),
        (b"tls = false", b"tls = 0", "mqtt.tls must be bool"),
        (b"port = 8883", b"port = true", "mqtt.port must be int"),
        (b"port = 8883", b"prot = 8883", "unknown key(s) prot"),
        (b'nan_policy = "allow"', b'nan_policy = "zero"', "nan_policy is 'zero'"),
        (b'predict_listen = "[::1]:9000"', b'predict_listen = "localhost"', "is not HOST:PORT"),
        (b'predict_listen = "[::1]:9000"', b'predict_listen = ":70000"', "is not HOST:PORT"),
        (b"[telemetry]", b"[telemetri]", "unknown section(s) telemetri"),
        (b'id = "gw-0001"\n', b"", "missing device.id"),
        (b"max_body_bytes = 4194304", b"max_body_bytes = 0", "must be positive"),
        (b"heartbeat_seconds = 15.0", b"heartbeat_seconds = -1.0", "must be positive"),
        (b"[mqtt]", b"[mqtt", "not valid TOML"),
    ],
)
def test_mistakes_are_named(tmp_path: Path, old: bytes, new: bytes, says: str) -> None:
    text = render_config(sample(tmp_path))
    assert old in text
    with pytest.raises(ConfigError, match=None) as err:
        parse_config(tmp_path, text.replace(old, new))
    assert says in str(err.value)


def test_missing_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing \[mqtt\]"):
        parse_config(tmp_path, b'[device]\nid = "d"\nprofile = "p"\nfleet_url = "u"\n')


def test_not_provisioned_says_how(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not provisioned.*edge-agent provision"):
        load_config(tmp_path)


def test_replace_is_atomic_and_keeps_mode(tmp_path: Path) -> None:
    save_config(sample(tmp_path))
    os.chmod(tmp_path / "agent.toml", 0o644)
    changed = sample(tmp_path)
    changed = AgentConfig(
        state_dir=tmp_path,
        device=changed.device,
        mqtt=MqttConfig(host="other", password="new"),
    )
    save_config(changed)
    assert load_config(tmp_path).mqtt.host == "other"
    assert stat.S_IMODE(os.stat(tmp_path / "agent.toml").st_mode) == 0o600


@pytest.mark.parametrize(
    ("arg", "env", "expected"),
    [
        ("/x", {STATE_DIR_ENV: "/y"}, Path("/x")),
        (None, {STATE_DIR_ENV: "/y"}, Path("/y")),
        (None, {}, DEFAULT_STATE_DIR),
        (None, {STATE_DIR_ENV: ""}, DEFAULT_STATE_DIR),
    ],
)
def test_state_dir_choice(arg: str | None, env: dict[str, str], expected: Path) -> None:
    assert resolve_state_dir(arg, env) == expected


@pytest.mark.parametrize(
    ("text", "listen"),
    [("127.0.0.1:8471", Listen("127.0.0.1", 8471)), ("[::]:80", Listen("::", 80))],
)
def test_listen(text: str, listen: Listen) -> None:
    assert Listen.parse(text) == listen
    assert str(listen) == text
