"""The dashboard over real HTTP: sign-in with an API token (HttpOnly, SameSite=Strict cookie
scoped to /dashboard), redirects for browsers without a session, the API's 401 for other
clients, pages with the devices' state and real SVG charts (axes, ticks, one line per
feature/device), canary vs control, alerts, a strict CSP; chart and page helpers as units."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import datetime, timedelta

import httpx
import pytest

from fleet.alert_service import AlertService
from fleet.dashboard.charts import BarGroup, Series, bar_chart, line_chart, nice_ticks
from fleet.dashboard.sample_fleet import seed
from fleet.dashboard.session import COOKIE, safe_next
from fleet.settings import FleetSettings
from fleet.store import connect

HTML = {"Accept": "text/html,application/xhtml+xml"}


@pytest.fixture
def fleet(settings: FleetSettings, clock: Callable[[], datetime], live: str) -> None:
    with closing(connect(settings.db_path)) as db:
        seed(db, settings, clock(), drifting=("cam-3",), offline=("cam-4",))
        AlertService(db, settings).evaluate(clock())


@pytest.fixture
def browser(live: str, viewer: dict[str, str], fleet: None) -> Iterator[httpx.Client]:
    """A client signed in through the login form, like a browser."""
    with httpx.Client(base_url=live, headers=HTML, timeout=20) as client:
        token = viewer["Authorization"].removeprefix("Bearer ")
        r = client.post("/dashboard/login", data={"token": token, "next": "/dashboard/alerts"})
        assert r.status_code == 303 and r.headers["location"] == "/dashboard/alerts"
        cookie = r.headers["set-cookie"]
        for part in ("HttpOnly", "SameSite=strict", "Path=/dashboard", f"{COOKIE}="):
            assert part.lower() in cookie.lower(), cookie
        yield client


def test_without_a_session_browsers_go_to_login_and_apis_get_401(live: str) -> None:
    r = httpx.get(f"{live}/dashboard/drift?x=1", headers=HTML)
    assert r.status_code == 303
    assert r.headers["location"] == "/dashboard/login?next=%2Fdashboard%2Fdrift%3Fx%3D1"
    r = httpx.get(f"{live}/dashboard")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    login = httpx.get(f"{live}/dashboard/login")
    assert login.status_code == 200 and 'name="token"' in login.text
    assert httpx.get(f"{live}/dashboard/static/dashboard.css").status_code == 200
    assert httpx.get(f"{live}/dashboard/static/../../fleet.db").status_code == 404


def test_a_bad_token_is_refused_and_a_revoked_one_ends_the_session(
    live: str, admin: dict[str, str], fleet: None
) -> None:
    with httpx.Client(base_url=live, headers=HTML) as client:
        r = client.post("/dashboard/login", data={"token": "efo_nope"})
        assert (
            r.status_code == 401
            and "not valid" in r.text
            and COOKIE not in r.headers.get("set-cookie", "")
        )
        made = httpx.post(
            f"{live}/v1/tokens", json={"name": "web", "role": "viewer"}, headers=admin
        ).json()
        client.post("/dashboard/login", data={"token": made["secret"]})
        assert client.get("/dashboard").status_code == 200
        httpx.delete(f"{live}/v1/tokens/{made['id']}", headers=admin)
        r = client.get("/dashboard")
        assert r.status_code == 303 and r.headers["location"].startswith("/dashboard/login")
        # logout clears the cookie
        client.post("/dashboard/login", data={"token": admin["Authorization"][7:]})
        assert client.get("/dashboard").status_code == 200
        r = client.post("/dashboard/logout")
        assert r.status_code == 303 and "Max-Age=0" in r.headers["set-cookie"].replace(
            "max-age", "Max-Age"
        )
        assert client.get("/dashboard").status_code == 303


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/dashboard/drift", "/dashboard/drift"),
        ("https://evil.example/", "/dashboard"),
        ("//evil.example/dashboard", "/dashboard"),
        ("/dashboard//evil", "/dashboard"),
        ("/v1/tokens", "/dashboard"),
        ("", "/dashboard"),
    ],
)
def test_next_stays_on_the_dashboard(target: str, expected: str) -> None:
    assert safe_next(target) == expected


def test_devices_page(browser: httpx.Client) -> None:
    r = browser.get("/dashboard")
    assert r.status_code == 200
    assert "default-src 'self'" in r.headers["content-security-policy"]
    rows = {
        m.group(1): m.group(0)
        for m in re.finditer(r'<tr><td><a href="/dashboard/devices/([^"]+)">.*?</tr>', r.text)
    }
    assert set(rows) == {"cam-1", "cam-2", "cam-3", "cam-4"}
    assert "online" in rows["cam-1"] and "offline" in rows["cam-4"]
    assert "drift: f0, f1" in rows["cam-3"] and "drift:" not in rows["cam-1"]
    assert "load-model v1" in rows["cam-2"]
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", rows["cam-1"])  # last heartbeat


def _series(svg: str) -> list[str]:
    return re.findall(r'<g class="series" data-name="([^"]+)">', svg)


def test_device_page_has_real_charts(browser: httpx.Client) -> None:
    r = browser.get("/dashboard/devices/cam-3", params={"hours": 8})
    assert r.status_code == 200
    svgs = re.findall(r"<svg .*?</svg>", r.text)
    assert len(svgs) == 3
    cpu, latency, drift = svgs
    assert _series(latency) == ["p50", "p95", "p99"]
    assert _series(drift) == ["f0", "f1", "f2", "f3", "drift bound"]
    for svg in svgs:
        assert 'class="axis x"' in svg and 'class="axis y"' in svg and "time (UTC)" in svg
        assert len(re.findall(r"<polyline", svg)) >= 1
    assert len(re.findall(r"<circle", cpu)) == 12 * 6  # one point per heartbeat
    assert "drift alarm on device cam-3" in r.text
    assert browser.get("/dashboard/devices/nope").status_code == 404


def test_drift_page_fleet_per_device_and_canary_vs_control(browser: httpx.Client) -> None:
    assert "load-model" in browser.get("/dashboard/drift").text
    r = browser.get("/dashboard/drift/load-model/1", params={"hours": 8, "canary": "cam-3"})
    assert r.status_code == 200
    svgs = re.findall(r"<svg .*?</svg>", r.text)
    fleet, per_device = svgs[0], svgs[1:5]
    assert _series(fleet) == ["f0", "f1", "f2", "f3"]
    for svg in per_device:
        assert _series(svg) == ["cam-1", "cam-2", "cam-3", "cam-4", "fleet"]
    bars = svgs[5:]
    assert len(bars) == 8  # reference vs fleet, canary vs control; per feature
    assert all(len(re.findall(r"<rect ", b)) == 2 * 12 for b in bars)  # 12 bins, 2 series
    titles = re.findall(r"<text [^>]*font-weight=\"600\"[^>]*>([^<]+)</text>", "".join(bars[4:]))
    assert [t.split(":")[0] for t in titles] == ["f0", "f1", "f2", "f3"]
    assert "drifted" in titles[0] and "no drift" in titles[3]


def test_alerts_and_rollouts_pages(browser: httpx.Client) -> None:
    r = browser.get("/dashboard/alerts")
    assert "device cam-4 is offline" in r.text and "drift alarm on device cam-3" in r.text
    assert "fleet-wide drift alarm" in r.text
    assert "no resolved alerts" in browser.get("/dashboard/alerts?state=resolved").text
    assert browser.get("/dashboard/alerts?state=bogus").status_code == 422
    r = browser.get("/dashboard/rollouts")
    assert r.status_code == 200 and "no rollouts yet" in r.text
    assert browser.get("/dashboard/rollouts/ro-missing").status_code == 404


def test_text_is_escaped(settings: FleetSettings, browser: httpx.Client) -> None:
    with closing(connect(settings.db_path)) as db:
        db.execute("UPDATE devices SET group_name = '<script>x</script>' WHERE id = 'cam-1'")
        db.conn.commit()
    r = browser.get("/dashboard")
    assert "<script>x</script>" not in r.text and "&lt;script&gt;x&lt;/script&gt;" in r.text


# --- charts (pure) ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lo", "hi", "first", "last"),
    [(0, 0.27, 0, 0.3), (0, 1, 0, 1), (3, 97, 0, 100), (0, 0, 0, 1), (-1.5, 2.2, -2, 3)],
)
def test_nice_ticks_cover_the_range(lo: float, hi: float, first: float, last: float) -> None:
    ticks = nice_ticks(lo, hi)
    assert ticks[0] == pytest.approx(first) and ticks[-1] == pytest.approx(last)
    assert ticks[0] <= lo and ticks[-1] >= hi and 2 <= len(ticks) <= 12


def test_line_chart_scales_points_into_the_plot() -> None:
    svg = line_chart(
        [Series("a", ((0.0, 0.0), (3600.0, 1.0), (7200.0, None), (10800.0, 0.5)))], "T", "y"
    )
    assert svg.count("<polyline") == 1  # the None splits the line; the single point is a dot
    assert svg.count("<circle") == 3
    assert ">01:00<" in svg and ">02:00<" in svg
    empty = line_chart([Series("a", ())], "T")
    assert "no data in this range" in empty
    assert "&lt;b&gt;" in line_chart([Series("<b>", ((0.0, 1.0),))], "<b>")


def test_bar_chart_draws_one_rect_per_value() -> None:
    svg = bar_chart([BarGroup("x", (0.2, 0.4)), BarGroup("y", (0.1, 0.3))], ["a", "b"], "T")
    assert svg.count("<rect ") == 4 and "a x: 0.2" in svg


# --- rollouts (rows as fleet.rollouts writes them) --------------------------------------------


def _rollout(settings: FleetSettings, now: datetime, state: str) -> None:
    stamp = (now - timedelta(hours=8)).isoformat(timespec="milliseconds")
    verdicts = [
        {
            "gate": "updates",
            "status": "pass",
            "reason": "1 of 1 committed",
            "value": 1.0,
            "threshold": 0.95,
        },
        {
            "gate": "drift",
            "status": "fail",
            "reason": "canary drifted against control",
            "value": 0.27,
            "threshold": 0.1,
        },
    ]
    with closing(connect(settings.db_path)) as db:
        # cam-3 took v2 (same reference profile): the canary; the others stay on v1
        db.execute("UPDATE drift_summaries SET model_version = 2 WHERE device_id = 'cam-3'")
        db.execute(
            "INSERT INTO rollouts (id, model, version, target_kind, target_value, target_key, "
            "stages, gates, policy, state, stage, stage_started_at, verdicts, reason, created_at, "
            "created_by, updated_at) VALUES ('ro-1', 'load-model', 2, 'all', '[]', 'all', ?, "
            "'{}', 'pause', ?, 0, ?, ?, 'gate drift failed', ?, 'token:t', ?)",
            [
                json.dumps(
                    [
                        {"percent": 25, "soak_s": 600, "max_wait_s": 3600},
                        {"percent": 100, "soak_s": 600, "max_wait_s": 3600},
                    ]
                ),
                state,
                stamp,
                json.dumps(verdicts),
                stamp,
                now.isoformat(timespec="milliseconds"),
            ],
        )
        for device, stage in (("cam-3", 0), ("cam-1", 1), ("cam-2", 1), ("cam-4", 1)):
            db.execute(
                "INSERT INTO rollout_devices (rollout_id, device_id, stage, from_version, "
                "placed_at) VALUES ('ro-1', ?, ?, 1, ?)",
                [device, stage, stamp],
            )
        db.conn.commit()


def test_rollout_page_and_alert(
    settings: FleetSettings, clock: Callable[[], datetime], browser: httpx.Client
) -> None:
    _rollout(settings, clock(), "paused")
    listing = browser.get("/dashboard/rollouts").text
    assert "/dashboard/rollouts/ro-1" in listing and "paused" in listing
    r = browser.get("/dashboard/rollouts/ro-1")
    assert r.status_code == 200, r.text
    assert r.text.count('class="progress-bar"') == 2
    assert "canary drifted against control" in r.text and ">0.27<" in r.text
    svgs = re.findall(r"<svg xmlns.*?</svg>", r.text)
    titles = re.findall(r'font-weight="600"[^>]*>([^<]+)</text>', "".join(svgs))
    assert [t.split(":")[0] for t in titles[:4]] == ["f0", "f1", "f2", "f3"]
    assert "canary vs control" in titles[0] and "drifted" in titles[0]
    with closing(connect(settings.db_path)) as db:
        AlertService(db, settings).evaluate(clock())
        kinds = {a.kind for a in AlertService(db, settings).find()}
    assert "rollout_paused" in kinds
    assert (
        "rollout ro-1 of load-model/2 paused: gate drift failed"
        in browser.get("/dashboard/alerts").text
    )
