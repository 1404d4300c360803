"""Alert rules: given facts about the fleet and ``now``, which alerts are open.

Pure: no database, HTTP or clock. :mod:`fleet.alert_service` gathers the facts (devices'
last contact, their newest drift windows, fleet-wide drift verdicts per time bucket, rollouts'
states), calls :func:`evaluate`, and reconciles the result with the stored alerts: a key that
appears opens an alert, a key that disappears resolves it.

The rules, one function each:

* ``device_offline`` — an active device whose last contact is ``offline_after`` or more ago
  (a device never seen raises nothing: it may not be installed yet).
* ``drift_device`` — a device's newest drift window (ended within ``drift_lookback``) is
  drifted; one alert per (device, model version).
* ``drift_fleet`` — the newest complete fleet bucket of a model version (every device's
  counts summed, scored against the reference) is drifted.
* ``retraining_recommended`` — the last ``retrain_windows`` fleet buckets of a model version
  are all drifted (an empty bucket breaks the run: no evidence is not evidence of drift).
* ``rollout_paused`` / ``rollout_rolled_back`` — a paused rollout; one rolling back, or rolled
  back less than ``rollback_alert_for`` ago.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any


class AlertKind(StrEnum):
    DEVICE_OFFLINE = "device_offline"
    DRIFT_DEVICE = "drift_device"
    DRIFT_FLEET = "drift_fleet"
    RETRAINING_RECOMMENDED = "retraining_recommended"
    ROLLOUT_PAUSED = "rollout_paused"
    ROLLOUT_ROLLED_BACK = "rollout_rolled_back"


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


SEVERITY: dict[AlertKind, Severity] = {
    AlertKind.DEVICE_OFFLINE: Severity.WARNING,
    AlertKind.DRIFT_DEVICE: Severity.WARNING,
    AlertKind.DRIFT_FLEET: Severity.CRITICAL,
    AlertKind.RETRAINING_RECOMMENDED: Severity.CRITICAL,
    AlertKind.ROLLOUT_PAUSED: Severity.WARNING,
    AlertKind.ROLLOUT_ROLLED_BACK: Severity.CRITICAL,
}


@dataclass(frozen=True)
class Thresholds:
    offline_after: timedelta = timedelta(minutes=15)
    drift_lookback: timedelta = timedelta(hours=6)
    retrain_windows: int = 3
    rollback_alert_for: timedelta = timedelta(hours=24)

    def __post_init__(self) -> None:
        if self.retrain_windows < 2:
            raise ValueError("retrain_windows must be 2 or more (one window is drift_fleet)")


@dataclass(frozen=True)
class DeviceContact:
    device_id: str
    online: bool
    last_seen: datetime | None


@dataclass(frozen=True)
class DeviceDrift:
    """A device's newest drift window of one model version."""

    device_id: str
    model: str
    version: int
    window_end: datetime
    drifted: bool
    drifted_features: tuple[str, ...] = ()


@dataclass(frozen=True)
class FleetBucket:
    """The fleet-wide verdict of one time bucket; ``drifted`` is None when it holds no data."""

    start: datetime
    end: datetime
    drifted: bool | None
    drifted_features: tuple[str, ...] = ()
    devices: int = 0


@dataclass(frozen=True)
class FleetDrift:
    """A model version's complete fleet buckets, oldest first."""

    model: str
    version: int
    buckets: tuple[FleetBucket, ...]


@dataclass(frozen=True)
class RolloutStatus:
    rollout_id: str
    state: str
    model: str
    version: int
    changed_at: datetime
    reason: str = ""


@dataclass(frozen=True)
class Facts:
    devices: tuple[DeviceContact, ...] = ()
    device_drift: tuple[DeviceDrift, ...] = ()
    fleet_drift: tuple[FleetDrift, ...] = ()
    rollouts: tuple[RolloutStatus, ...] = ()


@dataclass(frozen=True)
class OpenAlert:
    """An alert the rules say is open now. ``key`` identifies the condition."""

    key: str
    kind: AlertKind
    subject: str
    message: str
    details: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def severity(self) -> Severity:
        return SEVERITY[self.kind]


def _ago(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} d"


def offline(devices: Iterable[DeviceContact], t: Thresholds, now: datetime) -> list[OpenAlert]:
    out = []
    for d in devices:
        if d.last_seen is None or now - d.last_seen < t.offline_after:
            continue
        silent = now - d.last_seen
        state = "offline" if not d.online else "silent (no report)"
        out.append(
            OpenAlert(
                key=f"{AlertKind.DEVICE_OFFLINE}:{d.device_id}",
                kind=AlertKind.DEVICE_OFFLINE,
                subject=d.device_id,
                message=f"device {d.device_id} is {state} for {_ago(silent)} "
                f"(threshold {_ago(t.offline_after)})",
                details={"last_seen": d.last_seen.isoformat(), "online_flag": d.online},
            )
        )
    return out


def device_drift(drift: Iterable[DeviceDrift], t: Thresholds, now: datetime) -> list[OpenAlert]:
    out = []
    for d in drift:
        if not d.drifted or now - d.window_end > t.drift_lookback:
            continue
        release = f"{d.model}/{d.version}"
        features = ", ".join(d.drifted_features) or "the output"
        out.append(
            OpenAlert(
                key=f"{AlertKind.DRIFT_DEVICE}:{d.device_id}:{release}",
                kind=AlertKind.DRIFT_DEVICE,
                subject=d.device_id,
                message=f"drift alarm on device {d.device_id} ({release}): {features}",
                details={
                    "model": d.model,
                    "version": d.version,
                    "window_end": d.window_end.isoformat(),
                    "drifted_features": list(d.drifted_features),
                },
            )
        )
    return out


def _drifted_run(buckets: tuple[FleetBucket, ...]) -> int:
    run = 0
    for b in reversed(buckets):
        if b.drifted is not True:
            break
        run += 1
    return run


def fleet_drift(fleet: Iterable[FleetDrift], t: Thresholds) -> list[OpenAlert]:
    out = []
    for f in fleet:
        if not f.buckets:
            continue
        release = f"{f.model}/{f.version}"
        last = f.buckets[-1]
        base = {"model": f.model, "version": f.version}
        if last.drifted:
            out.append(
                OpenAlert(
                    key=f"{AlertKind.DRIFT_FLEET}:{release}",
                    kind=AlertKind.DRIFT_FLEET,
                    subject=release,
                    message=f"fleet-wide drift alarm on {release} over {last.devices} device(s): "
                    + (", ".join(last.drifted_features) or "the output"),
                    details={
                        **base,
                        "bucket_start": last.start.isoformat(),
                        "bucket_end": last.end.isoformat(),
                        "devices": last.devices,
                        "drifted_features": list(last.drifted_features),
                    },
                )
            )
        run = _drifted_run(f.buckets)
        if run >= t.retrain_windows:
            out.append(
                OpenAlert(
                    key=f"{AlertKind.RETRAINING_RECOMMENDED}:{release}",
                    kind=AlertKind.RETRAINING_RECOMMENDED,
                    subject=release,
                    message=f"retraining recommended for {release}: fleet-wide drift in the "
                    f"last {run} windows in a row (threshold {t.retrain_windows})",
                    details={**base, "windows": run, "since": f.buckets[-run].start.isoformat()},
                )
            )
    return out


def rollouts(items: Iterable[RolloutStatus], t: Thresholds, now: datetime) -> list[OpenAlert]:
    out = []
    for r in items:
        if r.state == "paused":
            kind = AlertKind.ROLLOUT_PAUSED
        elif r.state == "rolling_back" or (
            r.state == "rolled_back" and now - r.changed_at < t.rollback_alert_for
        ):
            kind = AlertKind.ROLLOUT_ROLLED_BACK
        else:
            continue
        word = {"paused": "paused", "rolling_back": "rolling back"}.get(r.state, "rolled back")
        why = f": {r.reason}" if r.reason else ""
        out.append(
            OpenAlert(
                key=f"{kind}:{r.rollout_id}",
                kind=kind,
                subject=r.rollout_id,
                message=f"rollout {r.rollout_id} of {r.model}/{r.version} {word}{why}",
                details={
                    "model": r.model,
                    "version": r.version,
                    "state": r.state,
                    "reason": r.reason,
                    "changed_at": r.changed_at.isoformat(),
                },
            )
        )
    return out


def evaluate(facts: Facts, thresholds: Thresholds, now: datetime) -> tuple[OpenAlert, ...]:
    """Every alert open at ``now``, one per key, sorted by key."""
    found = [
        *offline(facts.devices, thresholds, now),
        *device_drift(facts.device_drift, thresholds, now),
        *fleet_drift(facts.fleet_drift, thresholds),
        *rollouts(facts.rollouts, thresholds, now),
    ]
    by_key = {a.key: a for a in found}
    return tuple(by_key[k] for k in sorted(by_key))


@dataclass(frozen=True)
class Reconciliation:
    """What changes: alerts to open, open ones to refresh (message changed), keys to resolve."""

    opened: tuple[OpenAlert, ...]
    refreshed: tuple[OpenAlert, ...]
    resolved: tuple[str, ...]


def reconcile(stored: dict[str, str], current: Iterable[OpenAlert]) -> Reconciliation:
    """Compare the stored open alerts (key -> message) with the rules' ``current`` ones."""
    now_open = {a.key: a for a in current}
    return Reconciliation(
        opened=tuple(a for k, a in now_open.items() if k not in stored),
        refreshed=tuple(a for k, a in now_open.items() if k in stored and stored[k] != a.message),
        resolved=tuple(sorted(k for k in stored if k not in now_open)),
    )
