"""A Mosquitto broker process that we start, configure and stop ourselves.

Tests, benchmarks and the demo each run their own broker on a free loopback port with a config
file written here, so they control its settings (queue limits, persistence, password and ACL
files, TLS) and never depend on a system-wide broker. The config raises Mosquitto's per-client
queue limits: its default ``max_queued_messages 1000`` silently drops QoS 1 messages for a
lagging subscriber. With ``auth`` and ``tls`` it has the shape of ``deploy/mosquitto.conf``.
"""

from __future__ import annotations

import getpass
import logging
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    """The broker could not be started or did not come up."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class BrokerAuth:
    """Password and ACL files (written by :mod:`fleet.broker_auth`): no anonymous clients."""

    password_file: Path
    acl_file: Path


@dataclass(frozen=True)
class BrokerTls:
    """TLS on every listener with this server certificate; ``require_certificate``: clients
    must present a certificate signed by ``cafile`` (mutual TLS)."""

    cafile: Path
    certfile: Path
    keyfile: Path
    require_certificate: bool = False


def _listener(port: int, host: str, tls: BrokerTls | None) -> list[str]:
    lines = [f"listener {port} {host}"]
    if tls is not None:
        lines += [
            f"cafile {tls.cafile}",
            f"certfile {tls.certfile}",
            f"keyfile {tls.keyfile}",
            "tls_version tlsv1.2",
            f"require_certificate {'true' if tls.require_certificate else 'false'}",
        ]
    return lines


def render_config(
    port: int,
    data_dir: Path,
    *,
    host: str = "127.0.0.1",
    auth: BrokerAuth | None = None,
    tls: BrokerTls | None = None,
    fleet_port: int | None = None,
) -> str:
    """The broker config for tests and development: anonymous on one loopback listener, or,
    with ``auth`` (and ``tls``), shaped like ``deploy/mosquitto.conf``: a device listener on
    ``port`` whose client id is forced to the username, and a fleet listener on ``fleet_port``
    for the fleet's own several connections."""
    security = ["allow_anonymous true"]
    listeners = _listener(port, host, tls)
    if auth is not None:
        security = [
            "per_listener_settings false",
            "allow_anonymous false",
            f"password_file {auth.password_file}",
            f"acl_file {auth.acl_file}",
        ]
        # a device cannot take over (kick) another device's session by using its client id
        listeners.append("use_username_as_clientid true")
        if fleet_port is not None:  # the fleet (loopback in production) never needs a cert
            fleet_tls = tls and BrokerTls(tls.cafile, tls.certfile, tls.keyfile)
            listeners += _listener(fleet_port, host, fleet_tls)
    return "\n".join(
        [
            # started as root, mosquitto would switch to the `mosquitto` user, which cannot
            # write our data directory; keep the user we run as (no effect for non-root)
            f"user {getpass.getuser()}",
            f"pid_file {data_dir}/mosquitto.pid",
            *security,
            # never drop QoS 1 messages queued for a slow or offline persistent session
            "max_queued_messages 0",
            "max_queued_bytes 0",
            "max_inflight_messages 100",
            "persistence true",
            f"persistence_location {data_dir}/",
            "autosave_interval 1",
            # sessions of offline fleet subscribers/devices live a day
            "persistent_client_expiration 1d",
            "message_size_limit 1048576",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "connection_messages true",
            f"log_dest file {data_dir}/mosquitto.log",
            *listeners,
            "",
        ]
    )


@dataclass
class MosquittoBroker:
    """One broker process; ``start``/``stop``/``restart`` keep its port and persisted state."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    binary: str = ""
    auth: BrokerAuth | None = None
    tls: BrokerTls | None = None
    fleet_port: int = 0  # with ``auth``: the fleet's listener (free port if 0)
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port(self.host)
        if self.auth is not None and not self.fleet_port:
            self.fleet_port = free_port(self.host)
        if not self.binary:
            found = shutil.which("mosquitto") or (
                "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
            )
            if not found:
                raise BrokerError(
                    "mosquitto is not installed; run ./scripts/setup (installs it with apt) or "
                    "`sudo apt-get install mosquitto`"
                )
            self.binary = found

    @property
    def config_path(self) -> Path:
        return self.data_dir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "mosquitto.log"

    def start(self, timeout: float = 10.0) -> None:
        if self._proc and self._proc.poll() is None:
            return
        self.config_path.write_text(
            render_config(
                self.port,
                self.data_dir,
                host=self.host,
                auth=self.auth,
                tls=self.tls,
                fleet_port=self.fleet_port or None,
            )
        )
        self._proc = subprocess.Popen(
            [self.binary, "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise BrokerError(f"mosquitto exited at start: {err.strip() or self._log_tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    log.info("mosquitto up on %s:%d", self.host, self.port)
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"mosquitto did not accept connections within {timeout}s")

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # SIGTERM saves the persistence file
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()

    @property
    def pid(self) -> int | None:
        """The broker process's id while it runs (to pause it with SIGSTOP, as a hung broker)."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "mosquitto.pid"

    def reload(self) -> None:
        """SIGHUP: re-read the password and ACL files (what ``fleet.broker_auth`` sends)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGHUP)

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
