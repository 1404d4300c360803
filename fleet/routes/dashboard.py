"""The dashboard (viewer): server-rendered pages with inline SVG charts, for a browser.

Pages: ``/dashboard`` (devices: online state, model version, last heartbeat, drift verdict),
``/dashboard/devices/{id}`` (CPU, latency and per-feature drift over time, alerts),
``/dashboard/drift`` and ``/dashboard/drift/{model}/{version}`` (fleet-wide per-feature drift
over time, per device, the merged distribution against the reference, two cohorts compared:
canary vs control), ``/dashboard/rollouts`` and ``/dashboard/rollouts/{id}`` (stage progress,
gate verdicts, canary vs control drift) and ``/dashboard/alerts``.

Sign-in is ``/dashboard/login`` with an API token (:mod:`fleet.dashboard.session`); the pages
declare :data:`fleet.auth.Viewer` like the API. Login, logout and the two static files (CSS,
the small error-reporting script) are public.
"""

from __future__ import annotations

from datetime import timedelta
from importlib import resources
from typing import Annotated
from urllib.parse import parse_qs

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from fleet.alert_service import AlertService
from fleet.auth import Viewer
from fleet.dashboard import pages, queries, rollout_view
from fleet.dashboard.session import (
    SECURITY_HEADERS,
    SessionRoute,
    clear_cookie,
    safe_next,
    set_cookie,
)
from fleet.dependencies import DB, Context, Now, Tokens, VersionPath
from fleet.errors import AuthenticationError
from fleet.telemetry import TelemetryService
from fleet.tokens import Principal

router = APIRouter(prefix="/dashboard", tags=["dashboard"], route_class=SessionRoute)
STATIC = {"dashboard.css": "text/css", "dashboard.js": "text/javascript"}
MAX_FORM_BYTES = 4096
Hours = Annotated[int, Query(ge=1, le=24 * 30, description="how far back, in hours")]


def _who(p: Principal) -> str:
    return f"{p.name} ({p.role})"


def _html(text: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(text, status_code=status, headers=SECURITY_HEADERS)


@router.get("/login", summary="The dashboard's sign-in page (public)")
def login_form(next: str | None = None) -> HTMLResponse:  # noqa: A002 - the query name
    return _html(pages.login_page(safe_next(next)))


@router.post("/login", summary="Sign in with an API token; sets the session cookie (public)")
async def login(request: Request, tokens: Tokens, ctx: Context, now: Now) -> Response:
    raw = await request.body()
    form = parse_qs(raw[:MAX_FORM_BYTES].decode("utf-8", "replace"))
    token = (form.get("token") or [""])[0].strip()
    target = safe_next((form.get("next") or [""])[0])
    try:
        tokens.authenticate(token, now)
    except AuthenticationError:
        tokens.db.conn.commit()
        return _html(pages.login_page(target, "That token is not valid (unknown or revoked)."), 401)
    tokens.db.conn.commit()  # last_used_at
    response = RedirectResponse(target, status_code=303)
    secure = request.url.scheme == "https" or ctx.settings.base_url.startswith("https://")
    set_cookie(response, token, secure)
    return response


@router.post("/logout", summary="Sign out: clears the session cookie (public)")
def logout() -> Response:
    response = RedirectResponse("/dashboard/login", status_code=303)
    clear_cookie(response)
    return response


@router.get("/static/{name}", summary="The dashboard's CSS and script (public)")
def static(name: str) -> Response:
    if name not in STATIC:
        return Response("not found", status_code=404, media_type="text/plain")
    data = resources.files("fleet.dashboard").joinpath("static", name).read_bytes()
    return Response(data, media_type=STATIC[name], headers={"Cache-Control": "max-age=300"})


@router.get("", summary="Devices: online state, model, last heartbeat, drift verdict (viewer)")
def devices(db: DB, ctx: Context, who: Viewer) -> HTMLResponse:
    rows = queries.devices_overview(db)
    open_alerts = len(AlertService(db, ctx.settings).find("open", limit=10_000))
    return _html(pages.devices_page(rows, open_alerts, _who(who)))


@router.get("/devices/{device_id}", summary="One device's charts and alerts (viewer)")
def device(
    device_id: str, db: DB, ctx: Context, who: Viewer, now: Now, hours: Hours = 24
) -> HTMLResponse:
    lo, hi = (now - timedelta(hours=hours)).timestamp(), now.timestamp()
    telemetry = TelemetryService(db)
    detail = telemetry.detail(device_id)
    beats = telemetry.heartbeats(
        device_id,
        lo,
        hi,
        ("cpu_percent", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms"),
        limit=5000,
    )
    drift = queries.device_drift_points(db, device_id, lo, hi)
    alerts = AlertService(db, ctx.settings).find("all", subject=device_id, limit=50)
    return _html(pages.device_page(detail, beats, drift, alerts, (lo, hi), _who(who)))


@router.get("/drift", summary="Model versions with recent drift windows (viewer)")
def drift_index(db: DB, who: Viewer, now: Now) -> HTMLResponse:
    releases = queries.releases_with_drift(db, (now - timedelta(hours=24)).timestamp())
    return _html(pages.drift_index_page(releases, _who(who)))


def _cohort_form(model: str, version: int, hours: int, a: str, b: str) -> str:
    e = pages.esc
    return (
        f'<form class="filters" method="get" action="/dashboard/drift/{e(model)}/{version}">'
        f'<input type="hidden" name="hours" value="{hours}">'
        f'canary devices <input name="canary" value="{e(a)}" placeholder="cam-1,cam-2"> '
        f'control devices <input name="control" value="{e(b)}" placeholder="empty: all others"> '
        "<button>compare</button></form>"
    )


@router.get("/drift/{model}/{version}", summary="Drift of one model version over time (viewer)")
def drift(
    model: str,
    version: VersionPath,
    db: DB,
    ctx: Context,
    who: Viewer,
    now: Now,
    hours: Hours = 24,
    canary: Annotated[str, Query(max_length=4000)] = "",
    control: Annotated[str, Query(max_length=4000)] = "",
) -> HTMLResponse:
    lo, hi = (now - timedelta(hours=hours)).timestamp(), now.timestamp()
    buckets = queries.fleet_buckets(db, ctx.settings, model, version, lo, hi, 24)
    points = queries.release_drift_points(db, model, version, lo, hi)
    hists = queries.histograms(db, ctx.settings, model, version, lo, hi)
    a = [d for d in canary.replace(" ", "").split(",") if d]
    b = [d for d in control.replace(" ", "").split(",") if d]
    names = None
    compare: list[queries.Histogram] = []
    if a:
        if not b:
            b = sorted({p.device_id for p in points} - set(a))
        names = ("canary", "control")
        compare = queries.histograms(
            db, ctx.settings, model, version, lo, hi, {"canary": a, "control": b}
        )
    form = _cohort_form(model, version, hours, ",".join(a), control)
    page = pages.drift_page(
        model, version, buckets, points, hists, compare, names, (lo, hi), _who(who), form
    )
    return _html(page)


@router.get("/alerts", summary="Alerts (viewer)")
def alerts(
    db: DB,
    ctx: Context,
    who: Viewer,
    state: Annotated[str, Query(pattern="^(open|resolved|all)$")] = "open",
) -> HTMLResponse:
    found = AlertService(db, ctx.settings).find(state, limit=500)
    return _html(pages.alerts_page(found, state, _who(who)))


@router.get("/rollouts", summary="Rollouts and their progress (viewer)")
def rollouts(db: DB, ctx: Context, who: Viewer) -> HTMLResponse:
    return _html(rollout_view.index_page(db, ctx.settings, _who(who)))


@router.get("/rollouts/{rollout_id}", summary="One rollout: stages, gates, canary drift (viewer)")
def rollout(rollout_id: str, db: DB, ctx: Context, who: Viewer, now: Now) -> HTMLResponse:
    return _html(rollout_view.rollout_page(db, ctx.settings, rollout_id, now, _who(who)))
