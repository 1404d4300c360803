"""The agent's configuration: the state directory's layout and ``agent.toml``.

The state directory (default ``/var/lib/edgefleet``; ``--state-dir`` or
``EDGEFLEET_AGENT_STATE_DIR`` override it) holds everything the agent keeps::

    agent.toml        this configuration (mode 0600: it holds the MQTT password)
    device.key        the device's Ed25519 private key, PEM (0600, never leaves the device)
    device.pub        its public key, PEM
    trust/root.json   the TUF root metadata pinned at provisioning
    trust/ca.pem      the fleet's TLS CA pinned at provisioning (if the fleet has one)
    tls.key, tls.pem  the device's TLS key (0600, never leaves it) and client certificate
    agent.db          SQLite: the telemetry outbox and the update state
    slots/a, slots/b  the two model slots; slots/active points at one of them

This module parses and renders ``agent.toml`` (every field type-checked, unknown keys refused so
a typo is not silently ignored) and writes it atomically. It does not enroll (that is
:mod:`agent.provision`) and does not touch the slots (:mod:`agent.slots`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.atomic import write_atomic
from agent.errors import AgentError

DEFAULT_STATE_DIR = Path("/var/lib/edgefleet")
STATE_DIR_ENV = "EDGEFLEET_AGENT_STATE_DIR"
CONFIG_FILE = "agent.toml"
NAN_POLICIES = ("reject", "allow")


class ConfigError(AgentError):
    """``agent.toml`` is missing, unreadable or malformed; the message says what to do."""


def add_state_dir_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--state-dir`` option every ``edge-agent`` command that touches the state takes."""
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        help=f"the agent's state directory (default: ${STATE_DIR_ENV} or {DEFAULT_STATE_DIR})",
    )


def resolve_state_dir(arg: str | os.PathLike[str] | None, env: Mapping[str, str]) -> Path:
    """``--state-dir`` if given, else ``$EDGEFLEET_AGENT_STATE_DIR``, else the default."""
    if arg:
        return Path(arg)
    if env.get(STATE_DIR_ENV):
        return Path(env[STATE_DIR_ENV])
    return DEFAULT_STATE_DIR


@dataclass(frozen=True)
class StatePaths:
    """Where each piece of the agent's state lives under its state directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def private_key(self) -> Path:
        return self.root / "device.key"

    @property
    def public_key(self) -> Path:
        return self.root / "device.pub"

    @property
    def trust_dir(self) -> Path:
        return self.root / "trust"

    @property
    def root_json(self) -> Path:
        return self.trust_dir / "root.json"

    @property
    def ca_cert(self) -> Path:
        return self.trust_dir / "ca.pem"

    @property
    def tls_key(self) -> Path:
        return self.root / "tls.key"

    @property
    def tls_cert(self) -> Path:
        return self.root / "tls.pem"

    @property
    def db(self) -> Path:
        return self.root / "agent.db"

    @property
    def slots(self) -> Path:
        return self.root / "slots"


@dataclass(frozen=True)
class Listen:
    """A ``host:port`` to bind an HTTP server to (``[::1]:8470`` for IPv6)."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Listen:
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(
                f"listen address {text!r} is not HOST:PORT (e.g. 127.0.0.1:8471 or [::1]:8471)"
            )
        return cls(host.removeprefix("[").removesuffix("]"), int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class DeviceConfig:
    id: str
    profile: str
    fleet_url: str
    ca_file: str = ""  # verifies an https:// fleet_url; "" = the system's CA store


@dataclass(frozen=True)
class MqttConfig:
    host: str
    port: int = 1883
    username: str = ""
    password: str = ""
    tls: bool = False
    ca_file: str = ""  # "" = the system's CA store when tls is on
    cert_file: str = ""  # client certificate for mutual TLS ("" = none)
    key_file: str = ""  # its private key
    keepalive: int = 30


@dataclass(frozen=True)
class HttpConfig:
    predict_listen: Listen = Listen("127.0.0.1", 8471)  # local applications only
    health_listen: Listen = Listen("0.0.0.0", 8470)  # field technicians on the LAN
    nan_policy: str = "reject"  # "reject": 422 naming the rows; "allow": pass to the model
    max_body_bytes: int = 4 * 1024 * 1024
    max_batch_rows: int = 4096


@dataclass(frozen=True)
class TelemetryConfig:
    heartbeat_seconds: float = 60.0
    drift_window_seconds: float = 300.0
    drift_min_rows: int = 1000
    outbox_max_rows: int = 100_000
    shutdown_flush_seconds: float = 5.0


@dataclass(frozen=True)
class AgentConfig:
    """Everything ``edge-agent run`` needs, as read from ``agent.toml`` in ``state_dir``."""

    state_dir: Path
    device: DeviceConfig
    mqtt: MqttConfig
    http: HttpConfig = field(default_factory=HttpConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)

    @property
    def paths(self) -> StatePaths:
        return StatePaths(self.state_dir)


_SECTIONS: dict[str, type] = {
    "device": DeviceConfig,
    "mqtt": MqttConfig,
    "http": HttpConfig,
    "telemetry": TelemetryConfig,
}


def _coerce(where: str, kind: Any, value: Any) -> Any:
    if kind is Listen:
        if not isinstance(value, str):
            raise ConfigError(f'{where} must be a "HOST:PORT" string, got {value!r}')
        return Listen.parse(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        raise ConfigError(f"{where} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _section(name: str, cls: type, doc: Any, source: Path) -> Any:
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: [{name}] must be a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(doc) - names)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(unknown)} in [{name}]; known keys are "
            f"{', '.join(sorted(names))}"
        )
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in doc:
            values[f.name] = _coerce(f"{source}: {name}.{f.name}", hints[f.name], doc[f.name])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing {name}.{f.name}; re-run `edge-agent provision`")
    return cls(**values)


def parse_config(state_dir: Path, data: bytes, source: Path | None = None) -> AgentConfig:
    """Parse ``agent.toml``'s bytes; ``source`` names the file in errors."""
    where = source or state_dir / CONFIG_FILE
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{where} is not valid TOML ({exc}); fix it or re-provision") from exc
    unknown = sorted(set(doc) - set(_SECTIONS))
    if unknown:
        raise ConfigError(
            f"{where}: unknown section(s) {', '.join(unknown)}; known sections are "
            f"{', '.join(_SECTIONS)}"
        )
    for required in ("device", "mqtt"):
        if required not in doc:
            raise ConfigError(f"{where}: missing [{required}]; re-run `edge-agent provision`")
    parts = {name: _section(name, cls, doc.get(name, {}), where) for name, cls in _SECTIONS.items()}
    config = AgentConfig(state_dir=state_dir, **parts)
    if config.http.nan_policy not in NAN_POLICIES:
        raise ConfigError(
            f"{where}: http.nan_policy is {config.http.nan_policy!r}; use one of "
            f"{', '.join(NAN_POLICIES)}"
        )
    for key in ("max_body_bytes", "max_batch_rows"):
        if getattr(config.http, key) <= 0:
            raise ConfigError(f"{where}: http.{key} must be positive")
    for key in ("heartbeat_seconds", "drift_window_seconds", "shutdown_flush_seconds"):
        if getattr(config.telemetry, key) <= 0:
            raise ConfigError(f"{where}: telemetry.{key} must be positive")
    return config


def load_config(state_dir: Path) -> AgentConfig:
    """Read ``agent.toml`` from ``state_dir``; a clear :class:`ConfigError` if it is missing."""
    path = StatePaths(state_dir).config
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"this device is not provisioned (no {path}); run `edge-agent provision --fleet URL "
            f"--token TOKEN` first, or pass --state-dir if the state lives elsewhere"
        ) from None
    except PermissionError:
        raise ConfigError(
            f"cannot read {path} (permission denied); run as the agent's user or root"
        ) from None
    return parse_config(state_dir, data, path)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Listen):
        value = str(value)
    # a JSON string without \/ and with raw non-ASCII is a valid TOML basic string
    return json.dumps(str(value), ensure_ascii=False)


def render_config(config: AgentConfig) -> bytes:
    """``agent.toml``'s text for ``config`` (``parse_config`` reads it back unchanged)."""
    lines = ["# edgefleet agent configuration, written by `edge-agent provision`.", ""]
    for name in _SECTIONS:
        section = getattr(config, name)
        hints = typing.get_type_hints(type(section))
        lines.append(f"[{name}]")
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if hints[f.name] is float:
                value = float(value)
            lines.append(f"{f.name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines).encode()


def save_config(config: AgentConfig) -> None:
    """Write ``agent.toml`` atomically, mode 0600 (it holds the MQTT password)."""
    write_atomic(config.paths.config, render_config(config), mode=0o600)
