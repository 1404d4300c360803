"""What the dashboard pages show, read from the database: the devices overview, per-window
drift scores over time (per device and merged across the fleet in time buckets), the merged
distribution against the reference, and two cohorts of devices compared with each other
(canary vs control).

Read-only. Scores come from :mod:`protocol.drift` (the devices' own scores for their windows;
the fleet's sums scored here), so the dashboard shows the same numbers as the API and alerts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlite_utils import Database

from fleet.errors import FleetError
from fleet.registry import ArtifactStore
from fleet.settings import FleetSettings
from fleet.telemetry import RegistryReferences, TelemetryService
from protocol.drift import WindowCounts, merge, score
from protocol.errors import ProtocolError
from protocol.reference import ReferenceProfile


@dataclass(frozen=True)
class DeviceRow:
    id: str
    group: str | None
    status: str
    online: bool
    last_seen: str | None
    model: str | None  # "name v3"
    last_heartbeat: float | None
    drift: bool | None  # newest window's verdict; None: no window yet
    drifted_features: tuple[str, ...]
    open_alerts: int


@dataclass(frozen=True)
class FeaturePoint:
    t: float  # window end
    device_id: str
    psi: dict[str, float | None]
    bound: float | None
    drifted: bool


@dataclass(frozen=True)
class Bucket:
    start: float
    end: float
    psi: dict[str, float | None]
    drifted: bool | None
    devices: int


@dataclass(frozen=True)
class Histogram:
    feature: str
    labels: tuple[str, ...]
    shares: dict[str, tuple[float, ...]]  # series name -> share per bin
    psi: float | None
    drifted: bool | None


@dataclass(frozen=True)
class Release:
    model: str
    version: int
    devices: int
    windows: int
    last_end: float


def devices_overview(db: Database) -> list[DeviceRow]:
    rows = db.query(
        """SELECT v.id, v.group_name, v.status, v.online, v.last_seen,
        s.model_name, s.model_version,
        (SELECT max(ts) FROM heartbeats h WHERE h.device_id = v.id) AS last_heartbeat,
        (SELECT drifted FROM drift_summaries d WHERE d.device_id = v.id
            ORDER BY window_end DESC LIMIT 1) AS drifted,
        (SELECT drifted_features FROM drift_summaries d WHERE d.device_id = v.id
            ORDER BY window_end DESC LIMIT 1) AS drifted_features,
        (SELECT count(*) FROM alerts a WHERE a.subject = v.id AND a.resolved_at IS NULL)
            AS open_alerts
        FROM devices v LEFT JOIN device_state s ON s.device_id = v.id
        ORDER BY v.status, v.id"""
    )
    return [
        DeviceRow(
            id=r["id"],
            group=r["group_name"],
            status=r["status"],
            online=bool(r["online"]),
            last_seen=r["last_seen"],
            model=f"{r['model_name']} v{r['model_version']}" if r["model_name"] else None,
            last_heartbeat=r["last_heartbeat"],
            drift=None if r["drifted"] is None else bool(r["drifted"]),
            drifted_features=tuple(json.loads(r["drifted_features"] or "[]")),
            open_alerts=int(r["open_alerts"]),
        )
        for r in rows
    ]


def releases_with_drift(db: Database, since: float) -> list[Release]:
    rows = db.query(
        "SELECT model_name, model_version, count(DISTINCT device_id) AS devices, "
        "count(*) AS windows, max(window_end) AS last_end FROM drift_summaries "
        "WHERE window_end > ? GROUP BY model_name, model_version ORDER BY model_name, "
        "model_version DESC",
        [since],
    )
    return [
        Release(r["model_name"], int(r["model_version"]), r["devices"], r["windows"], r["last_end"])
        for r in rows
    ]


def _points(rows: Any) -> list[FeaturePoint]:
    out = []
    for r in rows:
        scores = json.loads(r["body"])["scores"]
        feats = scores["features"]
        out.append(
            FeaturePoint(
                t=float(r["window_end"]),
                device_id=r["device_id"],
                psi={f["name"]: f["psi"] for f in feats},
                bound=feats[0]["psi_bound"] if feats else None,
                drifted=bool(scores["verdict"]["drifted"]),
            )
        )
    return out


def device_drift_points(
    db: Database, device_id: str, since: float, until: float
) -> list[FeaturePoint]:
    """One device's windows with the per-feature scores it computed, in time order."""
    rows = db.query(
        "SELECT d.device_id, d.window_end, m.body FROM drift_summaries d JOIN telemetry_messages m "
        "ON m.device_id = d.device_id AND m.seq = d.seq WHERE d.device_id = ? "
        "AND d.window_end > ? AND d.window_end <= ? ORDER BY d.window_end LIMIT 2000",
        [device_id, since, until],
    )
    return _points(rows)


def release_drift_points(
    db: Database, model: str, version: int, since: float, until: float
) -> list[FeaturePoint]:
    """Every device's windows of one model version, in time order."""
    rows = db.query(
        "SELECT d.device_id, d.window_end, m.body FROM drift_summaries d JOIN telemetry_messages m "
        "ON m.device_id = d.device_id AND m.seq = d.seq WHERE d.model_name = ? "
        "AND d.model_version = ? AND d.window_end > ? AND d.window_end <= ? "
        "ORDER BY d.window_end LIMIT 20000",
        [model, version, since, until],
    )
    return _points(rows)


def fleet_buckets(
    db: Database,
    settings: FleetSettings,
    model: str,
    version: int,
    since: float,
    until: float,
    count: int,
) -> list[Bucket]:
    """The fleet's merged drift in ``count`` equal buckets of (since, until]."""
    refs = RegistryReferences(db, ArtifactStore(settings.artifacts_dir))
    telemetry = TelemetryService(db)
    size = (until - since) / count
    out = []
    for i in range(count):
        lo, hi = since + i * size, since + (i + 1) * size
        try:
            m = telemetry.merged_drift(refs, model, version, lo, hi)
        except FleetError:
            out.append(Bucket(lo, hi, {}, None, 0))
            continue
        psi = {f["name"]: f["psi"] for f in m.scores["features"]}
        out.append(Bucket(lo, hi, psi, m.drifted, m.devices))
    return out


def reference_for(db: Database, settings: FleetSettings, sha256: str) -> ReferenceProfile | None:
    return RegistryReferences(db, ArtifactStore(settings.artifacts_dir)).reference(sha256)


def _counts(
    db: Database,
    model: str,
    version: int,
    since: float,
    until: float,
    devices: Sequence[str],
    other_versions: bool = False,
) -> WindowCounts | None:
    """The merged counts of ``devices``' windows of ``model`` v``version`` (or, with
    ``other_versions``, of any other version of it) that ended in (since, until]."""
    if not devices:
        return None
    marks = ",".join("?" for _ in devices)
    op = "!=" if other_versions else "="
    rows = db.execute(
        f"SELECT counts FROM drift_summaries WHERE model_name = ? AND model_version {op} ? "
        f"AND window_end > ? AND window_end <= ? AND device_id IN ({marks})",
        [model, version, since, until, *devices],
    ).fetchall()
    if not rows:
        return None
    try:
        return merge(WindowCounts.from_dict(json.loads(r[0])) for r in rows)
    except ProtocolError:  # windows binned with different reference profiles
        return None


def compare_cohorts(
    db: Database,
    settings: FleetSettings,
    names: tuple[str, str],
    first: WindowCounts | None,
    second: WindowCounts | None,
) -> list[Histogram]:
    """Per feature: bin shares of two cohorts and the PSI of the first against the second."""
    if first is None or second is None:
        return []
    try:
        s = score(first, second)
    except ProtocolError:
        return []
    ref = reference_for(db, settings, first.reference_sha256)
    out = []
    for j, f in enumerate(s.features):
        n_bins = len(first.feature_counts(j))
        edges = [float(e) for e in ref.features[j].edges] if ref else []
        labels = _labels(edges) if len(edges) + 1 == n_bins else tuple(map(str, range(n_bins)))
        out.append(
            Histogram(
                f.name,
                labels,
                {
                    names[0]: _shares(first.feature_counts(j)),
                    names[1]: _shares(second.feature_counts(j)),
                },
                f.test.psi,
                f.drifted,
            )
        )
    return out


def _labels(edges: Sequence[float]) -> tuple[str, ...]:
    inner = [f"{e:.2g}" for e in edges]
    return (
        "<" + inner[0],
        *(f"{a}…{b}" for a, b in zip(inner, inner[1:], strict=False)),
        ">" + inner[-1],
    )


def _shares(counts: Iterable[Any]) -> tuple[float, ...]:
    values = [float(c) for c in counts]
    total = sum(values) or 1.0
    return tuple(v / total for v in values)


def histograms(
    db: Database,
    settings: FleetSettings,
    model: str,
    version: int,
    since: float,
    until: float,
    cohorts: dict[str, Sequence[str]] | None = None,
) -> list[Histogram]:
    """Per feature: bin shares of the reference and of the merged window (or of each cohort);
    PSI of the window against the reference (or of the first cohort against the second)."""
    if cohorts:
        (a_name, a_ids), (b_name, b_ids) = list(cohorts.items())[:2]
        return compare_cohorts(
            db,
            settings,
            (a_name, b_name),
            _counts(db, model, version, since, until, a_ids),
            _counts(db, model, version, since, until, b_ids),
        )
    devices = [r[0] for r in db.execute("SELECT id FROM devices").fetchall()]
    window = _counts(db, model, version, since, until, devices) if devices else None
    if window is None:
        return []
    ref = reference_for(db, settings, window.reference_sha256)
    if ref is None:
        return []
    s = score(window, ref)
    return [
        Histogram(
            f.name,
            _labels([float(e) for e in ref.features[j].edges]),
            {
                "reference": _shares(ref.features[j].counts),
                "fleet": _shares(window.feature_counts(j)),
            },
            f.test.psi,
            f.drifted,
        )
        for j, f in enumerate(s.features)
    ]


def epoch(t: datetime) -> float:
    return t.timestamp()
