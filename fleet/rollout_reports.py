"""What the stored reports say about one rollout, as :mod:`fleet.gates` records.

* :meth:`RolloutReports.progress` — each device of the rollout with its outcome for the release
  (from its ``update`` reports, else its ``state`` report): pending, updating, committed,
  failed, rolled back (by itself, or back on its previous version after the fleet's signed
  rollback), whether its trial failed, and when the fleet last received an update report from
  it (heartbeats do not count: stuck means silent about the update).
* :meth:`RolloutReports.latency` — p95 latencies of heartbeats in a time window, split into the
  devices on the release and those on an older version.
* :meth:`RolloutReports.drift` — drift windows of the same window merged per cohort (canaries on
  the release, control on an older version): output class counts always, input feature counts
  when both cohorts were binned with one reference profile.

Read-only: the tables are written by ingestion (:mod:`fleet.ingest_writer`) and the rollout
service (:mod:`fleet.rollouts`); the judging is :mod:`fleet.gates`' job.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlite_utils import Database

from fleet.gates import DeviceProgress, DriftInput, LatencyInput, Outcome
from fleet.store import from_iso
from protocol.bodies import UPDATE_STATES
from protocol.drift import WindowCounts, merge
from protocol.errors import ProtocolError

log = logging.getLogger(__name__)

MAX_DRIFT_WINDOWS = 50_000
# a device reporting one of these is still on its way to the new release (shadow included)
UPDATING_STATES = frozenset(UPDATE_STATES) - {"committed", "rolling_back", "rolled_back", "failed"}
IN_ROLLOUT = "device_id IN (SELECT device_id FROM rollout_devices WHERE rollout_id = ?)"


def _epoch(t: datetime) -> float:
    return t.timestamp()


class RolloutReports:
    """Reads for rollout ``rollout_id`` of ``model`` v``version`` on one connection."""

    def __init__(self, db: Database, rollout_id: str, model: str, version: int) -> None:
        self.db = db
        self.rollout_id = rollout_id
        self.model = model
        self.version = version

    def progress(self) -> list[DeviceProgress]:
        """Every placed device of the rollout (not those set aside with a note)."""
        rows = list(
            self.db.query(
                "SELECT r.device_id, r.stage, r.assigned_at, r.rollback_at, r.from_version, "
                "r.note, s.model_name AS running_model, "
                "s.model_version AS running_version FROM rollout_devices r "
                "LEFT JOIN device_state s ON s.device_id = r.device_id "
                "WHERE r.rollout_id = ? AND r.note IS NULL ORDER BY r.stage, r.device_id",
                [self.rollout_id],
            )
        )
        events: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
        for e in self.db.query(
            "SELECT e.device_id, e.from_state, e.to_state, e.reason, e.rollback, "
            "e.release_version, m.received_at FROM update_events e JOIN rollout_devices r "
            "ON r.device_id = e.device_id AND r.rollout_id = ? "
            "JOIN telemetry_messages m ON m.device_id = e.device_id AND m.seq = e.seq "
            "WHERE e.release_name = ? AND e.release_version IN (?, coalesce(r.from_version, -1)) "
            "ORDER BY e.seq",
            [self.rollout_id, self.model, self.version],
        ):
            events[e["device_id"]].append(e)
        out = []
        for r in rows:
            mine = [e for e in events[r["device_id"]] if e["release_version"] == self.version]
            mine = [e for e in mine if not e["rollback"]]
            outcome, reason = Outcome.PENDING, None
            if r["assigned_at"] is not None:
                if mine:
                    last = mine[-1]
                    reason = last["reason"]
                    to = last["to_state"]
                    if to == "committed":
                        outcome = Outcome.COMMITTED
                    elif to == "failed":
                        outcome = Outcome.FAILED
                    elif to in ("rolling_back", "rolled_back"):
                        outcome = Outcome.ROLLED_BACK
                    elif to in UPDATING_STATES:
                        outcome = Outcome.UPDATING
                elif r["running_version"] == self.version:
                    outcome = Outcome.COMMITTED
            if r["rollback_at"] is not None and self._rolled_back(r, events):
                outcome = Outcome.ROLLED_BACK
            trial_failed = any(
                e["from_state"] == "trial" and e["to_state"] in ("rolling_back", "failed")
                for e in mine
            )
            assigned = from_iso(r["assigned_at"]) if r["assigned_at"] else None
            # stuck means silent about the update (a device may heartbeat and never update)
            seen = from_iso(mine[-1]["received_at"]) if mine else None
            out.append(
                DeviceProgress(
                    r["device_id"],
                    int(r["stage"]),
                    outcome,
                    _epoch(assigned) if assigned else None,
                    _epoch(seen) if seen else None,
                    trial_failed,
                    reason,
                )
            )
        return out

    def _rolled_back(
        self, row: Mapping[str, Any], events: Mapping[str, list[Mapping[str, Any]]]
    ) -> bool:
        """The device is off the rollout's release again: it reports another version, or its
        signed rollback reached its end."""
        if row["running_version"] is not None and row["running_version"] != self.version:
            return True
        return any(
            e["rollback"] and e["to_state"] in ("committed", "rolled_back", "failed")
            for e in events[row["device_id"]]
            if e["release_version"] == row["from_version"]
        )

    def latency(self, since: float, until: float, control: int) -> LatencyInput:
        """p95 of heartbeats in (since, until] from the rollout's devices, by release."""
        new: list[float] = []
        old: list[float] = []
        for version, p95 in self.db.execute(
            "SELECT model_version, latency_p95_ms FROM heartbeats WHERE "
            f"{IN_ROLLOUT} AND ts > ? AND ts <= ? AND model_name = ? "
            "AND latency_p95_ms IS NOT NULL AND model_version IS NOT NULL",
            [self.rollout_id, since, until, self.model],
        ):
            if version == self.version:
                new.append(float(p95))
            elif version < self.version:
                old.append(float(p95))
        return LatencyInput(tuple(new), tuple(old), control)

    def drift(self, since: float, until: float, control: int) -> DriftInput:
        """Merged drift counts of windows ending in (since, until]: canaries (on the release)
        and control (on an older version), features only when both share a reference."""
        canary: list[WindowCounts] = []
        older: list[WindowCounts] = []
        for version, counts in self.db.execute(
            "SELECT model_version, counts FROM drift_summaries WHERE "
            f"{IN_ROLLOUT} AND window_end > ? AND window_end <= ? "
            "AND model_name = ? ORDER BY window_end LIMIT ?",
            [self.rollout_id, since, until, self.model, MAX_DRIFT_WINDOWS],
        ):
            try:
                w = WindowCounts.from_dict(json.loads(counts))
            except (ProtocolError, ValueError) as exc:
                log.warning("rollout %s: unreadable drift window skipped: %s", self.rollout_id, exc)
                continue
            if version == self.version:
                canary.append(w)
            elif version < self.version:
                older.append(w)
        a, b = _merged(canary), _merged(older)
        features: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = ()
        names: tuple[str, ...] = ()
        if (
            isinstance(a, WindowCounts)
            and isinstance(b, WindowCounts)
            and a.reference_sha256 == b.reference_sha256
            and a.bins == b.bins
        ):
            features = tuple(
                (_ints(a.feature_counts(j)), _ints(b.feature_counts(j))) for j in range(len(a.bins))
            )
            names = a.feature_names
        return DriftInput(
            canary_classes=_classes(a),
            control_classes=_classes(b),
            canary_n=sum(w.n for w in canary),
            control_n=sum(w.n for w in older),
            control_devices=control,
            features=features,
            feature_names=names,
        )


def _merged(windows: list[WindowCounts]) -> WindowCounts | tuple[int, ...] | None:
    """The merge of the windows; only their summed class counts when their references differ."""
    if not windows:
        return None
    try:
        return merge(windows)
    except ProtocolError:
        size = max(len(w.class_counts) for w in windows)
        total = [0] * size
        for w in windows:
            for i, c in enumerate(w.class_counts):
                total[i] += int(c)
        return tuple(total)


def _classes(merged: WindowCounts | tuple[int, ...] | None) -> tuple[int, ...]:
    if merged is None:
        return ()
    if isinstance(merged, WindowCounts):
        return _ints(merged.class_counts)
    return merged


def _ints(values: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in values)
