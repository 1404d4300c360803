"""The broker's password and ACL files, kept by the fleet manager, and the broker's reload.

Mosquitto reads who may connect from ``password_file`` and what each user may do from
``acl_file``, and reads both again on SIGHUP, disconnecting every client whose user is gone.
The fleet writes both files from the device registry (each atomically: temp file, fsync,
``os.replace``) at start, after every enrollment and decommission, and on a schedule, then
reloads the broker, so a new device can connect at once and a decommissioned one is kicked
and refused at once. ``deploy/mosquitto.conf`` is the broker config that reads them.

A device's MQTT username is its device id, so the ACL is static, made of ``pattern`` lines
with ``%u``: a device may write only its own report topics and read only its own ``desired``.
The fleet's own user (``mqtt.username``) reads every device's reports (also through
``$share/...``) and writes every ``desired``. Nobody else gets anything.

The rendering functions are pure; :class:`BrokerAuthFiles` is the thin adapter that reads the
registry, writes the files and signals the broker (``broker_auth.pid_file``: SIGHUP to the pid
in it; ``broker_auth.reload_command``: run that instead, e.g. ``systemctl reload mosquitto``).
It does not hash passwords (:mod:`fleet.mqtt_credentials`) or decide who is active
(:mod:`fleet.devices`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from agent.atomic import write_atomic
from fleet.devices import DeviceRegistry
from fleet.errors import BrokerReloadError
from fleet.mqtt_credentials import mosquitto_hash, password_file_line, verify_mosquitto_hash
from fleet.settings import FleetSettings
from fleet.store import Store
from protocol.topics import DEVICE_REPORTS, DEVICES, TopicKind

log = logging.getLogger(__name__)

FILE_MODE = 0o640  # the broker's user may read them through the group; nobody else
RELOAD_TIMEOUT = 10.0


def render_acl(fleet_username: str) -> str:
    """The ACL file: the fleet reads all reports and writes all desired documents; each
    device (username = device id) writes its own reports and reads its own desired only."""
    if not fleet_username or any(c in fleet_username for c in "\n#+/ "):
        raise ValueError(f"MQTT username {fleet_username!r} cannot go into an ACL file")
    lines = [
        "# written by the edgefleet fleet manager (fleet.broker_auth); edits are overwritten",
        "",
        f"user {fleet_username}",
        *(f"topic read {DEVICES}/+/{kind.value}" for kind in DEVICE_REPORTS),
        f"topic readwrite {DEVICES}/+/{TopicKind.DESIRED.value}",
        "",
        "# every other user is a device whose username is its device id",
        *(f"pattern write {DEVICES}/%u/{kind.value}" for kind in DEVICE_REPORTS),
        f"pattern read {DEVICES}/%u/{TopicKind.DESIRED.value}",
        "",
    ]
    return "\n".join(lines)


def render_passwords(credentials: Iterable[tuple[str, str]]) -> str:
    """The password file: one ``username:$7$...`` line per ``(username, hash)``."""
    return "".join(password_file_line(user, encoded) + "\n" for user, encoded in credentials)


def existing_hash(path: Path, username: str) -> str | None:
    """The hash ``path`` holds for ``username``, if the file exists and has one."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        user, sep, encoded = line.partition(":")
        if sep and user == username:
            return encoded
    return None


@dataclass(frozen=True)
class SyncResult:
    users: int
    changed: bool
    reloaded: bool
    at: datetime


class BrokerAuthFiles:
    """Writes the broker's password and ACL files from the registry and reloads the broker.

    A :class:`fleet.devices.RevocationListener` and a :class:`fleet.enrollment.EnrollmentListener`.
    Syncs are serialised; a failed reload is retried by the next sync even if nothing changed.
    """

    def __init__(
        self, settings: FleetSettings, store: Store, clock: Callable[[], datetime]
    ) -> None:
        auth = settings.broker_auth
        username, password = settings.mqtt.username, settings.mqtt.password_value()
        if not username or not password:
            raise ValueError("broker_auth needs mqtt.username and mqtt.password")
        self.store = store
        self.clock = clock
        self.password_file = auth.password_file or settings.data_dir / "broker" / "passwd"
        self.acl_file = auth.acl_file or settings.data_dir / "broker" / "acl"
        self.pid_file = auth.pid_file
        self.reload_command: Sequence[str] = auth.reload_command
        self.fleet_username = username
        # keep the hash already on disk if it matches, so a restart changes nothing
        kept = existing_hash(self.password_file, username)
        self._fleet_hash = (
            kept if kept and verify_mosquitto_hash(password, kept) else mosquitto_hash(password)
        )
        self._lock = threading.Lock()
        self._reload_pending = False
        self.last: SyncResult | None = None
        self.last_error: str | None = None

    def sync(self, now: datetime) -> SyncResult:
        """Rewrite the files if they differ from the registry, then reload the broker."""
        with self._lock:
            with self.store.connect() as db:
                devices = DeviceRegistry(db).broker_credentials()
            credentials = [(self.fleet_username, self._fleet_hash), *devices]
            changed = self._write(self.password_file, render_passwords(credentials))
            changed |= self._write(self.acl_file, render_acl(self.fleet_username))
            self._reload_pending |= changed
            reloaded = False
            if self._reload_pending:
                self._reload()  # raises BrokerReloadError; still pending then
                self._reload_pending, reloaded = False, True
            self.last = SyncResult(len(credentials), changed, reloaded, now)
            self.last_error = None
            return self.last

    def safe_sync(self, now: datetime) -> SyncResult | None:
        """:meth:`sync`, logging a failure instead of raising it (the next sync retries)."""
        try:
            return self.sync(now)
        except (BrokerReloadError, OSError) as exc:
            self.last_error = str(exc)
            log.error("broker credentials not applied: %s", exc)
            return None

    def device_enrolled(self, device_id: str) -> None:
        self.safe_sync(self.clock())

    def device_revoked(self, device_id: str) -> None:
        self.safe_sync(self.clock())

    @staticmethod
    def _write(path: Path, text: str) -> bool:
        data = text.encode()
        try:
            if path.read_bytes() == data:
                return False
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        write_atomic(path, data, FILE_MODE)
        return True

    def _reload(self) -> None:
        started = time.monotonic()
        if self.pid_file is not None:
            try:
                pid = int(self.pid_file.read_text().strip())
                os.kill(pid, signal.SIGHUP)
            except (OSError, ValueError) as exc:
                raise BrokerReloadError(
                    f"cannot signal the broker through {self.pid_file} ({exc}); check "
                    "broker_auth.pid_file and that the fleet runs as the broker's user"
                ) from None
        elif self.reload_command:
            try:
                subprocess.run(
                    list(self.reload_command),
                    check=True,
                    timeout=RELOAD_TIMEOUT,
                    capture_output=True,
                )
            except (OSError, subprocess.SubprocessError) as exc:
                raise BrokerReloadError(
                    f"the broker reload command {' '.join(self.reload_command)!r} failed ({exc}); "
                    "fix broker_auth.reload_command"
                ) from None
        else:
            log.warning(
                "broker credential files changed but no broker_auth.pid_file or reload_command "
                "is set: the broker applies them when it is reloaded"
            )
            return
        log.info(
            "broker reloaded",
            extra={"seconds": round(time.monotonic() - started, 4), "file": str(self.acl_file)},
        )
