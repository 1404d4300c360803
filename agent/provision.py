"""Provisioning: make the device's key, enroll with the fleet manager, store what comes back.

``edge-agent provision`` calls :func:`provision`, which

1. refuses to touch a provisioned device unless ``force`` (re-running is harmless);
2. checks that the state directory is writable before anything else;
3. makes an Ed25519 key pair in memory (the private key never leaves the device);
4. ``POST {fleet}/v1/enroll`` with the enrollment token, the public key, the firmware profile
   and the machine's facts (``urllib``: no HTTP library on the device);
5. writes, each atomically, ``device.key`` (0600), ``device.pub``, ``trust/root.json`` (the TUF
   root to pin, verbatim), ``trust/ca.pem`` (the fleet's TLS CA to pin, if it has one),
   ``tls.key``/``tls.pem`` (the device's TLS key, whose CSR went with the enrollment, and the
   client certificate the fleet signed, if it did) and finally ``agent.toml`` (0600), whose
   presence is what "provisioned" means, so a failure at any step leaves the previous state (or
   none) intact.

Every failure is one :class:`ProvisionError` sentence that says what to do: the fleet is
unreachable, the token was refused, the state directory is not writable, the reply is not an
enrollment. :func:`systemd_unit` renders a hardened unit file for ``edge-agent run``.

It does not connect to MQTT, install models or start the agent.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import ssl
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from agent.atomic import write_atomic
from agent.config import (
    AgentConfig,
    ConfigError,
    DeviceConfig,
    HttpConfig,
    Listen,
    MqttConfig,
    StatePaths,
    TelemetryConfig,
    load_config,
    save_config,
)
from agent.errors import AgentError
from protocol.device_auth import public_key_hex
from protocol.profiles import MachineFacts
from protocol.topics import is_device_id

log = logging.getLogger(__name__)

ENROLL_PATH = "/v1/enroll"


class ProvisionError(AgentError):
    """Provisioning failed; nothing on the device was changed. The message says what to do."""


class AlreadyProvisionedError(ProvisionError):
    """The device is provisioned and ``--force`` was not given."""


@dataclass(frozen=True)
class EnrollmentReply:
    """What ``POST /v1/enroll`` answers (the fleet's ``Enrollment``)."""

    device_id: str
    mqtt_username: str
    mqtt_password: str
    broker_host: str
    broker_port: int
    broker_tls: bool
    fleet_url: str
    root_json: str  # the exact text of root.json
    ca_pem: str | None = None  # the fleet's TLS CA to pin
    client_cert_pem: str | None = None  # the client certificate for our TLS key

    @classmethod
    def from_json(cls, data: bytes, url: str) -> EnrollmentReply:
        try:
            doc = json.loads(data)
            reply = cls(
                device_id=str(doc["device_id"]),
                mqtt_username=str(doc["mqtt_username"]),
                mqtt_password=str(doc["mqtt_password"]),
                broker_host=str(doc["broker_host"]),
                broker_port=int(doc["broker_port"]),
                broker_tls=bool(doc["broker_tls"]),
                fleet_url=str(doc["fleet_url"]),
                root_json=str(doc["root_json"]),
                ca_pem=_optional_pem(doc.get("ca_pem"), "CERTIFICATE"),
                client_cert_pem=_optional_pem(doc.get("client_cert_pem"), "CERTIFICATE"),
            )
            json.loads(reply.root_json)
        except (ValueError, KeyError, TypeError) as exc:
            raise ProvisionError(
                f"the answer of {url} is not an enrollment ({type(exc).__name__}: {exc}); check "
                "that the URL is the edgefleet fleet manager's"
            ) from None
        if not is_device_id(reply.device_id):
            raise ProvisionError(
                f"the fleet manager at {url} assigned the invalid device id {reply.device_id!r}; "
                "report this to the fleet operator"
            )
        return reply


def new_tls_key() -> ec.EllipticCurvePrivateKey:
    """The device's TLS key for mutual TLS (ECDSA P-256, as every broker's OpenSSL accepts)."""
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: ec.EllipticCurvePrivateKey) -> str:
    """The PEM certificate request sent at enrollment (the fleet sets the subject itself)."""
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "edgefleet-device")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(Encoding.PEM).decode()


def _optional_pem(value: object, label: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or f"-----BEGIN {label}-----" not in value:
        raise ValueError(f"expected a PEM {label.lower()}, got {str(value)[:40]!r}")
    return value


def device_facts(facts: MachineFacts, agent_version: str, runtimes: list[str]) -> dict[str, Any]:
    """The ``facts`` of the enrollment request."""
    return {
        "arch": facts.arch,
        "cores": facts.cores,
        "ram_mb": max(1, facts.ram_mb),
        "board": facts.board[:256],
        "agent_version": agent_version,
        "runtimes": runtimes,
    }


def _check_writable(paths: StatePaths) -> None:
    hint = "run as root (sudo) or pass --state-dir DIR to use another directory"
    try:
        paths.root.mkdir(parents=True, exist_ok=True)
        probe = paths.root / f".write-test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ProvisionError(
            f"the state directory {paths.root} is not writable ({exc.strerror}); {hint}"
        ) from None


def _error_detail(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        return body[:200].decode(errors="replace").strip()
    if isinstance(doc, dict):
        for key in ("detail", "error", "message"):
            if isinstance(doc.get(key), str):
                return str(doc[key])
        if isinstance(doc.get("detail"), list):  # a validation error list: where and what
            return "; ".join(
                ".".join(str(p) for p in d.get("loc", ())[1:]) + f": {d.get('msg', '')}"
                for d in doc["detail"]
                if isinstance(d, dict)
            )
    return str(doc)[:200]


def enroll(
    fleet_url: str,
    request: dict[str, Any],
    timeout: float,
    context: ssl.SSLContext | None = None,
) -> EnrollmentReply:
    """``POST {fleet_url}/v1/enroll``; :class:`ProvisionError` with one clear sentence on
    every failure. ``context`` verifies an https fleet (default: the system's CAs)."""
    url = fleet_url.rstrip("/") + ENROLL_PATH
    if not url.startswith(("http://", "https://")):
        raise ProvisionError(
            f"the fleet URL {fleet_url!r} must start with http:// or https:// "
            "(e.g. https://fleet.example.com)"
        )
    http_request = urllib.request.Request(
        url,
        data=json.dumps(request).encode(),
        headers={"Content-Type": "application/json", "Accept": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(http_request, timeout=timeout, context=context) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        detail = _error_detail(exc.read())
        if exc.code in (401, 403):
            raise ProvisionError(
                f"the fleet manager refused the enrollment token ({detail}); ask the fleet "
                "operator for a new token"
            ) from None
        raise ProvisionError(
            f"the fleet manager at {fleet_url} answered {exc.code} {exc.reason} ({detail}); "
            "fix what it says or ask the fleet operator"
        ) from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise ProvisionError(
                f"the fleet manager at {fleet_url} presented a certificate this device does not "
                f"trust ({reason.verify_message}); pass the fleet CA with --ca-file"
            ) from None
        raise ProvisionError(
            f"cannot reach the fleet manager at {fleet_url} ({reason}); check the device's "
            "network and the URL"
        ) from None
    return EnrollmentReply.from_json(body, url)


def provision(
    state_dir: Path,
    fleet_url: str,
    token: str,
    profile: str,
    facts: dict[str, Any],
    *,
    force: bool = False,
    predict_listen: Listen | None = None,
    health_listen: Listen | None = None,
    timeout: float = 30.0,
    ca_file: Path | None = None,
) -> AgentConfig:
    """Enroll this device and store its identity under ``state_dir``; returns the new config.

    ``facts`` is :func:`device_facts`' dict. ``predict_listen``/``health_listen`` set the
    HTTP addresses; everything else of ``[http]`` and ``[telemetry]`` is kept from a previous
    provisioning (new devices get the defaults). ``ca_file`` verifies an https fleet during
    enrollment; the fleet's CA in the reply is pinned (``trust/ca.pem``) for the broker and the
    fleet, and a client certificate for the device's new TLS key is stored when the fleet
    issues one.
    """
    paths = StatePaths(state_dir)
    previous: AgentConfig | None = None
    if paths.config.exists():
        try:
            previous = load_config(state_dir)
        except ConfigError:
            if not force:
                raise ProvisionError(
                    f"{paths.config} exists but cannot be read; pass --force to enroll again"
                ) from None
        if previous is not None and not force:
            raise AlreadyProvisionedError(
                f"this device is already provisioned as {previous.device.id} with "
                f"{previous.device.fleet_url}; nothing was changed (pass --force to enroll again "
                "with a new key)"
            )
    _check_writable(paths)
    key = Ed25519PrivateKey.generate()
    tls_key = new_tls_key()
    reply = enroll(
        fleet_url,
        {
            "token": token,
            "public_key": public_key_hex(key),
            "profile": profile,
            "facts": facts,
            "tls_csr": make_csr(tls_key),
        },
        timeout,
        _bootstrap_context(fleet_url, ca_file),
    )
    pinned = reply.ca_pem
    if pinned is None and ca_file is not None:
        pinned = ca_file.read_text()
    ca = str(paths.ca_cert) if pinned else ""
    cert = reply.client_cert_pem is not None
    config = AgentConfig(
        state_dir=state_dir,
        device=DeviceConfig(
            id=reply.device_id, profile=profile, fleet_url=reply.fleet_url, ca_file=ca
        ),
        mqtt=MqttConfig(
            host=reply.broker_host,
            port=reply.broker_port,
            username=reply.mqtt_username,
            password=reply.mqtt_password,
            tls=reply.broker_tls,
            ca_file=ca,
            cert_file=str(paths.tls_cert) if cert else "",
            key_file=str(paths.tls_key) if cert else "",
        ),
        http=_http(previous.http if previous else HttpConfig(), predict_listen, health_listen),
        telemetry=previous.telemetry if previous else TelemetryConfig(),
    )
    try:
        if previous is not None and previous.device.id != reply.device_id:
            _set_aside_database(paths, previous.device.id)
        write_atomic(
            paths.private_key,
            key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()),
            mode=0o600,
        )
        write_atomic(
            paths.public_key,
            key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo),
        )
        paths.trust_dir.mkdir(exist_ok=True)
        write_atomic(paths.root_json, reply.root_json.encode("utf-8"))
        if pinned:
            write_atomic(paths.ca_cert, pinned.encode("utf-8"))
        if reply.client_cert_pem is not None:
            write_atomic(
                paths.tls_key,
                tls_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()),
                mode=0o600,
            )
            write_atomic(paths.tls_cert, reply.client_cert_pem.encode("utf-8"))
        save_config(config)
    except OSError as exc:
        raise ProvisionError(
            f"enrolled as {reply.device_id} but could not store it under {state_dir} "
            f"({exc.strerror}: {exc.filename}); free disk space or fix permissions, then run "
            "provision again with a new token and --force"
        ) from None
    log.info("provisioned as %s with %s", reply.device_id, reply.fleet_url)
    return config


def _bootstrap_context(fleet_url: str, ca_file: Path | None) -> ssl.SSLContext | None:
    if ca_file is None or not fleet_url.startswith("https://"):
        return None
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ProvisionError(
            f"cannot use {ca_file} as the fleet CA ({exc}); pass the fleet's ca.pem (PEM)"
        ) from None


def _http(http: HttpConfig, predict: Listen | None, health: Listen | None) -> HttpConfig:
    if predict is not None:
        http = dataclasses.replace(http, predict_listen=predict)
    if health is not None:
        http = dataclasses.replace(http, health_listen=health)
    return http


def _set_aside_database(paths: StatePaths, old_id: str) -> None:
    """The outbox's sequence numbers belong to the old device id: keep its database aside."""
    for suffix in ("", "-wal", "-shm"):
        source = paths.db.with_name(paths.db.name + suffix)
        if source.exists():
            os.replace(source, paths.db.with_name(f"{paths.db.name}.{old_id}{suffix}"))


def load_private_key(paths: StatePaths) -> Ed25519PrivateKey:
    """The device key written at provisioning (for signing requests to the fleet)."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(paths.private_key.read_bytes(), password=None)
    except FileNotFoundError:
        raise ProvisionError(
            f"no device key at {paths.private_key}; run `edge-agent provision` first"
        ) from None
    except ValueError as exc:
        raise ProvisionError(
            f"{paths.private_key} is not a PEM private key ({exc}); re-provision with --force"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ProvisionError(
            f"{paths.private_key} is not an Ed25519 key; re-provision with --force"
        )
    return key


def agent_command() -> list[str]:
    """How to start ``edge-agent`` from a unit file: the script beside this Python, if any."""
    script = Path(sys.executable).with_name("edge-agent")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "agent.cli"]


def systemd_unit(state_dir: Path, command: list[str] | None = None) -> str:
    """A systemd unit running ``edge-agent run --state-dir STATE_DIR``, restarted on failure,
    with the hardening that does not get in the agent's way."""
    exec_start = shlex.join([*(command or agent_command()), "run", "--state-dir", str(state_dir)])
    return f"""\
# edgefleet device agent, written by `edge-agent provision --systemd-unit`.
# Install: copy to /etc/systemd/system/edge-agent.service, then
#   systemctl daemon-reload && systemctl enable --now edge-agent
[Unit]
Description=edgefleet device agent (local inference, drift, telemetry, model updates)
After=network-online.target time-sync.target
Wants=network-online.target

[Service]
Type=simple
ExecStart={exec_start}
Restart=always
RestartSec=5
# SIGTERM: stop serving, close the drift window, flush the outbox, close the model
KillSignal=SIGTERM
TimeoutStopSec=30
Environment=PYTHONUNBUFFERED=1
UMask=0077
# hardening: the agent writes only its state directory and talks only IP and unix sockets
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={state_dir}
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
CapabilityBoundingSet=

[Install]
WantedBy=multi-user.target
"""


def write_systemd_unit(path: Path, state_dir: Path) -> None:
    try:
        write_atomic(path, systemd_unit(state_dir).encode())
    except OSError as exc:
        raise ProvisionError(
            f"cannot write the unit file {path} ({exc.strerror}); run as root or choose another "
            "path with --systemd-unit"
        ) from None
