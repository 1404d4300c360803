"""Rollouts over real HTTP: create / list / show / pause / resume / promote / abort, the
one-active-rollout rule, roles, refusals that say what to do, the audit trail, a fleet manager
restarted mid-rollout that carries on from the database (its scheduler's controller job
promotes the stage), and the ``fleet rollout`` / ``fleet device`` CLI against the same server."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from datetime import timedelta
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from sqlite_utils import Database

from fleet.app import create_app
from fleet.bundle_upload import pack
from fleet.cli import main as fleet_main
from fleet.keys import ONLINE_ROLES, ROOT, init_key_dir
from fleet.server import BackgroundServer
from fleet.settings import FleetSettings
from fleet.store import connect
from fleet.tuf_repo import TufRepository


def _helpers() -> ModuleType:
    name = "rollout_fleet"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


H = _helpers()
SAME = (0.5, 0.2, 0.15, 0.1, 0.05)
PLAN = {
    "model": H.MODEL,
    "version": 2,
    "stages": [
        {"percent": 10, "soak_s": 60, "max_wait_s": 3600},
        {"percent": 100, "soak_s": 60, "max_wait_s": 3600},
    ],
    "gates": {"min_latency_samples": 1, "min_drift_n": 100},
    "policy": "pause",
}


@pytest.fixture
def released(settings: FleetSettings, clock: object, http: httpx.Client, operator: dict) -> None:
    signers = init_key_dir(settings.keys_dir)
    repo = TufRepository(settings.tuf_dir, {r: signers[r] for r in ONLINE_ROLES})
    repo.init(signers[ROOT], clock())  # type: ignore[operator]
    for version in ("1", "2"):
        r = http.post(
            "/v1/models",
            content=pack(H.BUNDLES / version),
            headers={**operator, "Content-Type": "application/gzip"},
        )
        assert r.status_code == 201, r.text


@pytest.fixture
def db(settings: FleetSettings) -> Iterator[Database]:
    with closing(connect(settings.db_path)) as conn:
        yield conn


@pytest.fixture
def fleet(released: None, db: Database, settings: FleetSettings, clock: object) -> list[str]:
    """Ten devices on v1 (state reports through the ingestion path)."""
    reports = H.Reports(db, settings)
    ids = [f"dev-{i}" for i in range(10)]
    for d in ids:
        H.add_device(db, d, clock())  # type: ignore[operator]
        reports.state(d, 1, clock())  # type: ignore[operator]
    return ids


def test_create_show_and_steer_a_rollout(
    fleet: list[str],
    http: httpx.Client,
    operator: dict[str, str],
    viewer: dict[str, str],
    admin: dict[str, str],
    db: Database,
) -> None:
    assert http.post("/v1/rollouts", json=PLAN, headers=viewer).status_code == 403
    assert http.post("/v1/rollouts", json=PLAN).status_code == 401
    r = http.post("/v1/rollouts", json=PLAN, headers=operator)
    assert r.status_code == 201, r.text
    rollout = r.json()
    rid = rollout["id"]
    assert rollout["state"] == "running" and rollout["stage"] == 0
    assert rollout["target"] == {"kind": "all", "values": []}
    second = http.post("/v1/rollouts", json=PLAN, headers=operator)
    assert second.status_code == 409
    assert f"rollout {rid}" in second.json()["detail"] and "abort" in second.json()["detail"]

    listed = http.get("/v1/rollouts", headers=viewer, params={"state": "running"}).json()
    assert [x["id"] for x in listed] == [rid]
    status = http.get(f"/v1/rollouts/{rid}", headers=viewer).json()
    assert [s["devices"] for s in status["stages"]] == [1, 9]
    assert [s["status"] for s in status["stages"]] == ["current", "waiting"]
    assert status["stages"][0]["pending"] == 1  # assigned, no report yet

    def control(action: str, code: int = 200) -> dict:
        got = http.post(
            f"/v1/rollouts/{rid}/{action}", json={"reason": f"test {action}"}, headers=operator
        )
        assert got.status_code == code, got.text
        return got.json()

    assert http.post(f"/v1/rollouts/{rid}/pause", json={}, headers=viewer).status_code == 403
    assert control("pause")["state"] == "paused"
    assert "cannot take pause" in control("pause", 409)["detail"]
    assert control("resume")["state"] == "running"
    promoted = control("promote")
    assert promoted["stage"] == 1 and promoted["state"] == "running"
    assigned = db.execute(
        "SELECT count(*) FROM assignments WHERE rollout_id = ? AND rollback = 0", [rid]
    ).fetchone()[0]
    assert assigned == 10
    assert control("abort")["state"] == "rolling_back"
    rollbacks = db.execute(
        "SELECT count(*) FROM assignments WHERE rollout_id = ? AND rollback = 1 AND version = 1",
        [rid],
    ).fetchone()[0]
    assert rollbacks == 10
    assert "cannot take resume" in control("resume", 409)["detail"]
    audit = http.get("/v1/audit", headers=admin, params={"target": rid}).json()
    actions = [e["action"] for e in audit["items"]]
    for action in ("create", "pause", "resume", "promote", "abort"):
        assert f"rollout.{action}" in actions
    events = http.get(f"/v1/rollouts/{rid}", headers=viewer).json()["events"]
    assert [e["event"] for e in events] == ["create", "pause", "resume", "promote", "abort"]


@pytest.mark.parametrize(
    ("change", "code", "words"),
    [
        ({"stages": [{"percent": 50}, {"percent": 10}]}, 422, "must grow"),
        ({"stages": [{"percent": 50}]}, 422, "reach 100"),
        ({"version": 9}, 404, "v9"),
        ({"gates": {"latency_ratio": 0.5}}, 422, "latency_ratio"),
        ({"target": {"kind": "group", "values": ["nobody"]}}, 404, "no active devices"),
        ({"target": {"kind": "group", "values": []}}, 422, "exactly one group"),
        ({"version": 1}, 409, "no device of target all needs"),
        ({"policy": "ignore"}, 422, "policy"),
    ],
)
def test_bad_plans_are_refused_with_what_to_do(
    fleet: list[str],
    http: httpx.Client,
    operator: dict[str, str],
    change: dict,
    code: int,
    words: str,
) -> None:
    r = http.post("/v1/rollouts", json={**PLAN, **change}, headers=operator)
    assert r.status_code == code, r.text
    assert words in json.dumps(r.json())
    assert http.get("/v1/rollouts/ro-nope", headers=operator).status_code == 404


def _wait_for(check: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError("timed out")


def test_a_restarted_fleet_manager_carries_on(
    fleet: list[str],
    settings: FleetSettings,
    clock: object,
    operator: dict[str, str],
    db: Database,
) -> None:
    first = BackgroundServer(create_app(settings, clock=clock))  # type: ignore[arg-type]
    first.start()
    try:
        with httpx.Client(base_url=first.url, timeout=10) as http:
            rid = http.post("/v1/rollouts", json=PLAN, headers=operator).json()["id"]
    finally:
        first.stop()  # killed mid-rollout: stage 1 assigned, nothing judged yet
    canary = db.execute(
        "SELECT device_id FROM rollout_devices WHERE rollout_id = ? AND stage = 0", [rid]
    ).fetchone()[0]
    # while the manager is down, the canary updates and everyone keeps reporting
    reports = H.Reports(db, settings)
    clock.advance(timedelta(seconds=30))  # type: ignore[attr-defined]
    reports.update(canary, 2, "committed", clock())  # type: ignore[operator]
    for d in fleet:
        version = 2 if d == canary else 1
        reports.heartbeat(d, version, 10.0, clock())  # type: ignore[operator]
        reports.drift(d, version, SAME, 200, clock())  # type: ignore[operator]
    clock.advance(timedelta(seconds=60))  # type: ignore[attr-defined]
    second = BackgroundServer(create_app(settings, clock=clock))  # type: ignore[arg-type]
    second.start()
    try:
        with httpx.Client(base_url=second.url, timeout=10) as http:

            def promoted() -> bool:
                got = http.get(f"/v1/rollouts/{rid}", headers=operator).json()
                return bool(got["rollout"]["stage"] == 1)

            _wait_for(promoted)  # by the scheduler's controller job, not by a request
            status = http.get(f"/v1/rollouts/{rid}", headers=operator).json()
    finally:
        second.stop()
    assert status["events"][-1]["actor"] == "system"
    assert "every gate passed" in status["events"][-1]["reason"]
    assigned = db.execute(
        "SELECT count(*) FROM assignments WHERE rollout_id = ? AND rollback = 0", [rid]
    ).fetchone()[0]
    assert assigned == 10


def test_cli_creates_watches_and_steers(
    fleet: list[str],
    live: str,
    operator: dict[str, str],
    viewer: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    op = ["--server", live, "--token", operator["Authorization"].removeprefix("Bearer ")]
    view = ["--server", live, "--token", viewer["Authorization"].removeprefix("Bearer ")]
    create = ["rollout", "create", "--model", H.MODEL, "--version", "2", "--stages", "10,100"]
    assert fleet_main([*create, "--soak", "1m", "--policy", "pause", "--json", *op]) == 0
    rid = json.loads(capsys.readouterr().out)["id"]
    assert fleet_main([*create, *op]) == 2
    assert f"rollout {rid}" in capsys.readouterr().err
    assert fleet_main(["rollout", "list", *view]) == 0
    assert rid in capsys.readouterr().out
    assert fleet_main(["rollout", "watch", rid, "--once", *view]) == 0
    frame = capsys.readouterr().out
    assert "stage 1/2" in frame and "10%" in frame and "current" in frame
    assert fleet_main(["rollout", "pause", rid, "--reason", "lunch", *view]) == 2
    assert "403" in capsys.readouterr().err
    assert fleet_main(["rollout", "pause", rid, "--reason", "lunch", *op]) == 0
    assert "paused" in capsys.readouterr().out
    assert fleet_main(["rollout", "show", rid, *view]) == 0
    shown = capsys.readouterr().out
    assert "pause" in shown and "lunch" in shown
    assert fleet_main(["rollout", "abort", rid, *op]) == 0
    assert "rolling_back" in capsys.readouterr().out
    assert fleet_main(["device", "list", *view]) == 0
    out = capsys.readouterr().out
    assert all(d in out for d in fleet)
    assert fleet_main(["device", "list", "--json", *view]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == 10
    assert fleet_main(["device", "show", fleet[0], *view]) == 0
    out = capsys.readouterr().out
    assert fleet[0] in out and "pdm-classifier v1" in out
