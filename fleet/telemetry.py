"""Telemetry queries: a device's current state and last heartbeat, heartbeat time series, drift
windows per device, and drift **merged** across the devices on one model version.

Merged drift sums the counts of every window that ended in the time range, of every device on
that model name and version (optionally one group), with :func:`protocol.drift.merge`, and scores
the sum against the release's reference profile: a fleet-wide verdict that a single device's
small window could never give. Windows binned with different reference profiles cannot be
summed: that is :class:`MixedReferenceError` (409), naming the hashes found.

Time ranges are half-open on the left: ``since < t <= until`` with ``t`` the heartbeat's ``ts``
or the drift window's end (device clocks, epoch seconds).

This module reads what :mod:`fleet.ingest_writer` stored; it writes nothing and knows no HTTP.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlite_utils import Database

from fleet.errors import ConflictError, InvalidInputError, NotFoundError, UnavailableError
from fleet.ingest_writer import read_counters
from fleet.registry import ArtifactStore
from protocol.drift import DriftSummary, WindowCounts, merge, score
from protocol.errors import ProtocolError
from protocol.reference import ReferenceProfile

log = logging.getLogger(__name__)

HEARTBEAT_METRICS: tuple[str, ...] = (
    "uptime_s",
    "cpu_percent",
    "mem_rss_bytes",
    "mem_available_bytes",
    "disk_free_bytes",
    "outbox_depth",
    "outbox_evicted_total",
    "inferences_total",
    "inference_errors_total",
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_p99_ms",
)
MAX_POINTS = 10_000
MAX_MERGED_WINDOWS = 100_000


# --- errors (HTTP status by base class, see fleet.app) ----------------------------------------


class MixedReferenceError(ConflictError):
    """Drift windows of one model version were binned with different reference profiles."""


class NoDriftDataError(NotFoundError):
    """No drift window matches the query."""


class ReferenceUnavailableError(UnavailableError):
    """The reference profile a drift merge needs is not in the model registry."""


# --- values -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActiveModelInfo:
    name: str
    version: int
    slot: str
    runtime: str


@dataclass(frozen=True)
class DeviceState:
    """The device's newest ``state`` report (birth or Last Will)."""

    seq: int
    ts: float
    online: bool
    agent_version: str
    profile: str
    model: ActiveModelInfo | None
    received_at: datetime


@dataclass(frozen=True)
class HeartbeatPoint:
    seq: int
    ts: float
    metrics: Mapping[str, float | None]
    model_name: str | None = None
    model_version: int | None = None


@dataclass(frozen=True)
class UpdateEvent:
    seq: int
    ts: float
    release_name: str
    release_version: int
    rollback: bool
    from_state: str
    to_state: str
    attempt: int
    reason: str | None


@dataclass(frozen=True)
class DeviceTelemetry:
    device_id: str
    status: str
    online: bool
    last_seen: datetime | None
    state: DeviceState | None
    last_heartbeat: HeartbeatPoint | None
    last_update: UpdateEvent | None


@dataclass(frozen=True)
class HeartbeatSeries:
    device_id: str
    since: float
    until: float
    metrics: tuple[str, ...]
    points: tuple[HeartbeatPoint, ...]
    truncated: bool  # more points matched than ``limit``; the earliest ones are returned


@dataclass(frozen=True)
class DriftWindow:
    device_id: str
    seq: int
    ts: float
    window_start: float
    window_end: float
    model_name: str
    model_version: int
    reference_sha256: str
    n: int
    drifted: bool
    drifted_features: tuple[str, ...]


@dataclass(frozen=True)
class MergedDrift:
    """Drift of the summed counts. ``scores`` is the wire form of the scores
    (:mod:`protocol.drift_wire`: per-feature ``psi``/``js``/``ks`` and bounds, ``output``,
    ``verdict``)."""

    model_name: str
    model_version: int
    reference_sha256: str
    group: str | None
    since: float
    until: float
    devices: int
    windows: int
    n: int
    window_start: float
    window_end: float
    drifted: bool
    drifted_features: tuple[str, ...]
    scores: Mapping[str, Any]


class ReferenceSource(Protocol):
    """Where reference profiles come from, by the sha256 of their file."""

    def reference(self, sha256: str) -> ReferenceProfile | None: ...


# --- the reference profiles of published releases ---------------------------------------------


class RegistryReferences:
    """Reference profiles of published releases: a ``release_artifacts`` row of kind
    ``reference`` with that sha256, read from the content-addressed :class:`ArtifactStore`."""

    def __init__(self, db: Database, artifacts: ArtifactStore) -> None:
        self.db = db
        self.artifacts = artifacts

    def reference(self, sha256: str) -> ReferenceProfile | None:
        row = self.db.execute(
            "SELECT 1 FROM release_artifacts WHERE kind = 'reference' AND sha256 = ? LIMIT 1",
            [sha256],
        ).fetchone()
        if row is None:
            return None
        path = self.artifacts.path(sha256)
        try:
            data = path.read_bytes()
        except OSError as exc:
            log.error("reference profile %s is published but unreadable: %s", sha256, exc)
            return None
        if hashlib.sha256(data).hexdigest() != sha256:
            log.error("reference profile file %s does not match its sha256", path)
            return None
        return ReferenceProfile.from_json(data)


# --- queries ----------------------------------------------------------------------------------


def _epoch(t: datetime | float) -> float:
    return t.timestamp() if isinstance(t, datetime) else float(t)


def _heartbeat(row: Mapping[str, Any], metrics: tuple[str, ...]) -> HeartbeatPoint:
    return HeartbeatPoint(
        seq=int(row["seq"]),
        ts=float(row["ts"]),
        metrics={m: row[m] for m in metrics},
        model_name=row["model_name"],
        model_version=row["model_version"],
    )


def _state(row: Mapping[str, Any]) -> DeviceState:
    model = None
    if row["model_name"] is not None:
        model = ActiveModelInfo(
            row["model_name"], int(row["model_version"]), row["model_slot"], row["model_runtime"]
        )
    return DeviceState(
        seq=int(row["seq"]),
        ts=float(row["ts"]),
        online=bool(row["online"]),
        agent_version=row["agent_version"],
        profile=row["profile"],
        model=model,
        received_at=datetime.fromisoformat(row["received_at"]),
    )


def _update(row: Mapping[str, Any]) -> UpdateEvent:
    return UpdateEvent(
        seq=int(row["seq"]),
        ts=float(row["ts"]),
        release_name=row["release_name"],
        release_version=int(row["release_version"]),
        rollback=bool(row["rollback"]),
        from_state=row["from_state"],
        to_state=row["to_state"],
        attempt=int(row["attempt"]),
        reason=row["reason"],
    )


def _window(row: Mapping[str, Any]) -> DriftWindow:
    return DriftWindow(
        device_id=row["device_id"],
        seq=int(row["seq"]),
        ts=float(row["ts"]),
        window_start=float(row["window_start"]),
        window_end=float(row["window_end"]),
        model_name=row["model_name"],
        model_version=int(row["model_version"]),
        reference_sha256=row["reference_sha256"],
        n=int(row["n"]),
        drifted=bool(row["drifted"]),
        drifted_features=tuple(json.loads(row["drifted_features"])),
    )


def _check_range(since: float, until: float) -> None:
    if since >= until:
        raise InvalidInputError(f"since ({since}) must be before until ({until}); swap them")


class TelemetryService:
    """Read-only queries over one connection."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def _one(self, sql: str, params: list[Any]) -> dict[str, Any] | None:
        rows = list(self.db.query(sql, params))
        return rows[0] if rows else None

    def _device_row(self, device_id: str) -> dict[str, Any]:
        row = self._one(
            "SELECT id, status, online, last_seen FROM devices WHERE id = ?", [device_id]
        )
        if row is None:
            raise NotFoundError(
                f"no device {device_id!r}; GET /v1/devices?search=... finds devices by id"
            )
        return row

    def detail(self, device_id: str) -> DeviceTelemetry:
        """Current state, last heartbeat and last update transition of one device."""
        device = self._device_row(device_id)
        state = self._one("SELECT * FROM device_state WHERE device_id = ?", [device_id])
        beat = self._one(
            "SELECT * FROM heartbeats WHERE device_id = ? ORDER BY seq DESC LIMIT 1", [device_id]
        )
        update = self._one(
            "SELECT * FROM update_events WHERE device_id = ? ORDER BY seq DESC LIMIT 1",
            [device_id],
        )
        return DeviceTelemetry(
            device_id=device_id,
            status=device["status"],
            online=bool(device["online"]),
            last_seen=datetime.fromisoformat(device["last_seen"]) if device["last_seen"] else None,
            state=_state(state) if state else None,
            last_heartbeat=_heartbeat(beat, HEARTBEAT_METRICS) if beat else None,
            last_update=_update(update) if update else None,
        )

    def heartbeats(
        self,
        device_id: str,
        since: datetime | float,
        until: datetime | float,
        metrics: tuple[str, ...] = (),
        limit: int = 1000,
    ) -> HeartbeatSeries:
        """Heartbeats with ``since < ts <= until`` in time order; ``metrics`` picks columns."""
        lo, hi = _epoch(since), _epoch(until)
        _check_range(lo, hi)
        unknown = [m for m in metrics if m not in HEARTBEAT_METRICS]
        if unknown:
            raise InvalidInputError(
                f"unknown heartbeat metric {', '.join(unknown)}; use one of "
                + ", ".join(HEARTBEAT_METRICS)
            )
        chosen = tuple(dict.fromkeys(metrics)) or HEARTBEAT_METRICS
        limit = max(1, min(limit, MAX_POINTS))
        self._device_row(device_id)
        columns = ", ".join(chosen)  # names come from HEARTBEAT_METRICS only
        rows = list(
            self.db.query(
                f"SELECT seq, ts, model_name, model_version, {columns} FROM heartbeats "
                "WHERE device_id = ? AND ts > ? AND ts <= ? ORDER BY ts, seq LIMIT ?",
                [device_id, lo, hi, limit + 1],
            )
        )
        points = tuple(_heartbeat(r, chosen) for r in rows[:limit])
        return HeartbeatSeries(device_id, lo, hi, chosen, points, len(rows) > limit)

    def drift_windows(
        self, device_id: str, since: datetime | float, until: datetime | float, limit: int = 1000
    ) -> tuple[DriftWindow, ...]:
        """One device's drift windows that ended in the range, in time order."""
        lo, hi = _epoch(since), _epoch(until)
        _check_range(lo, hi)
        self._device_row(device_id)
        rows = self.db.query(
            "SELECT * FROM drift_summaries WHERE device_id = ? AND window_end > ? "
            "AND window_end <= ? ORDER BY window_end, seq LIMIT ?",
            [device_id, lo, hi, max(1, min(limit, MAX_POINTS))],
        )
        return tuple(_window(r) for r in rows)

    def merged_counts(
        self,
        model_name: str,
        model_version: int,
        since: datetime | float,
        until: datetime | float,
        group: str | None = None,
    ) -> tuple[WindowCounts, int, int]:
        """The sum of the matching windows' counts, the number of devices and of windows."""
        lo, hi = _epoch(since), _epoch(until)
        _check_range(lo, hi)
        where = (
            "d.model_name = ? AND d.model_version = ? AND d.window_end > ? AND d.window_end <= ?"
        )
        params: list[Any] = [model_name, model_version, lo, hi]
        if group is not None:
            where += " AND v.group_name = ?"
            params.append(group)
        source = f"FROM drift_summaries d JOIN devices v ON v.id = d.device_id WHERE {where}"
        refs = [
            r[0] for r in self.db.execute(f"SELECT DISTINCT d.reference_sha256 {source}", params)
        ]
        what = f"{model_name} v{model_version}" + (f" in group {group!r}" if group else "")
        if not refs:
            raise NoDriftDataError(
                f"no drift windows of {what} ended in ({lo}, {hi}]; widen since/until or check "
                "the model name and version (GET /v1/devices/{id}/drift lists a device's windows)"
            )
        if len(refs) > 1:
            raise MixedReferenceError(
                f"drift windows of {what} were binned with {len(refs)} different reference "
                f"profiles ({', '.join(sorted(r[:12] for r in refs))}); counts of different "
                "profiles cannot be summed: one model version must ship one reference profile"
            )
        rows = self.db.execute(
            f"SELECT d.device_id, d.counts {source} ORDER BY d.window_end LIMIT ?",
            [*params, MAX_MERGED_WINDOWS + 1],
        ).fetchall()
        if len(rows) > MAX_MERGED_WINDOWS:
            raise InvalidInputError(
                f"more than {MAX_MERGED_WINDOWS} drift windows match; narrow since/until or "
                "filter by group"
            )
        try:
            merged = merge(WindowCounts.from_dict(json.loads(r[1])) for r in rows)
        except ProtocolError as exc:
            raise MixedReferenceError(f"drift windows of {what} cannot be merged: {exc}") from exc
        return merged, len({r[0] for r in rows}), len(rows)

    def merged_drift(
        self,
        references: ReferenceSource,
        model_name: str,
        model_version: int,
        since: datetime | float,
        until: datetime | float,
        group: str | None = None,
    ) -> MergedDrift:
        """Sum the counts of every device on ``model_name`` v``model_version``, then score."""
        merged, devices, windows = self.merged_counts(
            model_name, model_version, since, until, group
        )
        reference = references.reference(merged.reference_sha256)
        if reference is None:
            raise ReferenceUnavailableError(
                f"the reference profile {merged.reference_sha256} of {model_name} "
                f"v{model_version} is not in the model registry; publish that release's bundle "
                "so its reference profile is known"
            )
        summary = DriftSummary(merged, score(merged, reference))
        verdict = summary.verdict
        return MergedDrift(
            model_name=model_name,
            model_version=model_version,
            reference_sha256=merged.reference_sha256,
            group=group,
            since=_epoch(since),
            until=_epoch(until),
            devices=devices,
            windows=windows,
            n=merged.n,
            window_start=merged.start,
            window_end=merged.end,
            drifted=verdict.drifted,
            drifted_features=verdict.drifted_features,
            scores=summary.to_dict()["scores"],
        )

    def ingest_counters(self) -> dict[str, int]:
        """All-time ingestion counters (stored per kind, duplicates, rejected per reason)."""
        return read_counters(self.db)
