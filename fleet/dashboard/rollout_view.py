"""The dashboard's rollout pages: the list, and one rollout's stage progress bars, gate verdicts,
canary vs control drift and history.

Reads through :class:`fleet.rollouts.RolloutService` (the rollout engineer's service; this
module only displays). Canary: the devices of the stages started so far, on the new version;
control: the rollout's other devices, still on another version of the model. Their windows
since the rollout began are summed per cohort and compared bin by bin (the same test as the
drift gate's, :func:`protocol.drift.score` of one sample against the other).
"""

from __future__ import annotations

from datetime import datetime
from urllib.parse import quote

from sqlite_utils import Database

from fleet.dashboard import pages, queries
from fleet.dashboard.charts import Series, line_chart
from fleet.rollouts import RolloutService
from fleet.settings import FleetSettings

STATE_BADGE = {
    "running": "ok",
    "completed": "ok",
    "paused": "warn",
    "rolling_back": "bad",
    "rolled_back": "bad",
}


def index_page(db: Database, settings: FleetSettings, who: str) -> str:
    rollouts = RolloutService(db, settings).find()
    body = pages.table(
        ["rollout", "release", "state", "stage", "policy", "reason", "created"],
        (
            [
                f'<a href="/dashboard/rollouts/{quote(r.id)}">{pages.esc(r.id)}</a>',
                pages.esc(f"{r.model} v{r.version}"),
                pages.badge(r.state, STATE_BADGE.get(r.state, "muted")),
                pages.esc(f"{r.stage + 1} / {len(r.stages)} ({r.stages[r.stage].percent:g}%)"),
                pages.esc(r.policy),
                pages.esc(r.reason or "—"),
                pages.esc(pages.when(r.created_at)),
            ]
            for r in rollouts
        ),
        "no rollouts yet (`fleet rollout create`)",
    )
    return pages.frame("Rollouts", f"<h1>Rollouts</h1>{body}", "rollouts", who)


def _bar(done: int, total: int) -> str:
    """A progress bar as SVG (a strict CSP forbids inline style widths)."""
    width = round(200 * done / total) if total else 0
    return (
        f'<svg class="progress-bar" width="200" height="14" viewBox="0 0 200 14" role="img" '
        f'aria-label="{done} of {total} committed"><rect width="200" height="14" rx="3" '
        f'fill="#e5e7eb"/><rect width="{width}" height="14" rx="3" fill="#2563eb"/></svg>'
        f" {done}/{total}"
    )


def rollout_page(
    db: Database, settings: FleetSettings, rollout_id: str, now: datetime, who: str
) -> str:
    service = RolloutService(db, settings)
    status = service.status(rollout_id, now)
    r = status.rollout
    e = pages.esc
    stages = pages.table(
        [
            "stage",
            "share",
            "status",
            "progress (committed)",
            "pending",
            "updating",
            "failed",
            "rolled back",
        ],
        (
            [
                str(s.index + 1),
                f"{s.percent:g}%",
                pages.badge(s.status, {"done": "ok", "current": "warn"}.get(s.status, "muted")),
                _bar(s.committed, s.devices),
                str(s.pending),
                str(s.updating),
                str(s.failed),
                str(s.rolled_back),
            ]
            for s in status.stages
        ),
    )
    gates = pages.table(
        ["gate", "verdict", "value", "threshold", "reason"],
        (
            [
                e(v.gate),
                pages.badge(
                    str(v.status), {"pass": "ok", "fail": "bad"}.get(str(v.status), "warn")
                ),
                e("—" if v.value is None else f"{v.value:.4g}"),
                e("—" if v.threshold is None else f"{v.threshold:.4g}"),
                e(v.reason),
            ]
            for v in r.verdicts
        ),
        "no gate verdicts yet",
    )
    started = {d.device_id for d in status.devices if d.stage <= r.stage}
    others = {d.device_id for d in status.devices} - started
    lo, hi = r.created_at.timestamp(), now.timestamp()
    canary = queries._counts(db, r.model, r.version, lo, hi, sorted(started))
    control = queries._counts(db, r.model, r.version, lo, hi, sorted(others), other_versions=True)
    hists = queries.compare_cohorts(db, settings, ("canary", "control"), canary, control)
    points = queries.release_drift_points(db, r.model, r.version, lo, hi)
    canary_pts = [p for p in points if p.device_id in started]
    share = line_chart(
        [
            Series(
                "canary windows drifted",
                tuple((p.t, 1.0 if p.drifted else 0.0) for p in canary_pts),
            )
        ],
        "Canary drift verdicts per window (1 = drifted)",
        "drifted",
        x_range=(lo, hi),
    )
    compare = (
        pages.charts(pages.histogram_charts(hists, "canary vs control"))
        if hists
        else '<p class="hint">Not enough drift windows from both canary and control yet.</p>'
    )
    events = pages.table(
        ["time", "event", "from", "to", "stage", "by", "reason"],
        (
            [
                e(pages.when(ev.ts)),
                e(ev.event),
                e(ev.from_state),
                e(ev.to_state),
                str(ev.stage + 1),
                e(ev.actor),
                e(ev.reason),
            ]
            for ev in status.events
        ),
    )
    facts = pages.cards(
        [
            ("release", f"{r.model} v{r.version}"),
            ("state", r.state),
            ("stage", f"{r.stage + 1} / {len(r.stages)}"),
            ("devices", len(status.devices)),
            ("policy", r.policy),
        ]
    )
    reason = f'<p class="error-box">{e(r.reason)}</p>' if r.reason else ""
    body = (
        f"<h1>Rollout {e(r.id)}</h1>{facts}{reason}<h2>Stages</h2>{stages}"
        f"<h2>Gates</h2>{gates}<h2>Canary vs control drift</h2>{compare}"
        f"{pages.charts([share])}<h2>History</h2>{events}"
    )
    return pages.frame(f"Rollout {r.id}", body, "rollouts", who)
