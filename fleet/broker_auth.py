"""The broker's password and ACL files, kept by the fleet manager, and the broker's reload.

Mosquitto reads who may connect from ``password_file`` and what each user may do from
``acl_file``, and reads both again on SIGHUP, disconnecting every client whose user is gone.
The fleet writes both files from the device registry (each atomically: temp file, fsync,
``os.replace``) at start, after every enrollment and decommission, and on a schedule, then
reloads the broker, so a new device can connect at once and a decommissioned one is kicked
and refused at once. ``deploy/mosquitto.conf`` is the broker config that reads them.

Mosquitto does not say when a SIGHUP has been applied, so each rewrite also gives a probe user
(``{mqtt.username}-reload-probe``, no rights beyond the device patterns, a fresh random password
each time) a new password, and the sync returns only once the broker accepts that password:
the files it wrote are then the broker's. An enrollment therefore returns credentials the broker
already knows, and a wrong ``password_file`` path (a broker that never sees the files) is an
error instead of silence.

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

import itertools
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

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.atomic import write_atomic
from fleet.devices import DeviceRegistry
from fleet.errors import BrokerReloadError
from fleet.mqtt_credentials import (
    mosquitto_hash,
    new_password,
    password_file_line,
    verify_mosquitto_hash,
)
from fleet.settings import FleetSettings
from fleet.store import Store
from protocol.topics import DEVICE_REPORTS, DEVICES, TopicKind

log = logging.getLogger(__name__)

FILE_MODE = 0o640  # the broker's user may read them through the group; nobody else
RELOAD_TIMEOUT = 10.0
PROBE_SUFFIX = "-reload-probe"
PROBE_RETRY_S = 0.02


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
    Requests coalesce: a request waiting while another sync runs is served by the next sync that
    reads the registry after it was made, so a burst of N enrollments costs far fewer than N
    rewrites and reloads, and each device is still in the files when its enrollment returns.
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
        self.probe = BrokerProbe(settings, username + PROBE_SUFFIX)
        self._probe_password = new_password()
        self._probe_hash = existing_hash(self.password_file, self.probe.username) or ""
        self._lock = threading.Lock()
        self._requests = itertools.count(1)  # ticket of each sync request
        self._issued = 0  # the last ticket handed out
        self._covered = 0  # every ticket up to this one is served by a finished sync
        self._reload_pending = False
        self.last: SyncResult | None = None
        self.last_error: str | None = None

    def sync(self, now: datetime) -> SyncResult:
        """Rewrite the files if they differ from the registry, then reload the broker (or
        return the result of a sync that started after this call and already did it)."""
        ticket = self._issued = next(self._requests)
        with self._lock:
            if self._covered >= ticket and self.last is not None:
                return self.last
            covers = self._issued  # the registry read below sees every request made so far
            with self.store.connect() as db:
                devices = DeviceRegistry(db).broker_credentials()
            credentials = [(self.fleet_username, self._fleet_hash), *devices]
            probe = (self.probe.username, self._probe_hash)
            passwords = render_passwords([*credentials, probe])
            if self._reload_pending or self._differs(self.password_file, passwords):
                self._probe_password = new_password()  # the mark of this rewrite
                self._probe_hash = mosquitto_hash(self._probe_password)
                probe = (self.probe.username, self._probe_hash)
                passwords = render_passwords([*credentials, probe])
            changed = self._write(self.password_file, passwords)
            changed |= self._write(self.acl_file, render_acl(self.fleet_username))
            self._reload_pending |= changed
            reloaded = False
            if self._reload_pending:
                if self._reload():  # raises BrokerReloadError; still pending then
                    self.probe.wait_accepted(self._probe_password)
                self._reload_pending, reloaded = False, True
            self.last = SyncResult(len(credentials), changed, reloaded, now)
            self.last_error = None
            self._covered = covers
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
    def _differs(path: Path, text: str) -> bool:
        try:
            return path.read_bytes() != text.encode()
        except FileNotFoundError:
            return True

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

    def _reload(self) -> bool:
        """Signal the broker; False if no way to do so is configured (nothing to wait for)."""
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
            return False
        log.info(
            "broker reloaded",
            extra={"seconds": round(time.monotonic() - started, 4), "file": str(self.acl_file)},
        )
        return True


class BrokerProbe:
    """Connects to the broker as the probe user until it accepts the password just written."""

    def __init__(self, settings: FleetSettings, username: str) -> None:
        self.username = username
        self.host, self.port = settings.mqtt.host, settings.mqtt.port
        self.tls_context = settings.mqtt.tls_context()
        self.timeout = RELOAD_TIMEOUT

    def wait_accepted(self, password: str) -> None:
        """Return once the broker accepts ``password``; a broker that cannot be reached will
        read the files when it starts (logged, not an error); refusal past ``self.timeout``
        seconds raises :class:`BrokerReloadError`."""
        started = time.monotonic()
        deadline = started + self.timeout
        while True:
            accepted = self._connect(password, deadline)
            if accepted is None:
                log.warning(
                    "cannot reach the MQTT broker at %s:%d to confirm the credential reload; "
                    "it reads the files when it starts",
                    self.host,
                    self.port,
                )
                return
            if accepted:
                log.info(
                    "broker credentials applied",
                    extra={"seconds": round(time.monotonic() - started, 4)},
                )
                return
            if time.monotonic() >= deadline:
                raise BrokerReloadError(
                    "the broker did not apply the rewritten credential files within "
                    f"{self.timeout:g} s; check that broker_auth.password_file is the broker's "
                    "password_file and that the broker can read it"
                )
            time.sleep(PROBE_RETRY_S)

    def _connect(self, password: str, deadline: float) -> bool | None:
        """One connection: True if accepted, False if refused, None if the broker is away."""
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.username,
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        client.username_pw_set(self.username, password)
        if self.tls_context is not None:
            client.tls_set_context(self.tls_context)
        answers: list[bool] = []
        client.on_connect = lambda _c, _u, _f, reason, _p: answers.append(not reason.is_failure)
        try:
            client.connect(self.host, self.port, keepalive=10)
            while not answers and time.monotonic() < deadline:
                if client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS and not answers:
                    return False  # closed after refusing (or before answering): try again
        except OSError:
            return None
        finally:
            client.disconnect()
        return answers[0] if answers else False
