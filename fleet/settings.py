"""The fleet manager's settings: defaults, an optional TOML config file, environment variables.

Precedence, highest first: keyword arguments (the CLI's ``--host``/``--port`` flags), environment
variables (prefix ``EDGEFLEET_``, nested groups with ``__``: ``EDGEFLEET_MQTT__PASSWORD``), the
TOML config file named by ``config=`` / ``--config`` / ``EDGEFLEET_CONFIG``, then the defaults.
The defaults suit a laptop (loopback, no TLS); ``environment = "production"`` refuses to start
with any of them that would be insecure.

This module only describes and validates settings; it opens no database and starts nothing.
Build one with :func:`load_settings` and hand it to :func:`fleet.app.create_app`; nothing reads
settings at import time.
"""

from __future__ import annotations

import os
import re
import ssl
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from fleet.errors import ConfigError

ENV_PREFIX = "EDGEFLEET_"
CONFIG_ENV = f"{ENV_PREFIX}CONFIG"
# secrets that ship in examples and must never reach production
KNOWN_DEFAULT_SECRETS = frozenset({"", "changeme", "change-me", "password", "secret", "edgefleet"})

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*", re.IGNORECASE)
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: object) -> timedelta:
    """``"90s"``, ``"30m"``, ``"24h"``, ``"7d"``, ``"2w"``, a number of seconds, or a timedelta."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=value)
    if isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if match:
            unit = (match.group(2) or "s").lower()
            return timedelta(seconds=float(match.group(1)) * _UNITS[unit])
    raise ValueError(
        f"{value!r} is not a duration: write a number with a unit, e.g. 90s, 30m, 24h, 7d, 2w"
    )


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


class _Group(BaseModel):
    model_config = {"extra": "forbid", "frozen": True}


class BrokerSettings(_Group):
    """The MQTT broker address devices are told at enrollment (may differ from ``mqtt``)."""

    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    tls: bool = False


class MqttSettings(_Group):
    """The fleet manager's own MQTT connection (ingestion and desired-state publishing)."""

    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    tls: bool = False
    ca_file: Path | None = None
    username: str | None = None
    password: SecretStr | None = None
    client_id: str = "edgefleet-fleet"
    shared_group: str = Field(default="fleet", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    keepalive_seconds: int = Field(default=30, ge=5)

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS context for the broker connection (``ca_file`` or the system CAs), or None."""
        if not self.tls:
            return None
        return ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)

    def password_value(self) -> str | None:
        return self.password.get_secret_value() if self.password else None


class BrokerAuthSettings(_Group):
    """The broker's password and ACL files, kept by the fleet (:mod:`fleet.broker_auth`).

    When ``enabled``, ``fleet serve`` writes ``password_file`` (every active device plus the
    fleet's own ``mqtt.username``) and ``acl_file`` at start, after each enrollment and
    decommission and every ``sync_every``, and reloads the broker: SIGHUP to the pid in
    ``pid_file``, or else ``reload_command`` (an argv list, e.g.
    ``["sudo", "systemctl", "reload", "mosquitto"]``). Paths default to
    ``<data_dir>/broker/passwd`` and ``<data_dir>/broker/acl``.
    """

    enabled: bool = False
    password_file: Path | None = None
    acl_file: Path | None = None
    pid_file: Path | None = None
    reload_command: tuple[str, ...] = ()
    sync_every: Duration = timedelta(seconds=60)


class TlsSettings(_Group):
    """The fleet's TLS material (:mod:`fleet.tls`; ``fleet keys init`` creates it).

    ``ca_file`` is the CA devices pin at enrollment (default ``<data_dir>/tls/ca.pem`` when it
    exists, or an operator's CA); with ``ca_key_file`` (default ``<data_dir>/tls/ca.key``) the
    fleet signs device client certificates from their enrollment CSRs, for brokers with
    ``require_certificate true``. ``certfile``/``keyfile`` make ``fleet serve`` speak HTTPS.
    """

    ca_file: Path | None = None
    ca_key_file: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    client_cert_days: int = Field(default=825, ge=1, le=36500)


class LimitsSettings(_Group):
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, ge=1024)
    max_message_bytes: int = Field(default=256 * 1024, ge=1024)


class IngestSettings(_Group):
    """MQTT telemetry ingestion (:mod:`fleet.ingest`), run inside ``fleet serve`` when enabled.

    The subscriber's client id is ``{mqtt.client_id}-ingest-{worker}``: keep ``worker`` stable
    across restarts (the broker keeps the session's queued messages under that id) and give
    each worker process its own. Workers split the load through ``mqtt.shared_group``.
    """

    enabled: bool = False
    worker: str = Field(default="0", pattern=r"^[A-Za-z0-9_-]{1,32}$")
    shared: bool = True  # $share/{group}/... subscriptions; False: plain (one worker only)
    batch_max: int = Field(default=100, ge=1, le=10_000)  # <= the broker's max_inflight
    batch_wait_ms: int = Field(default=20, ge=0, le=10_000)


class DesiredSettings(_Group):
    """Signed desired documents (:mod:`fleet.desired_state`) and their retained publishing.

    ``expiry`` is how long a document stays valid. It is retained on the broker, so a device
    that was offline reads it when it comes back: a long expiry lets a device offline for weeks
    still act on it, a short one narrows the window in which a captured document can be
    replayed to a device that has not seen it yet (the serial already stops replays to devices
    that have). The retry job re-signs a device's current document once less than a third of
    its lifetime is left, so no retained document lapses while the fleet runs.
    """

    expiry: Duration = timedelta(days=30)
    retry_every: Duration = timedelta(seconds=30)  # the unpublished-document retry job
    publish_timeout: Duration = timedelta(seconds=5)  # wait for the broker's PUBACK
    mqtt_protocol: Literal["3.1.1", "5"] = "3.1.1"


class WebhookSettings(_Group):
    """One webhook that receives every alert (:mod:`fleet.webhooks`): JSON POSTs signed with
    HMAC-SHA256 under ``secret`` (the receiver holds the same secret to verify them)."""

    url: str = Field(pattern=r"^https?://[^\s/]+", description="http(s):// URL to POST alerts to")
    secret: SecretStr = Field(min_length=16, description="16+ characters shared with the receiver")


class AlertSettings(_Group):
    """Alert rules' thresholds (:mod:`fleet.alerts`), their jobs and webhooks.

    ``offline_after``: a device silent this long is offline. ``drift_lookback``: a device's
    drift alarm only counts its windows that ended this recently. ``fleet_window``: the length
    of the buckets whose summed counts give the fleet-wide drift verdict; ``retrain_windows``
    such buckets in a row drifted recommend retraining. A rolled-back rollout stays alerted for
    ``rollback_alert_for``.
    """

    evaluate_every: Duration = timedelta(seconds=30)
    deliver_every: Duration = timedelta(seconds=5)
    offline_after: Duration = timedelta(minutes=15)
    drift_lookback: Duration = timedelta(hours=6)
    fleet_window: Duration = timedelta(hours=1)
    retrain_windows: int = Field(default=3, ge=2, le=1000)
    rollback_alert_for: Duration = timedelta(hours=24)
    delivery_timeout: Duration = timedelta(seconds=10)
    max_attempts: int = Field(default=12, ge=1, le=100)
    webhooks: tuple[WebhookSettings, ...] = ()


class _ConfigFileSource(InitSettingsSource):
    """The TOML config file, read strictly: a named file that is missing or broken is an error."""

    def __init__(self, settings_cls: type[BaseSettings], path: str | os.PathLike[str] | None):
        super().__init__(settings_cls, _read_config(Path(path)) if path else {})


def _read_config(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} does not exist: fix --config / {CONFIG_ENV}, or leave them unset "
            "to use environment variables and defaults"
        ) from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read as TOML: {exc}") from exc


class FleetSettings(BaseSettings):
    """Everything the fleet manager needs to know; see the module docstring for precedence."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    config: Path | None = Field(default=None, description="the TOML file these settings read")
    environment: Literal["development", "production"] = "development"
    data_dir: Path = Path("edgefleet-data")
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    public_base_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s/]+",
        description="the URL devices reach the fleet at (default http://HOST:PORT)",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = True
    metrics_auth: Literal["none", "viewer"] = "none"
    broker: BrokerSettings = BrokerSettings()
    mqtt: MqttSettings = MqttSettings()
    broker_auth: BrokerAuthSettings = BrokerAuthSettings()
    tls: TlsSettings = TlsSettings()
    limits: LimitsSettings = LimitsSettings()
    ingest: IngestSettings = IngestSettings()
    desired: DesiredSettings = DesiredSettings()
    alerts: AlertSettings = AlertSettings()
    timestamp_expiry: Duration = timedelta(days=1)
    device_auth_max_skew: Duration = timedelta(minutes=5)
    db_busy_timeout_ms: int = Field(default=10_000, ge=0)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = None
        if isinstance(init_settings, InitSettingsSource):
            path = init_settings.init_kwargs.get("config")
        path = path or os.environ.get(CONFIG_ENV) or None
        return (init_settings, env_settings, _ConfigFileSource(settings_cls, path))

    @model_validator(mode="after")
    def _check_tls_and_broker_auth(self) -> FleetSettings:
        if (self.tls.certfile is None) != (self.tls.keyfile is None):
            raise ValueError("tls.certfile and tls.keyfile go together: set both for HTTPS")
        if self.broker_auth.enabled and not (self.mqtt.username and self.mqtt.password):
            raise ValueError(
                "broker_auth.enabled needs mqtt.username and mqtt.password: the fleet's own "
                "broker user, written into the broker's password file"
            )
        return self

    @model_validator(mode="after")
    def _refuse_insecure_production(self) -> FleetSettings:
        if self.environment != "production":
            return self
        problems = []
        if not (self.public_base_url or "").startswith("https://"):
            problems.append(
                "public_base_url must be set to the https:// URL devices reach "
                "(they download models from it)"
            )
        if not self.broker.tls:
            problems.append("broker.tls must be true (devices send credentials to the broker)")
        if not self.mqtt.tls:
            problems.append("mqtt.tls must be true (the fleet's own broker connection)")
        if not self.mqtt.username:
            problems.append("mqtt.username must be set (anonymous MQTT is for development)")
        password = self.mqtt.password.get_secret_value() if self.mqtt.password else ""
        if password.strip().lower() in KNOWN_DEFAULT_SECRETS or len(password) < 12:
            problems.append(
                "mqtt.password must be a real secret of 12+ characters, not empty or a default "
                f"(set {ENV_PREFIX}MQTT__PASSWORD)"
            )
        if problems:
            raise ValueError(
                "refusing insecure settings in production: "
                + "; ".join(problems)
                + ' (or set environment = "development" for a local setup)'
            )
        return self

    @property
    def base_url(self) -> str:
        """The fleet's URL as devices are told it (no trailing slash)."""
        if self.public_base_url:
            return self.public_base_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        host = f"[{host}]" if ":" in host else host
        scheme = "https" if self.tls.certfile else "http"
        return f"{scheme}://{host}:{self.port}"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "fleet.db"

    @property
    def tuf_dir(self) -> Path:
        return self.data_dir / "tuf"

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def tls_dir(self) -> Path:
        return self.data_dir / "tls"

    @property
    def ca_file(self) -> Path:
        """The CA devices pin: ``tls.ca_file`` or ``<data_dir>/tls/ca.pem``."""
        return self.tls.ca_file or self.tls_dir / "ca.pem"

    @property
    def ca_key_file(self) -> Path:
        return self.tls.ca_key_file or self.tls_dir / "ca.key"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"


def load_settings(config: Path | str | None = None, **overrides: Any) -> FleetSettings:
    """Build settings (see the module docstring); :class:`ConfigError` says what is wrong.

    ``overrides`` whose value is ``None`` are ignored, so CLI flags can be passed straight in.
    """
    kwargs = {k: v for k, v in overrides.items() if v is not None}
    if config is not None:
        kwargs["config"] = Path(config)
    try:
        return FleetSettings(**kwargs)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "settings"
            env = ENV_PREFIX + "__".join(str(p) for p in err["loc"]).upper()
            hint = f" (config key {where!r} or {env})" if err["loc"] else ""
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {msg}{hint}")
        raise ConfigError("invalid settings: " + "; ".join(lines)) from None
