"""Settings: defaults, the TOML config file, environment variables and flags in that order of
precedence; clear errors; insecure settings refused in production."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from fleet.errors import ConfigError
from fleet.settings import load_settings, parse_duration

SECURE = """
environment = "production"
public_base_url = "https://fleet.example.com"
[broker]
host = "mqtt.example.com"
port = 8883
tls = true
[mqtt]
host = "mqtt.internal"
port = 8883
tls = true
username = "fleet"
"""


def test_defaults_suit_a_laptop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings()
    assert (s.environment, s.host, s.port) == ("development", "127.0.0.1", 8080)
    assert s.db_path == Path("edgefleet-data/fleet.db")
    assert s.tuf_dir == Path("edgefleet-data/tuf") and s.keys_dir == Path("edgefleet-data/keys")
    assert s.timestamp_expiry == timedelta(days=1)
    assert s.metrics_auth == "none"
    assert s.base_url == "http://127.0.0.1:8080"  # what devices are told, unless set


@pytest.mark.parametrize(
    ("overrides", "url"),
    [
        ({"host": "0.0.0.0", "port": 9000}, "http://127.0.0.1:9000"),
        ({"host": "fleet.lan"}, "http://fleet.lan:8080"),
        ({"host": "::1"}, "http://[::1]:8080"),
        ({"public_base_url": "https://fleet.example.com/"}, "https://fleet.example.com"),
    ],
)
def test_the_base_url_devices_are_told(overrides: dict[str, object], url: str) -> None:
    assert load_settings(**overrides).base_url == url


def test_file_then_environment_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "fleet.toml"
    config.write_text(
        'data_dir = "/srv/fleet"\nport = 9000\ntimestamp_expiry = "6h"\n'
        '[mqtt]\nhost = "from-file"\nusername = "file-user"\n[limits]\nmax_upload_bytes = 4096\n'
    )
    monkeypatch.setenv("EDGEFLEET_CONFIG", str(config))
    monkeypatch.setenv("EDGEFLEET_PORT", "9100")
    monkeypatch.setenv("EDGEFLEET_MQTT__USERNAME", "env-user")
    monkeypatch.setenv("EDGEFLEET_MQTT__PASSWORD", "from-env")
    s = load_settings(port=9200, host=None)  # None flags are "not given"
    assert s.config == config
    assert s.data_dir == Path("/srv/fleet")  # file
    assert s.timestamp_expiry == timedelta(hours=6)  # file, parsed
    assert s.limits.max_upload_bytes == 4096  # file, nested
    assert s.mqtt.host == "from-file"  # file, nested, beside env values of the same group
    assert s.mqtt.username == "env-user"  # environment beats file
    assert s.mqtt.password is not None and s.mqtt.password.get_secret_value() == "from-env"
    assert "from-env" not in repr(s)  # secrets never print
    assert s.port == 9200  # flag beats environment
    assert s.host == "127.0.0.1"


def test_an_explicit_config_path_beats_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a.toml").write_text("port = 1111\n")
    (tmp_path / "b.toml").write_text("port = 2222\n")
    monkeypatch.setenv("EDGEFLEET_CONFIG", str(tmp_path / "a.toml"))
    assert load_settings(tmp_path / "b.toml").port == 2222


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        ("port = ", "cannot be read as TOML"),
        ("prot = 1\n", "prot: Extra inputs are not permitted"),
        ("port = 70000\n", "port: Input should be less than or equal to 65535"),
        ("timestamp_expiry = 'soon'\n", "'soon' is not a duration"),
        ("environment = 'staging'\n", "environment"),
        ("[mqtt]\nshared_group = 'a/b'\n", "mqtt.shared_group"),
    ],
)
def test_bad_config_files_name_the_key(tmp_path: Path, content: str, expect: str) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=expect):
        load_settings(path)


def test_errors_name_the_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_BROKER__PORT", "0")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "EDGEFLEET_BROKER__PORT" in str(err.value)


def test_a_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_production_accepts_secure_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(SECURE)
    monkeypatch.setenv("EDGEFLEET_MQTT__PASSWORD", "a-long-real-secret")
    assert load_settings(path).environment == "production"


@pytest.mark.parametrize(
    ("override", "env_password", "expect"),
    [
        ({}, "", "mqtt.password must be a real secret"),
        ({}, "changeme", "mqtt.password must be a real secret"),
        ({}, "short", "mqtt.password must be a real secret"),
        ({"public_base_url": "http://fleet.example.com"}, "a-long-real-secret", "https://"),
    ],
)
def test_production_refuses_insecure_defaults(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    override: dict[str, str],
    env_password: str,
    expect: str,
) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(SECURE)
    if env_password:
        monkeypatch.setenv("EDGEFLEET_MQTT__PASSWORD", env_password)
    with pytest.raises(ConfigError, match=expect):
        load_settings(path, **override)


def test_production_lists_every_problem_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(environment="production")
    message = str(err.value)
    for problem in ("public_base_url", "broker.tls", "mqtt.tls", "mqtt.username", "mqtt.password"):
        assert problem in message
    assert 'environment = "development"' in message


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("30m", 1800), ("24h", 86400), ("7d", 604800), ("2w", 1209600), ("1.5h", 5400)],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)
    assert parse_duration(seconds) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "h", "24x", "-1h", "1 day", True])
def test_bad_durations_show_examples(text: object) -> None:
    with pytest.raises(ValueError, match="e.g. 90s, 30m, 24h"):
        parse_duration(text)
