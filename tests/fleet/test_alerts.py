"""Alert rules (pure, ``now`` passed in) and the alert service on a real SQLite database with a
sample fleet stored through the real ingestion writer: opened once, deduplicated, resolved,
queued for webhooks in the same transaction; the HTTP API and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlite_utils import Database

from fleet.alert_service import AlertService, evaluate_job
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
from fleet.dashboard.sample_fleet import seed
from fleet.settings import FleetSettings
from fleet.store import Store, connect
from fleet.webhooks import WebhookService

NOW = datetime(2030, 1, 2, 12, 0, tzinfo=UTC)
T = Thresholds(offline_after=timedelta(minutes=15), retrain_windows=3)


def kinds(alerts: tuple[OpenAlert, ...]) -> list[tuple[str, str]]:
    return [(a.kind.value, a.subject) for a in alerts]


# --- pure rules -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ago", "online", "alerted"),
    [
        (timedelta(minutes=14, seconds=59), False, False),
        (timedelta(minutes=15), False, True),
        (timedelta(hours=3), True, True),  # silent although its last state said online
        (timedelta(seconds=5), True, False),
    ],
)
def test_offline_after_the_threshold(ago: timedelta, online: bool, alerted: bool) -> None:
    facts = Facts(devices=(DeviceContact("cam-1", online, NOW - ago),))
    got = evaluate(facts, T, NOW)
    assert kinds(got) == ([("device_offline", "cam-1")] if alerted else [])


def test_a_device_never_seen_is_not_offline() -> None:
    assert evaluate(Facts(devices=(DeviceContact("new", False, None),)), T, NOW) == ()


@pytest.mark.parametrize(
    ("drifted", "age", "alerted"),
    [
        (True, timedelta(minutes=10), True),
        (False, timedelta(minutes=10), False),
        (True, timedelta(hours=7), False),  # older than drift_lookback (6 h)
    ],
)
def test_device_drift_alarm(drifted: bool, age: timedelta, alerted: bool) -> None:
    d = DeviceDrift("cam-2", "pdm", 3, NOW - age, drifted, ("f0",) if drifted else ())
    got = evaluate(Facts(device_drift=(d,)), T, NOW)
    assert kinds(got) == ([("drift_device", "cam-2")] if alerted else [])
    if alerted:
        assert got[0].key == "drift_device:cam-2:pdm/3" and "f0" in got[0].message


def buckets(*verdicts: bool | None) -> FleetDrift:
    out = []
    for i, v in enumerate(verdicts):
        start = NOW - timedelta(hours=len(verdicts) - i)
        out.append(FleetBucket(start, start + timedelta(hours=1), v, ("f1",) if v else (), 5))
    return FleetDrift("pdm", 3, tuple(out))


@pytest.mark.parametrize(
    ("verdicts", "expected"),
    [
        ((False, False, True), ["drift_fleet"]),
        ((True, True, True), ["drift_fleet", "retraining_recommended"]),
        ((True, True, False), []),  # the newest bucket is clean: nothing open
        ((True, None, True), ["drift_fleet"]),  # an empty bucket breaks the run
        ((None, None, None), []),
        ((True, True, True, True), ["drift_fleet", "retraining_recommended"]),
    ],
)
def test_fleet_drift_and_retraining(verdicts: tuple[bool | None, ...], expected: list[str]) -> None:
    got = evaluate(Facts(fleet_drift=(buckets(*verdicts),)), T, NOW)
    assert sorted(a.kind.value for a in got) == expected
    assert all(a.subject == "pdm/3" for a in got)


def test_retraining_threshold_is_configurable() -> None:
    facts = Facts(fleet_drift=(buckets(False, True, True),))
    assert AlertKind.RETRAINING_RECOMMENDED not in {a.kind for a in evaluate(facts, T, NOW)}
    two = Thresholds(retrain_windows=2)
    assert AlertKind.RETRAINING_RECOMMENDED in {a.kind for a in evaluate(facts, two, NOW)}
    with pytest.raises(ValueError, match="2 or more"):
        Thresholds(retrain_windows=1)


@pytest.mark.parametrize(
    ("state", "age", "kind"),
    [
        ("paused", timedelta(days=3), "rollout_paused"),
        ("rolling_back", timedelta(minutes=1), "rollout_rolled_back"),
        ("rolled_back", timedelta(hours=1), "rollout_rolled_back"),
        ("rolled_back", timedelta(hours=25), None),
        ("running", timedelta(0), None),
        ("completed", timedelta(0), None),
    ],
)
def test_rollout_alerts(state: str, age: timedelta, kind: str | None) -> None:
    r = RolloutStatus("ro-1", state, "pdm", 4, NOW - age, "gate drift failed")
    got = evaluate(Facts(rollouts=(r,)), T, NOW)
    assert [a.kind.value for a in got] == ([kind] if kind else [])
    if kind:
        assert "gate drift failed" in got[0].message


@given(st.lists(st.sampled_from(["a", "b", "c", "d"]), unique=True), st.data())
def test_reconcile_partitions_keys(stored_keys: list[str], data: st.DataObject) -> None:
    current_keys = data.draw(st.lists(st.sampled_from(["a", "b", "c", "d"]), unique=True))
    current = [OpenAlert(k, AlertKind.DRIFT_FLEET, k, f"m-{k}") for k in current_keys]
    stored = {k: ("m-" + k if k < "c" else "old") for k in stored_keys}
    r = reconcile(stored, current)
    assert {a.key for a in r.opened} == set(current_keys) - set(stored_keys)
    assert set(r.resolved) == set(stored_keys) - set(current_keys)
    assert {a.key for a in r.refreshed} == {k for k in current_keys if k in stored and k >= "c"}


# --- the service on a real database -----------------------------------------------------------


@pytest.fixture
def db(settings: FleetSettings) -> Iterator[Database]:
    with closing(connect(settings.db_path)) as conn:
        from fleet.store import migrate

        migrate(conn)
        yield conn


def test_service_opens_once_resolves_and_queues_events(
    db: Database, settings: FleetSettings
) -> None:
    seed(db, settings, NOW, drifting=("cam-3",), offline=("cam-4",))
    hooks = WebhookService(db)
    hooks.add("http://127.0.0.1:9/hook", "s" * 16, "test", NOW)
    service = AlertService(db, settings)
    first = service.evaluate(NOW)
    found = {(a.kind, a.subject) for a in service.find()}
    assert found == {
        ("device_offline", "cam-4"),
        ("drift_device", "cam-3"),
        ("drift_fleet", "load-model/1"),
    }
    assert len(first.opened) == 3 and hooks.pending() == 3
    # evaluating again: same alerts, nothing new queued
    again = service.evaluate(NOW + timedelta(seconds=30))
    assert again.opened == () and again.resolved == () and hooks.pending() == 3
    # cam-4 reports again: its alert resolves, and the resolution is queued
    db.execute(
        "UPDATE devices SET last_seen = ?, online = 1 WHERE id = 'cam-4'",
        [(NOW + timedelta(minutes=1)).isoformat()],
    )
    db.conn.commit()
    later = service.evaluate(NOW + timedelta(minutes=2))
    assert len(later.resolved) == 1
    resolved = service.get(later.resolved[0])
    assert resolved.kind == "device_offline" and resolved.resolved_at is not None
    events = [(d.event, d.alert_id) for d in hooks.deliveries()]
    assert ("alert.resolved", resolved.id) in events and hooks.pending() == 4
    assert {a.subject for a in service.find("open")} == {"cam-3", "load-model/1"}
    assert len(service.find("all")) == 3 and len(service.find("resolved")) == 1


def test_the_job_survives_bad_state_and_the_store_pool(settings: FleetSettings) -> None:
    store = Store(settings.db_path)
    with store.connect() as conn:
        from fleet.store import migrate

        migrate(conn)
    assert evaluate_job(store, settings, NOW) is not None
    store.close()


def test_alerts_over_http_and_cli(
    http: httpx.Client,
    settings: FleetSettings,
    clock: Callable[[], datetime],
    viewer: dict[str, str],
    operator: dict[str, str],
    live: str,
) -> None:
    with closing(connect(settings.db_path)) as conn:
        seed(conn, settings, clock(), devices=("cam-1", "cam-2"), drifting=(), offline=("cam-2",))
    assert http.post("/v1/alerts/evaluate", headers=viewer).status_code == 403
    r = http.post("/v1/alerts/evaluate", headers=operator)
    assert r.status_code == 200 and len(r.json()["opened"]) == 1, r.text
    listed = http.get("/v1/alerts", headers=viewer).json()
    assert [(a["kind"], a["subject"]) for a in listed] == [("device_offline", "cam-2")]
    assert http.get("/v1/alerts", params={"kind": "nope"}, headers=viewer).status_code == 422
    assert http.get("/v1/alerts/alr-missing", headers=viewer).status_code == 404
    alert_id = listed[0]["id"]
    acked = http.post(f"/v1/alerts/{alert_id}/acknowledge", headers=operator).json()
    assert acked["acknowledged_at"] and acked["acknowledged_by"].startswith("token:")
    detail = http.get(f"/v1/alerts/{alert_id}", headers=viewer).json()
    assert detail["alert"]["id"] == alert_id and detail["deliveries"] == []
    # the CLI reads the same over HTTP
    token = viewer["Authorization"].removeprefix("Bearer ")
    env = {"EDGEFLEET_SERVER": live, "EDGEFLEET_TOKEN": token, "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "alert", "list"],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "device_offline" in out.stdout and "cam-2" in out.stdout
    shown = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "alert", "show", alert_id, "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["alert"]["id"] == alert_id
    missing = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "alert", "ack", "alr-nope"],
        capture_output=True,
        text=True,
        env={**env, "EDGEFLEET_TOKEN": operator["Authorization"].removeprefix("Bearer ")},
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert missing.returncode == 2 and "no alert" in missing.stderr
