"""A Mosquitto broker process that we start, configure and stop ourselves.

Tests, benchmarks and the demo each run their own broker on a free loopback port with a config
file written here, so they control its settings (queue limits, persistence, later ACLs and TLS)
and never depend on a system-wide broker. The config raises Mosquitto's per-client queue limits:
its default ``max_queued_messages 1000`` silently drops QoS 1 messages for a lagging subscriber.
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


def render_config(port: int, data_dir: Path, *, host: str = "127.0.0.1") -> str:
    """The broker config we ship for tests and development (anonymous, loopback only)."""
    return "\n".join(
        [
            f"listener {port} {host}",
            # started as root, mosquitto would switch to the `mosquitto` user, which cannot
            # write our data directory; keep the user we run as (no effect for non-root)
            f"user {getpass.getuser()}",
            "allow_anonymous true",
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
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port(self.host)
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
        self.config_path.write_text(render_config(self.port, self.data_dir, host=self.host))
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
