"""The dashboard's HTML: the page frame and one function per page, from values to markup.

Every value is escaped here (:func:`esc`); charts come from :mod:`fleet.dashboard.charts`.
No database, no HTTP: :mod:`fleet.routes.dashboard` reads (:mod:`fleet.dashboard.queries`)
and calls these.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from html import escape
from typing import Any
from urllib.parse import quote

from fleet.alert_service import Alert
from fleet.dashboard.charts import BarGroup, Series, bar_chart, line_chart
from fleet.dashboard.queries import Bucket, DeviceRow, FeaturePoint, Histogram, Release
from fleet.telemetry import DeviceTelemetry, HeartbeatSeries

NAV = (
    ("devices", "/dashboard", "Devices"),
    ("drift", "/dashboard/drift", "Drift"),
    ("rollouts", "/dashboard/rollouts", "Rollouts"),
    ("alerts", "/dashboard/alerts", "Alerts"),
)


def esc(value: object) -> str:
    return escape("" if value is None else str(value))


def when(value: float | str | datetime | None) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, int | float):
        value = datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def badge(text: str, kind: str) -> str:
    return f'<span class="badge {kind}">{esc(text)}</span>'


def frame(title: str, body: str, active: str = "", who: str = "") -> str:
    nav = "".join(
        f'<a href="{href}"{" class=active" if key == active else ""}>{label}</a>'
        for key, href, label in NAV
    )
    account = ""
    if who:
        account = (
            f'<span class="who">{esc(who)} '
            '<form method="post" action="/dashboard/logout"><button>log out</button></form></span>'
        )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)} · edgefleet</title>"
        '<link rel="icon" href="data:,">'
        '<link rel="stylesheet" href="/dashboard/static/dashboard.css">'
        '<script src="/dashboard/static/dashboard.js"></script></head><body>'
        f'<header><span class="brand">edgefleet</span><nav>{nav}</nav>{account}</header>'
        f'<main><ul id="js-errors" class="error-box" hidden></ul>{body}</main></body></html>'
    )


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], empty: str = "none") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    if not body:
        body = f'<tr><td colspan="{len(headers)}" class="hint">{esc(empty)}</td></tr>'
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def cards(items: Sequence[tuple[str, object]]) -> str:
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card"><div class="v">{esc(v)}</div><div class="k">{esc(k)}</div></div>'
            for k, v in items
        )
        + "</div>"
    )


def charts(svgs: Iterable[str]) -> str:
    return (
        '<div class="charts">'
        + "".join(f'<div class="chart-box">{s}</div>' for s in svgs)
        + "</div>"
    )


# --- pages ------------------------------------------------------------------------------------


def login_page(next_path: str, error: str = "") -> str:
    err = f'<p class="error-box">{esc(error)}</p>' if error else ""
    body = (
        '<div class="login"><h1>Sign in</h1>'
        f"{err}"
        '<form method="post" action="/dashboard/login">'
        f'<input type="hidden" name="next" value="{esc(next_path)}">'
        '<label for="token">API token (viewer or higher)</label>'
        '<input type="password" id="token" name="token" autocomplete="off" required autofocus>'
        "<button>Sign in</button></form>"
        '<p class="hint">An admin creates one with <code>fleet token create --role viewer '
        "--name NAME</code>. The token is kept in an HttpOnly cookie for 12 hours; revoking "
        "the token ends the session.</p></div>"
    )
    return frame("Sign in", body)


def _drift_badge(row: DeviceRow) -> str:
    if row.drift is None:
        return badge("no data", "muted")
    if row.drift:
        return badge("drift: " + ", ".join(row.drifted_features), "bad")
    return badge("ok", "ok")


def devices_page(rows: Sequence[DeviceRow], open_alerts: int, who: str) -> str:
    active = [r for r in rows if r.status == "active"]
    online = sum(1 for r in active if r.online)
    drifting = sum(1 for r in active if r.drift)
    summary = cards(
        [
            ("devices", len(active)),
            ("online", online),
            ("offline", len(active) - online),
            ("drifting", drifting),
            ("open alerts", open_alerts),
        ]
    )
    body = table(
        ["device", "group", "state", "model", "last heartbeat", "drift", "alerts"],
        (
            [
                f'<a href="/dashboard/devices/{quote(r.id)}">{esc(r.id)}</a>',
                esc(r.group or "—"),
                badge("decommissioned", "muted")
                if r.status != "active"
                else (badge("online", "ok") if r.online else badge("offline", "bad")),
                esc(r.model or "—"),
                esc(when(r.last_heartbeat)),
                _drift_badge(r),
                badge(str(r.open_alerts), "warn") if r.open_alerts else "0",
            ]
            for r in rows
        ),
        "no devices enrolled yet",
    )
    return frame("Devices", f"<h1>Devices</h1>{summary}{body}", "devices", who)


def _psi_series(points: Sequence[FeaturePoint], features: Sequence[str]) -> list[Series]:
    out = [Series(f, tuple((p.t, p.psi.get(f)) for p in points)) for f in features]
    if points and points[0].bound is not None:
        out.append(Series("drift bound", tuple((p.t, p.bound) for p in points), dashed=True))
    return out


def device_page(
    t: DeviceTelemetry,
    beats: HeartbeatSeries,
    drift: Sequence[FeaturePoint],
    alerts: Sequence[Alert],
    x_range: tuple[float, float],
    who: str,
) -> str:
    model = t.state.model if t.state else None
    facts = cards(
        [
            ("state", "online" if t.online else "offline"),
            ("model", f"{model.name} v{model.version}" if model else "—"),
            ("last seen", when(t.last_seen)),
            ("last heartbeat", when(t.last_heartbeat.ts if t.last_heartbeat else None)),
            ("drift windows", len(drift)),
        ]
    )
    pts = beats.points
    cpu = line_chart(
        [Series("cpu %", tuple((p.ts, p.metrics.get("cpu_percent")) for p in pts))],
        "CPU",
        "percent",
        x_range=x_range,
    )
    lat = line_chart(
        [
            Series(q, tuple((p.ts, p.metrics.get(f"latency_{q}_ms")) for p in pts))
            for q in ("p50", "p95", "p99")
        ],
        "Inference latency",
        "ms",
        x_range=x_range,
    )
    features = sorted({f for p in drift for f in p.psi})
    psi = line_chart(
        _psi_series(drift, features),
        "Drift per feature (PSI per window)",
        "PSI",
        x_range=x_range,
    )
    alert_rows = table(
        ["alert", "severity", "opened", "resolved"],
        (
            [esc(a.message), esc(a.severity), esc(when(a.opened_at)), esc(when(a.resolved_at))]
            for a in alerts
        ),
        "no alerts",
    )
    body = (
        f"<h1>Device {esc(t.device_id)}</h1>{facts}{charts([cpu, lat, psi])}"
        f"<h2>Alerts</h2>{alert_rows}"
    )
    return frame(f"Device {t.device_id}", body, "devices", who)


def drift_index_page(releases: Sequence[Release], who: str) -> str:
    body = table(
        ["model", "version", "devices", "windows", "last window"],
        (
            [
                f'<a href="/dashboard/drift/{quote(r.model)}/{r.version}">{esc(r.model)}</a>',
                str(r.version),
                str(r.devices),
                str(r.windows),
                esc(when(r.last_end)),
            ]
            for r in releases
        ),
        "no drift windows in the last 24 hours",
    )
    return frame(
        "Drift",
        f"<h1>Drift</h1><p class=hint>Model versions with drift windows in "
        f"the last 24 hours.</p>{body}",
        "drift",
        who,
    )


def histogram_charts(hists: Sequence[Histogram], title: str) -> list[str]:
    out = []
    for h in hists:
        names = list(h.shares)
        groups = [
            BarGroup(label, tuple(h.shares[n][i] for n in names))
            for i, label in enumerate(h.labels)
        ]
        verdict = "" if h.drifted is None else (" — drifted" if h.drifted else " — no drift")
        psi = f"PSI {h.psi:.3f}" if h.psi is not None else "PSI —"
        out.append(bar_chart(groups, names, f"{h.feature}: {title} ({psi}{verdict})", "share"))
    return out


def drift_page(
    model: str,
    version: int,
    buckets: Sequence[Bucket],
    points: Sequence[FeaturePoint],
    hists: Sequence[Histogram],
    compare: Sequence[Histogram],
    cohort_names: tuple[str, str] | None,
    x_range: tuple[float, float],
    who: str,
    form: str = "",
) -> str:
    features = sorted({f for b in buckets for f in b.psi} | {f for p in points for f in p.psi})
    fleet = line_chart(
        [
            Series(f, tuple(((b.start + b.end) / 2, b.psi.get(f)) for b in buckets))
            for f in features
        ],
        "Fleet-wide drift per feature (merged counts per bucket)",
        "PSI",
        x_range=x_range,
    )
    per_device = []
    devices = sorted({p.device_id for p in points})
    for f in features:
        series = [
            Series(d, tuple((p.t, p.psi.get(f)) for p in points if p.device_id == d))
            for d in devices
        ]
        series.append(
            Series(
                "fleet", tuple(((b.start + b.end) / 2, b.psi.get(f)) for b in buckets), dashed=True
            )
        )
        per_device.append(line_chart(series, f"{f}: PSI per device", "PSI", x_range=x_range))
    drifted = [b for b in buckets if b.drifted]
    facts = cards(
        [
            ("devices", len(devices)),
            ("windows", len(points)),
            (
                "drifted buckets",
                f"{len(drifted)} / {sum(1 for b in buckets if b.drifted is not None)}",
            ),
            (
                "latest fleet verdict",
                next(
                    (
                        "drift" if b.drifted else "ok"
                        for b in reversed(buckets)
                        if b.drifted is not None
                    ),
                    "—",
                ),
            ),
        ]
    )
    parts = [
        f"<h1>Drift: {esc(model)} v{version}</h1>{facts}",
        charts([fleet]),
        "<h2>Per device</h2>",
        charts(per_device),
        "<h2>Fleet distribution against the reference</h2>",
        charts(histogram_charts(hists, "reference vs fleet")),
        "<h2>Canary vs control</h2>",
        form,
    ]
    if cohort_names and compare:
        parts.append(charts(histogram_charts(compare, f"{cohort_names[0]} vs {cohort_names[1]}")))
    elif cohort_names:
        parts.append('<p class="hint">No drift windows for one of the two cohorts.</p>')
    return frame(f"Drift {model} v{version}", "".join(parts), "drift", who)


def alerts_page(alerts: Sequence[Alert], state: str, who: str) -> str:
    tabs = " · ".join(
        f'<a href="/dashboard/alerts?state={s}">{"<b>" + s + "</b>" if s == state else s}</a>'
        for s in ("open", "resolved", "all")
    )
    sev = {"critical": "bad", "warning": "warn", "info": "muted"}
    body = table(
        ["severity", "kind", "subject", "message", "opened", "resolved", "acknowledged"],
        (
            [
                badge(a.severity, sev.get(a.severity, "muted")),
                esc(a.kind),
                esc(a.subject),
                esc(a.message),
                esc(when(a.opened_at)),
                esc(when(a.resolved_at)),
                esc(
                    f"{when(a.acknowledged_at)} by {a.acknowledged_by}"
                    if a.acknowledged_at
                    else "—"
                ),
            ]
            for a in alerts
        ),
        f"no {state} alerts" if state != "all" else "no alerts",
    )
    hint = (
        '<p class="hint">Acknowledge with <code>fleet alert ack ID</code> or '
        "<code>POST /v1/alerts/{id}/acknowledge</code>.</p>"
    )
    return frame("Alerts", f"<h1>Alerts</h1><p>{tabs}</p>{body}{hint}", "alerts", who)


def message_page(title: str, text: str, who: str, active: str = "", extra: Any = "") -> str:
    return frame(title, f"<h1>{esc(title)}</h1><p>{esc(text)}</p>{extra}", active, who)
