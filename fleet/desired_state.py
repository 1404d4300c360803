"""The fleet's desired state: which release each device should run, as signed documents.

:meth:`DesiredStateService.assign` is the one way a release reaches devices, for an operator's
direct assignment (``POST /v1/devices/{id}/assignment``, ``POST /v1/groups/{g}/assignment``)
and for the rollout controller's jobs alike. For each device it:

1. checks the rules (:func:`check_order`, pure): the device is active; the release is
   published; an artifact of it fits the device's firmware profile
   (:func:`protocol.profiles.select_artifact`, whose error names the profile and why each
   artifact does not fit); the model is the device's model; the version is newer than the
   device's current one (its newest assignment, else what it last reported running) — or,
   with ``rollback``, older;
2. in one transaction for all the devices (all are assigned or none): takes the next serial of
   the device (serials only grow), signs a :class:`protocol.desired.DesiredDocument` with the
   fleet's ``targets`` key (``issued_at`` = now, ``expires`` = now + ``desired.expiry``),
   stores it in ``assignments``, queues it in the outbox and records the audit entry
   (``release.assign`` or ``release.rollback``);
3. after the commit, publishes it retained with QoS 1 on ``edgefleet/v1/devices/{id}/desired``
   (:mod:`fleet.desired_outbox`). A broker that is down does not fail the assignment: it stays
   queued, the result says so, and :func:`retry_job` publishes it later.

:func:`retry_job` (every ``desired.retry_every``) also re-signs, under a new serial, each
active device's current document once less than a third of its lifetime is left, so a
retained document never lapses while the fleet runs (the agent treats a document naming the
active release as nothing to do). :class:`ClearOnDecommission` clears a decommissioned
device's retained document (an empty retained payload).

This module does not talk to the broker itself (:mod:`fleet.mqtt_publisher`), and rollout
planning (which devices, when) belongs to the rollout controller.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from securesystemslib.signer import Signer
from sqlite_utils import Database

from firmware_profiles import load_profiles
from fleet.audit import SYSTEM, Actor, AuditLog
from fleet.desired_outbox import DesiredOutbox, FlushResult, enqueue
from fleet.devices import DeviceRegistry, DeviceStatus
from fleet.errors import (
    ConflictError,
    DeviceDecommissionedError,
    FleetError,
    InvalidInputError,
    NotFoundError,
    ReleaseSigningUnavailableError,
    SigningKeyError,
)
from fleet.keys import load_online_keys
from fleet.registry import ModelRegistry, Release
from fleet.settings import FleetSettings
from fleet.store import Store, from_iso, immediate, iso
from protocol.bundle import ArtifactInfo
from protocol.desired import DesiredDocument, sign_desired
from protocol.errors import ProfileError
from protocol.profiles import FirmwareProfile, select_artifact

log = logging.getLogger(__name__)

TABLE = "assignments"
REFRESH_FRACTION = 3  # re-sign once less than 1/3 of a document's lifetime is left


# --- errors -----------------------------------------------------------------------------------


class NoFittingArtifactError(InvalidInputError):
    """No artifact of the release fits the device's firmware profile (HTTP 422)."""


class ReleaseOrderError(ConflictError):
    """The version is not newer than the device's current one (or, for a rollback, not older),
    or names another model (HTTP 409)."""


class ReleaseNotAssignableError(ConflictError):
    """The release is withdrawn (HTTP 409)."""


class AssignmentRefusedError(ConflictError):
    """Several devices of one request were refused for different reasons (HTTP 409)."""


class NoAssignmentError(NotFoundError):
    """The device has no assignment yet (HTTP 404)."""


class EmptyGroupError(NotFoundError):
    """The group has no active device (HTTP 404)."""


# --- values -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CurrentRelease:
    """What a device is on as far as the fleet knows: its newest assignment, else its report."""

    model: str
    version: int
    source: str  # "assignment" | "reported"


@dataclass(frozen=True)
class Assignment:
    """One signed desired document the fleet issued for a device."""

    device_id: str
    serial: int
    model: str
    version: int
    artifact: str
    target_path: str
    rollback: bool
    rollout_id: str | None
    issued_at: datetime
    expires: datetime
    assigned_by: str
    assigned_by_name: str
    published_at: datetime | None
    document: str  # the signed wire form (canonical JSON)


@dataclass(frozen=True)
class AssignmentResult:
    """What :meth:`DesiredStateService.assign` did: the new assignments (committed), and which
    devices' documents the broker has acknowledged so far (the rest are retried)."""

    assignments: tuple[Assignment, ...]
    published: tuple[str, ...]
    pending: tuple[str, ...]
    publish_error: str | None = None


# --- the rules (pure) -------------------------------------------------------------------------


def check_order(
    device_id: str, model: str, version: int, rollback: bool, current: CurrentRelease | None
) -> None:
    """Refuse (:class:`ReleaseOrderError`) a model other than the device's, a version not newer
    than its current one, or a rollback that is not to an older version."""
    if current is None:
        if rollback:
            raise ReleaseOrderError(
                f"device {device_id} has no release to roll back from; assign {model} "
                f"v{version} without rollback"
            )
        return
    where = "is assigned" if current.source == "assignment" else "reports running"
    if model != current.model:
        raise ReleaseOrderError(
            f"device {device_id} {where} {current.model} v{current.version}, not {model}; a "
            "device changes models only by re-provisioning"
        )
    if rollback and version >= current.version:
        raise ReleaseOrderError(
            f"a rollback must name a version lower than device {device_id}'s current "
            f"{model} v{current.version}, not v{version}; assign v{version} without rollback"
            if version > current.version
            else f"device {device_id} {where} {model} v{version} already; nothing to roll back"
        )
    if not rollback and version <= current.version:
        raise ReleaseOrderError(
            f"{model} v{version} is not newer than device {device_id}'s current "
            f"v{current.version} ({where.replace('is ', '')}); assign a newer version, or "
            f"pass rollback=true (--rollback) to go back to v{version}"
        )


def release_artifacts(release: Release) -> tuple[ArtifactInfo, ...]:
    """The release's model artifacts as :func:`select_artifact` takes them."""
    return tuple(
        ArtifactInfo(
            file=f.file,
            format=f.format or "",
            runtime=f.runtime or "",
            quantization=f.quantization or "",
            golden="",
            sha256=f.sha256,
            length=f.length,
            profiles=f.profiles,
        )
        for f in release.files
        if f.kind.value == "artifact"
    )


def choose_artifact(
    device_id: str, profile_name: str, profiles: Mapping[str, FirmwareProfile], release: Release
) -> ArtifactInfo:
    """The artifact of ``release`` for the device's profile, or :class:`NoFittingArtifactError`
    naming the profile and why each artifact does not fit."""
    profile = profiles.get(profile_name)
    if profile is None:
        raise NoFittingArtifactError(
            f"device {device_id} has firmware profile {profile_name!r}, which this fleet does "
            f"not know (known: {', '.join(profiles)}); add the profile file or re-enroll it"
        )
    try:
        return select_artifact(profile, release_artifacts(release))
    except ProfileError as exc:
        raise NoFittingArtifactError(
            f"{release.model} v{release.version} cannot go to device {device_id}: {exc}"
        ) from exc


# --- the service ------------------------------------------------------------------------------


def _assignment(row: Mapping[str, Any]) -> Assignment:
    return Assignment(
        device_id=row["device_id"],
        serial=int(row["serial"]),
        model=row["model"],
        version=int(row["version"]),
        artifact=row["artifact"],
        target_path=row["target_path"],
        rollback=bool(row["rollback"]),
        rollout_id=row["rollout_id"],
        issued_at=from_iso(row["issued_at"]),
        expires=from_iso(row["expires_at"]),
        assigned_by=row["assigned_by"],
        assigned_by_name=row["assigned_by_name"],
        published_at=from_iso(row["published_at"]) if row["published_at"] else None,
        document=row["document"],
    )


def targets_signer(settings: FleetSettings) -> Signer:
    """The fleet's online ``targets`` key (read now, so a key rotation takes effect at once)."""
    try:
        return load_online_keys(settings.keys_dir)["targets"]
    except SigningKeyError as exc:
        raise ReleaseSigningUnavailableError(
            f"cannot sign desired documents: {exc} (the fleet's online keys live in "
            f"{settings.keys_dir})"
        ) from exc


class DesiredStateService:
    """Assign releases to devices and read assignments, on one connection.

    ``outbox`` publishes after commit (None: only queue; the retry job publishes).
    ``profiles`` defaults to the shipped firmware profiles; ``signer`` to the targets key.
    """

    def __init__(
        self,
        db: Database,
        settings: FleetSettings,
        outbox: DesiredOutbox | None = None,
        *,
        profiles: Mapping[str, FirmwareProfile] | None = None,
        signer: Signer | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.outbox = outbox
        self._profiles = profiles
        self._signer = signer
        self.devices = DeviceRegistry(db)
        self.audit = AuditLog(db)

    @property
    def profiles(self) -> Mapping[str, FirmwareProfile]:
        if self._profiles is None:
            self._profiles = load_profiles()
        return self._profiles

    # --- reading ----------------------------------------------------------------------------

    def current(self, device_id: str) -> Assignment | None:
        """The device's newest assignment (None if it has none); 404 for an unknown device."""
        self.devices.get(device_id)
        return self._latest(device_id)

    def _latest(self, device_id: str) -> Assignment | None:
        rows = list(
            self.db.query(
                f"SELECT * FROM {TABLE} WHERE device_id = ? ORDER BY serial DESC LIMIT 1",
                [device_id],
            )
        )
        return _assignment(rows[0]) if rows else None

    def history(self, device_id: str, limit: int = 100) -> list[Assignment]:
        """The device's assignments, newest first."""
        self.devices.get(device_id)
        rows = self.db.query(
            f"SELECT * FROM {TABLE} WHERE device_id = ? ORDER BY serial DESC LIMIT ?",
            [device_id, limit],
        )
        return [_assignment(r) for r in rows]

    def was_assigned(self, device_id: str, model: str, version: int) -> bool:
        """Whether the fleet ever issued ``device_id`` a document naming this release (an
        update or a rollback): the releases whose files the device may download."""
        row = self.db.execute(
            f"SELECT 1 FROM {TABLE} WHERE device_id = ? AND model = ? AND version = ? LIMIT 1",
            [device_id, model, version],
        ).fetchone()
        return row is not None

    def current_release(self, device_id: str) -> CurrentRelease | None:
        latest = self._latest(device_id)
        if latest is not None:
            return CurrentRelease(latest.model, latest.version, "assignment")
        row = self.db.execute(
            "SELECT model_name, model_version FROM device_state WHERE device_id = ?", [device_id]
        ).fetchone()
        if row is not None and row[0] is not None:
            return CurrentRelease(row[0], int(row[1]), "reported")
        return None

    def group_devices(self, group: str) -> list[str]:
        """The active devices of ``group``; :class:`EmptyGroupError` when there are none."""
        ids = [
            r[0]
            for r in self.db.execute(
                "SELECT id FROM devices WHERE group_name = ? AND status = 'active' "
                "ORDER BY enrolled_at, rowid",
                [group],
            )
        ]
        if not ids:
            raise EmptyGroupError(
                f"group {group!r} has no active devices; GET /v1/devices?group={group} lists "
                "its devices (groups come from enrollment tokens or PATCH /v1/devices/{id})"
            )
        return ids

    # --- assigning --------------------------------------------------------------------------

    def assign(
        self,
        device_ids: Sequence[str],
        release: Release,
        rollback: bool,
        rollout_id: str | None,
        actor: Actor,
        now: datetime,
    ) -> AssignmentResult:
        """Sign, store and publish ``release`` for every device of ``device_ids`` (all or
        none: any refusal raises and assigns nothing). See the module docstring."""
        ids = list(dict.fromkeys(device_ids))
        if not ids:
            raise InvalidInputError("no devices to assign to; name at least one device")
        if release.status != "published":
            raise ReleaseNotAssignableError(
                f"{release.model} v{release.version} is {release.status}; assign a published "
                "release (`fleet release list`)"
            )
        signer = self._signer or targets_signer(self.settings)
        expiry: timedelta = self.settings.desired.expiry
        made: list[Assignment] = []
        with immediate(self.db):
            refusals: list[tuple[str, FleetError]] = []
            plans: list[tuple[str, ArtifactInfo]] = []
            for device_id in ids:
                try:
                    plans.append((device_id, self._check(device_id, release, rollback)))
                except FleetError as exc:
                    refusals.append((device_id, exc))
            if refusals:
                raise _combined(refusals, len(ids))
            for device_id, artifact in plans:
                made.append(
                    self._issue(
                        device_id,
                        release,
                        artifact,
                        rollback,
                        rollout_id,
                        actor,
                        now,
                        expiry,
                        signer,
                    )
                )
        log.info(
            "%s %s v%d to %d device(s)",
            "rolled back to" if rollback else "assigned",
            release.model,
            release.version,
            len(made),
            extra={"model": release.model, "version": release.version, "actor": actor.id},
        )
        flushed = self._flush([a.device_id for a in made], now)
        published = set(flushed.published)
        return AssignmentResult(
            tuple(made),
            tuple(a.device_id for a in made if a.device_id in published),
            tuple(a.device_id for a in made if a.device_id not in published),
            flushed.error,
        )

    def _check(self, device_id: str, release: Release, rollback: bool) -> ArtifactInfo:
        device = self.devices.get(device_id)
        if device.status is not DeviceStatus.ACTIVE:
            raise DeviceDecommissionedError(
                f"device {device_id} is decommissioned; nothing can be assigned to it"
            )
        artifact = choose_artifact(device_id, device.profile, self.profiles, release)
        check_order(
            device_id, release.model, release.version, rollback, self.current_release(device_id)
        )
        return artifact

    def _issue(
        self,
        device_id: str,
        release: Release,
        artifact: ArtifactInfo,
        rollback: bool,
        rollout_id: str | None,
        actor: Actor,
        now: datetime,
        expiry: timedelta,
        signer: Signer,
    ) -> Assignment:
        last = self.db.execute(
            f"SELECT max(serial) FROM {TABLE} WHERE device_id = ?", [device_id]
        ).fetchone()[0]
        target = next(f.target_path for f in release.files if f.file == artifact.file)
        doc = DesiredDocument(
            device_id=device_id,
            serial=int(last or 0) + 1,
            issued_at=now,
            expires=now + expiry,
            model=release.model,
            model_version=release.version,
            target_path=target,
            rollback=rollback,
            rollout_id=rollout_id,
        )
        wire = sign_desired(doc, signer)
        row = {
            "device_id": device_id,
            "serial": doc.serial,
            "model": doc.model,
            "version": doc.model_version,
            "artifact": artifact.file,
            "target_path": target,
            "rollback": int(rollback),
            "rollout_id": rollout_id,
            "issued_at": iso(doc.issued_at),
            "expires_at": iso(doc.expires),
            "document": wire.decode("utf-8"),
            "assigned_by": actor.id,
            "assigned_by_name": actor.name,
            "published_at": None,
        }
        self.db.table(TABLE).insert(row)
        enqueue(self.db, device_id, wire, doc.serial, now)
        if actor != SYSTEM:
            self.audit.record(
                actor,
                "release.rollback" if rollback else "release.assign",
                device_id,
                now,
                {
                    "model": doc.model,
                    "version": doc.model_version,
                    "serial": doc.serial,
                    "artifact": artifact.file,
                    "target_path": target,
                    "rollout_id": rollout_id,
                },
            )
        return _assignment(row)

    def _flush(self, device_ids: Sequence[str], now: datetime) -> FlushResult:
        if self.outbox is None:
            return FlushResult(pending=tuple(device_ids))
        return self.outbox.flush(now, device_ids)

    # --- keeping documents fresh, clearing them ---------------------------------------------

    def refresh_expiring(self, now: datetime) -> list[str]:
        """Re-sign (new serial, same release) every active device's current document that has
        less than a third of its lifetime left; return those devices. Not audited (the
        release did not change); logged."""
        expiry: timedelta = self.settings.desired.expiry
        horizon = iso(now + expiry / REFRESH_FRACTION)
        rows = list(
            self.db.query(
                f"SELECT a.* FROM {TABLE} a JOIN devices d ON d.id = a.device_id "
                "WHERE d.status = 'active' AND a.expires_at < ? AND a.serial = "
                f"(SELECT max(serial) FROM {TABLE} WHERE device_id = a.device_id)",
                [horizon],
            )
        )
        if not rows:
            return []
        signer = self._signer or targets_signer(self.settings)
        registry = ModelRegistry(self.db)
        refreshed = []
        with immediate(self.db):
            for row in rows:
                old = _assignment(row)
                release = registry.get(old.model, old.version)
                artifact = next(a for a in release_artifacts(release) if a.file == old.artifact)
                self._issue(
                    old.device_id,
                    release,
                    artifact,
                    old.rollback,
                    old.rollout_id,
                    SYSTEM,
                    now,
                    expiry,
                    signer,
                )
                refreshed.append(old.device_id)
        log.info("re-signed %d desired document(s) close to expiry", len(refreshed))
        self._flush(refreshed, now)
        return refreshed

    def clear(self, device_id: str, now: datetime) -> FlushResult:
        """Clear the device's retained desired document (queued, then published)."""
        with immediate(self.db):
            enqueue(self.db, device_id, b"", None, now)
        return self._flush([device_id], now)


def _combined(refusals: list[tuple[str, FleetError]], asked: int) -> FleetError:
    """One error for every refused device: the device's own error when only one device was
    asked for, else one that lists them all (of their common class when they share one)."""
    if asked == 1:
        return refusals[0][1]
    kinds = {type(exc) for _, exc in refusals}
    cls: type[FleetError] = kinds.pop() if len(kinds) == 1 else AssignmentRefusedError
    listed = "; ".join(str(exc) for _, exc in refusals[:20])
    more = f" (and {len(refusals) - 20} more)" if len(refusals) > 20 else ""
    return cls(f"{len(refusals)} of {asked} devices refused, nothing was assigned: {listed}{more}")


# --- app-scoped parts: the retry job and the decommission listener ----------------------------


def retry_job(
    store: Store, settings: FleetSettings, outbox: DesiredOutbox, clock: Callable[[], datetime]
) -> FlushResult:
    """The scheduler job: re-sign documents close to expiry, then publish everything queued."""
    now = clock()
    with store.connect() as db:
        try:
            DesiredStateService(db, settings, outbox=None).refresh_expiring(now)
        except FleetError as exc:
            log.error("cannot re-sign desired documents close to expiry: %s", exc)
    return outbox.flush(now)


class ClearOnDecommission:
    """A :class:`fleet.devices.RevocationListener`: a decommissioned device's retained desired
    document is cleared (queued, so a broker outage only delays it)."""

    def __init__(
        self,
        store: Store,
        settings: FleetSettings,
        outbox: DesiredOutbox,
        clock: Callable[[], datetime],
    ) -> None:
        self.store = store
        self.settings = settings
        self.outbox = outbox
        self.clock = clock

    def device_revoked(self, device_id: str) -> None:
        with self.store.connect() as db:
            DesiredStateService(db, self.settings, self.outbox).clear(device_id, self.clock())
