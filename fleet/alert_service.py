"""Alerts, stored: gather the facts, run the rules (:mod:`fleet.alerts`), open new alerts,
refresh or resolve stored ones, and queue each opening and resolution for the webhooks
(:mod:`fleet.webhooks`) in the same transaction.

One open alert per key (a unique index): evaluating twice in a row changes nothing; a
condition that clears resolves its alert, and one that comes back opens a new alert. Operators
acknowledge alerts (it records who saw it; only the rules resolve).

Facts come from the tables other parts fill: ``devices`` (last contact), ``drift_summaries``
(each device's newest window per model version), fleet-wide drift per time bucket
(:meth:`fleet.telemetry.TelemetryService.merged_drift`, scored against the release's reference
profile), and the rollouts' states when the ``rollouts`` table exists.

This module knows no HTTP; the jobs :func:`evaluate_job` and :func:`deliver_job` run on the
app's scheduler (see :mod:`fleet.routes.webhooks`).
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from sqlite_utils import Database

from fleet.alerts import (
    AlertKind,
    DeviceContact,
    DeviceDrift,
    Facts,
    FleetBucket,
    FleetDrift,
    OpenAlert,
    RolloutStatus,
    Thresholds,
    evaluate,
    reconcile,
)
from fleet.errors import FleetError, InvalidInputError, NotFoundError
from fleet.registry import ArtifactStore
from fleet.settings import AlertSettings, FleetSettings
from fleet.store import Store, from_iso, immediate, iso
from fleet.telemetry import RegistryReferences, TelemetryService
from fleet.webhooks import WebhookService

log = logging.getLogger(__name__)

OPENED = "alert.opened"
RESOLVED = "alert.resolved"
STATES = ("open", "resolved", "all")


class AlertNotFoundError(NotFoundError):
    """No alert with that id."""


@dataclass(frozen=True)
class Alert:
    id: str
    key: str
    kind: str
    severity: str
    subject: str
    message: str
    details: dict[str, Any]
    opened_at: datetime
    updated_at: datetime
    resolved_at: datetime | None
    acknowledged_at: datetime | None
    acknowledged_by: str | None

    @property
    def open(self) -> bool:
        return self.resolved_at is None

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        for k, v in doc.items():
            if isinstance(v, datetime):
                doc[k] = iso(v)
        return doc


@dataclass(frozen=True)
class Evaluation:
    opened: tuple[str, ...]
    resolved: tuple[str, ...]
    open: int


def thresholds(s: AlertSettings) -> Thresholds:
    return Thresholds(
        offline_after=s.offline_after,
        drift_lookback=s.drift_lookback,
        retrain_windows=s.retrain_windows,
        rollback_alert_for=s.rollback_alert_for,
    )


def _alert(row: Mapping[str, Any]) -> Alert:
    return Alert(
        id=row["id"],
        key=row["key"],
        kind=row["kind"],
        severity=row["severity"],
        subject=row["subject"],
        message=row["message"],
        details=json.loads(row["details"]),
        opened_at=from_iso(row["opened_at"]),
        updated_at=from_iso(row["updated_at"]),
        resolved_at=from_iso(row["resolved_at"]) if row["resolved_at"] else None,
        acknowledged_at=from_iso(row["acknowledged_at"]) if row["acknowledged_at"] else None,
        acknowledged_by=row["acknowledged_by"],
    )


def _utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


# --- facts ------------------------------------------------------------------------------------


class FactSource:
    """Reads the facts the rules need from the database."""

    def __init__(self, db: Database, settings: FleetSettings) -> None:
        self.db = db
        self.settings = settings
        self.references = RegistryReferences(db, ArtifactStore(settings.artifacts_dir))

    def devices(self) -> tuple[DeviceContact, ...]:
        rows = self.db.query("SELECT id, online, last_seen FROM devices WHERE status = 'active'")
        return tuple(
            DeviceContact(
                r["id"], bool(r["online"]), from_iso(r["last_seen"]) if r["last_seen"] else None
            )
            for r in rows
        )

    def device_drift(self, now: datetime) -> tuple[DeviceDrift, ...]:
        since = (now - self.settings.alerts.drift_lookback).timestamp()
        # SQLite returns the other columns of the row holding MAX(window_end)
        rows = self.db.query(
            "SELECT d.device_id, d.model_name, d.model_version, MAX(d.window_end) AS window_end, "
            "d.drifted, d.drifted_features FROM drift_summaries d JOIN devices v "
            "ON v.id = d.device_id AND v.status = 'active' WHERE d.window_end > ? "
            "GROUP BY d.device_id, d.model_name, d.model_version",
            [since],
        )
        return tuple(
            DeviceDrift(
                r["device_id"],
                r["model_name"],
                int(r["model_version"]),
                _utc(r["window_end"]),
                bool(r["drifted"]),
                tuple(json.loads(r["drifted_features"])),
            )
            for r in rows
        )

    def fleet_buckets(self, now: datetime) -> tuple[float, list[tuple[float, float]]]:
        """The last ``retrain_windows`` complete buckets, aligned to multiples of their size."""
        size = self.settings.alerts.fleet_window.total_seconds()
        end = (now.timestamp() // size) * size
        count = self.settings.alerts.retrain_windows
        return size, [
            (end - (count - i) * size, end - (count - i - 1) * size) for i in range(count)
        ]

    def fleet_drift(self, now: datetime) -> tuple[FleetDrift, ...]:
        _, buckets = self.fleet_buckets(now)
        lo, hi = buckets[0][0], buckets[-1][1]
        releases = self.db.execute(
            "SELECT DISTINCT model_name, model_version FROM drift_summaries "
            "WHERE window_end > ? AND window_end <= ? ORDER BY model_name, model_version",
            [lo, hi],
        ).fetchall()
        telemetry = TelemetryService(self.db)
        out = []
        for model, version in releases:
            found = []
            for b_lo, b_hi in buckets:
                try:
                    m = telemetry.merged_drift(self.references, model, int(version), b_lo, b_hi)
                except NotFoundError:
                    found.append(FleetBucket(_utc(b_lo), _utc(b_hi), None))
                    continue
                except FleetError as exc:  # mixed or unpublished reference: no verdict
                    log.warning("no fleet drift verdict for %s/%s: %s", model, version, exc)
                    found.append(FleetBucket(_utc(b_lo), _utc(b_hi), None))
                    continue
                found.append(
                    FleetBucket(
                        _utc(b_lo), _utc(b_hi), m.drifted, m.drifted_features, devices=m.devices
                    )
                )
            out.append(FleetDrift(model, int(version), tuple(found)))
        return tuple(out)

    def rollouts(self) -> tuple[RolloutStatus, ...]:
        """Paused and rolled-back rollouts, read from the rollout controller's table."""
        if "rollouts" not in self.db.table_names():
            return ()
        columns = set(self.db["rollouts"].columns_dict)
        need = {"id", "state", "model", "version", "updated_at"}
        if not need <= columns:
            log.warning("rollouts table lacks %s: rollout alerts are off", need - columns)
            return ()
        reason = "reason" if "reason" in columns else "''"
        rows = self.db.query(
            f"SELECT id, state, model, version, updated_at, {reason} AS reason FROM rollouts "
            "WHERE state IN ('paused', 'rolling_back', 'rolled_back')"
        )
        return tuple(
            RolloutStatus(
                r["id"],
                r["state"],
                r["model"],
                int(r["version"]),
                from_iso(r["updated_at"]),
                r["reason"] or "",
            )
            for r in rows
        )

    def facts(self, now: datetime) -> Facts:
        return Facts(
            devices=self.devices(),
            device_drift=self.device_drift(now),
            fleet_drift=self.fleet_drift(now),
            rollouts=self.rollouts(),
        )


# --- the service ------------------------------------------------------------------------------


class AlertService:
    def __init__(self, db: Database, settings: FleetSettings) -> None:
        self.db = db
        self.settings = settings
        self.webhooks = WebhookService(db)

    def evaluate(self, now: datetime) -> Evaluation:
        """Run the rules on the current facts and store the result (see module docstring)."""
        current = evaluate(
            FactSource(self.db, self.settings).facts(now), thresholds(self.settings.alerts), now
        )
        opened: list[str] = []
        with immediate(self.db):
            stored = {
                r["key"]: r["message"]
                for r in self.db.query("SELECT key, message FROM alerts WHERE resolved_at IS NULL")
            }
            change = reconcile(stored, current)
            for a in change.opened:
                opened.append(self._open(a, now))
            for a in change.refreshed:
                self.db.execute(
                    "UPDATE alerts SET message = ?, details = ?, updated_at = ? "
                    "WHERE key = ? AND resolved_at IS NULL",
                    [a.message, json.dumps(a.details, sort_keys=True), iso(now), a.key],
                )
            resolved = [self._resolve(key, now) for key in change.resolved]
        for alert_id in opened:
            log.info("alert opened: %s", self.get(alert_id).message)
        return Evaluation(tuple(opened), tuple(resolved), len(current))

    def _open(self, a: OpenAlert, now: datetime) -> str:
        alert_id = "alr-" + secrets.token_hex(6)
        self.db.execute(
            "INSERT INTO alerts (id, key, kind, severity, subject, message, details, opened_at, "
            "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                alert_id,
                a.key,
                str(a.kind),
                str(a.severity),
                a.subject,
                a.message,
                json.dumps(a.details, sort_keys=True),
                iso(now),
                iso(now),
            ],
        )
        self._notify(alert_id, OPENED, now)
        return alert_id

    def _resolve(self, key: str, now: datetime) -> str:
        row = self.db.execute(
            "SELECT id FROM alerts WHERE key = ? AND resolved_at IS NULL", [key]
        ).fetchone()
        self.db.execute(
            "UPDATE alerts SET resolved_at = ?, updated_at = ? WHERE id = ?",
            [iso(now), iso(now), row[0]],
        )
        self._notify(row[0], RESOLVED, now)
        return str(row[0])

    def _notify(self, alert_id: str, event: str, now: datetime) -> None:
        alert = self.get(alert_id)
        payload = {
            "alert": alert.to_dict(),
            "fleet": self.settings.base_url,
            "occurred_at": iso(now),
        }
        self.webhooks.enqueue(alert_id, event, payload, now)

    def get(self, alert_id: str) -> Alert:
        rows = list(self.db.query("SELECT * FROM alerts WHERE id = ?", [alert_id]))
        if not rows:
            raise AlertNotFoundError(f"no alert {alert_id!r}; `fleet alert list` lists them")
        return _alert(rows[0])

    def find(
        self,
        state: str = "open",
        kind: str | None = None,
        subject: str | None = None,
        limit: int = 100,
    ) -> list[Alert]:
        if state not in STATES:
            raise InvalidInputError(f"state {state!r}: use one of {', '.join(STATES)}")
        if kind is not None and kind not in {k.value for k in AlertKind}:
            raise InvalidInputError(
                f"kind {kind!r}: use one of {', '.join(k.value for k in AlertKind)}"
            )
        where, params = [], []
        if state == "open":
            where.append("resolved_at IS NULL")
        elif state == "resolved":
            where.append("resolved_at IS NOT NULL")
        if kind:
            where.append("kind = ?")
            params.append(kind)
        if subject:
            where.append("subject = ?")
            params.append(subject)
        sql = "SELECT * FROM alerts" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY opened_at DESC, id LIMIT ?"
        return [_alert(r) for r in self.db.query(sql, [*params, max(1, min(limit, 10_000))])]

    def acknowledge(self, alert_id: str, who: str, now: datetime) -> Alert:
        self.get(alert_id)
        with immediate(self.db):
            self.db.execute(
                "UPDATE alerts SET acknowledged_at = COALESCE(acknowledged_at, ?), "
                "acknowledged_by = COALESCE(acknowledged_by, ?) WHERE id = ?",
                [iso(now), who, alert_id],
            )
        return self.get(alert_id)


# --- jobs -------------------------------------------------------------------------------------


def evaluate_job(store: Store, settings: FleetSettings, now: datetime) -> Evaluation | None:
    """The ``evaluate_alerts`` job; errors are logged (the next run tries again)."""
    try:
        with store.connect() as db:
            return AlertService(db, settings).evaluate(now)
    except FleetError as exc:
        log.error("alert evaluation failed: %s", exc)
        return None


def deliver_job(
    store: Store, settings: FleetSettings, now: datetime, client: httpx.Client | None = None
) -> tuple[int, int]:
    """The ``deliver_webhooks`` job: POST the due deliveries once each."""
    own = client is None
    http = client or httpx.Client(
        timeout=settings.alerts.delivery_timeout.total_seconds(), follow_redirects=False
    )
    try:
        with store.connect() as db:
            return WebhookService(db).deliver_due(http, now, settings.alerts.max_attempts)
    finally:
        if own:
            http.close()
