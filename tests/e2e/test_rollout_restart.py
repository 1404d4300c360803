"""A fleet manager restarted in the middle of a staged rollout carries the rollout on, with
real agents: a real Mosquitto, the real fleet app, four ``edge-agent run`` processes on v1
serving live traffic and reporting (1 s heartbeats, 2 s drift windows).

v2 (a 6 s device trial, so the trial straddles the stop) goes out in two stages (50 %, 100 %).
Once the first stage committed and the controller promoted, and the second stage's devices are
in their trial, the whole fleet side stops (uvicorn, scheduler, ingestion, publisher; data dir
kept) while the broker and the agents run on: the second stage commits with no fleet, the
devices keep reporting, and the reports queue in the broker for the fleet's persistent
ingestion session. A new fleet app on the same data dir and port then:

* carries on the same rollout at the same stage (no second promote, the stage's start time
  kept) to completed, every device committed on v2;
* issues no assignment twice (one v2 document per device, the serials and issue times the
  first app signed);
* ingests every report made while it was down: each device's update history is one unbroken
  chain idle -> ... -> committed, the second stage's commits arrive only after the restart, and
  the outbox-numbered reports (heartbeats, drift, updates) around the outage have no hole in
  their sequence numbers;

and every prediction on every device succeeded throughout.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from agent.config import TelemetryConfig, load_config, save_config

FAST = TelemetryConfig(heartbeat_seconds=1.0, drift_window_seconds=2.0, drift_min_rows=50)
GATES = {
    "min_drift_n": 300,
    "min_latency_samples": 2,
    "latency_ratio": 50.0,  # a loaded 2-core test box is noisy; the latency gate has unit tests
    "stuck_timeout_s": 180,
}
TRIAL_S = 6.0  # long enough that a device found in trial is still in it once the fleet stopped
CHAIN = ("idle", "downloading", "verifying", "installing", "health_check", "activating", "trial")
# reports numbered by the agent's outbox, one seq each (state births/wills use reserved blocks)
OUTBOX_KINDS = ("telemetry/heartbeat", "telemetry/drift", "update")


@pytest.fixture
def restartable(tmp_path: Path, kit: Any) -> Iterator[Any]:
    """A stack of this test's own (it stops and restarts the fleet) with v1 and a v2 whose
    trial lasts :data:`TRIAL_S`."""
    with ExitStack() as es:
        s = kit.start_stack(tmp_path / "stack", es)
        s.upload(kit.write_bundle(tmp_path / "b1", 1, base=1))
        s.upload(kit.write_bundle(tmp_path / "b2", 2, health={"trial_seconds": TRIAL_S}))
        yield s


def query(stack: Any, sql: str, *args: Any) -> list[sqlite3.Row]:
    """Read the fleet's database file directly (works with the fleet stopped)."""
    with closing(sqlite3.connect(f"file:{stack.settings.db_path}?mode=ro", uri=True)) as db:
        db.row_factory = sqlite3.Row
        return list(db.execute(sql, args))


def status(stack: Any, rid: str) -> dict[str, Any]:
    r = stack.http.get(f"/v1/rollouts/{rid}", headers=stack.operator)
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def local_state(device: Any) -> str | None:
    record = device.record()
    return None if record is None or record.version != 2 else str(record.state)


def test_a_fleet_restarted_mid_rollout_carries_it_on(
    restartable: Any, devices: Callable[..., Any], kit: Any
) -> None:
    stack = restartable
    fleet: list[Any] = []
    for _ in range(4):
        device = devices(stack, start=False)
        save_config(dataclasses.replace(load_config(device.state), telemetry=FAST))
        device.start()
        assert device.wait_serving().model_version == 1
        r = stack.http.patch(
            f"/v1/devices/{device.id}", json={"group": "restart"}, headers=stack.operator
        )
        assert r.status_code == 200, r.text
        fleet.append(device)
    traffic = [kit.Traffic(d.predict_url, kit.traffic_rows()) for d in fleet]
    try:
        body = {
            "model": kit.MODEL,
            "version": 2,
            "target": {"kind": "group", "values": ["restart"]},
            "stages": [{"percent": p, "soak_s": 4, "max_wait_s": 120} for p in (50, 100)],
            "gates": GATES,
            "policy": "pause",  # a failed gate stops in place (and the test says why)
        }
        r = stack.http.post("/v1/rollouts", json=body, headers=stack.operator)
        assert r.status_code == 201, r.text
        rid = r.json()["id"]

        def promoted() -> dict[str, Any] | None:
            doc = status(stack, rid)
            assert doc["rollout"]["state"] == "running", doc["rollout"]
            return doc if doc["rollout"]["stage"] == 1 else None

        doc = kit.wait_for("the promotion to stage 2", promoted, 60, 0.3)
        second = {d["device_id"] for d in doc["devices"] if d["stage"] == 1}
        assert len(second) == 2 and doc["stages"][0]["committed"] == 2, doc["stages"]
        late = [d for d in fleet if d.id in second]
        kit.wait_for(
            "the second stage in its trial",
            lambda: all(local_state(d) == "trial" for d in late),
            30,
            0.05,
        )

        # --- the fleet goes down; broker and agents run on ------------------------------------
        stack.stop_fleet()
        down_at = time.time()
        before: dict[str, Any] = {
            "rollout": dict(query(stack, "SELECT * FROM rollouts WHERE id = ?", rid)[0]),
            "assignments": [
                dict(a)
                for a in query(
                    stack,
                    "SELECT device_id, serial, version, rollback, issued_at FROM assignments "
                    "WHERE rollout_id = ? ORDER BY device_id",
                    rid,
                )
            ],
            "placed": {
                r["device_id"]: (r["stage"], r["assigned_at"])
                for r in query(stack, "SELECT * FROM rollout_devices WHERE rollout_id = ?", rid)
            },
        }
        assert before["rollout"]["stage"] == 1 and before["rollout"]["state"] == "running"
        assert len(before["assignments"]) == 4, before["assignments"]
        for d in late:
            stored = query(
                stack,
                "SELECT to_state FROM update_events WHERE device_id = ? AND release_version = 2",
                d.id,
            )
            assert "committed" not in {e["to_state"] for e in stored}, (
                f"{d.id} committed before the fleet stopped: the outage proves nothing"
            )
            assert local_state(d) == "trial", f"{d.id} left its trial before the fleet stopped"
        kit.wait_for(
            "the second stage to commit with the fleet down",
            lambda: all(local_state(d) == "committed" for d in late),
            30,
            0.1,
        )
        time.sleep(3)  # a few more heartbeats and drift windows with nobody listening
        assert all(d.alive() for d in fleet)
        up_at = time.time()
        stack.start_fleet()
        # --- the new fleet app --------------------------------------------------------------

        def completed() -> dict[str, Any] | None:
            got = status(stack, rid)
            assert got["rollout"]["state"] in ("running", "completed"), got["rollout"]
            return got if got["rollout"]["state"] == "completed" else None

        done = kit.wait_for("the rollout to complete after the restart", completed, 60, 0.3)
    finally:
        for t in traffic:
            t.close()

    # the same rollout, carried on from its stage
    listed = stack.http.get("/v1/rollouts", headers=stack.operator).json()
    assert [x["id"] for x in listed] == [rid]
    assert done["rollout"]["stage"] == 1
    assert [(e["event"], e["stage"]) for e in done["events"]] == [
        ("create", 0),
        ("promote", 1),
        ("complete", 1),
    ], done["events"]
    after = dict(query(stack, "SELECT * FROM rollouts WHERE id = ?", rid)[0])
    assert after["stage_started_at"] == before["rollout"]["stage_started_at"]
    assert [s["committed"] for s in done["stages"]] == [2, 2]

    # nothing assigned twice: the documents the first app signed, and no other
    assignments = [
        dict(a)
        for a in query(
            stack,
            "SELECT device_id, serial, version, rollback, issued_at FROM assignments "
            "WHERE device_id IN (?, ?, ?, ?) ORDER BY device_id, serial",
            *[d.id for d in fleet],
        )
    ]
    assert assignments == before["assignments"]
    assert all(a["version"] == 2 and not a["rollback"] for a in assignments)
    placed = {
        r["device_id"]: (r["stage"], r["assigned_at"])
        for r in query(stack, "SELECT * FROM rollout_devices WHERE rollout_id = ?", rid)
    }
    assert placed == before["placed"]

    for device in fleet:
        # every device on v2, updated once, its whole history ingested without a gap
        assert device.active_version() == 2 and local_state(device) == "committed"
        history = stack.updates(device.id)["history"][::-1]  # oldest first
        chain = [(t["from_state"], t["to_state"]) for t in history if t["version"] == 2]
        states = [*CHAIN, "committed"]
        assert chain == list(zip(states, states[1:], strict=False)), chain
        if device in late:  # the commit was reported while the fleet was down
            commit = query(
                stack,
                "SELECT received_at FROM telemetry_messages m JOIN update_events e "
                "USING (device_id, seq) WHERE device_id = ? AND e.to_state = 'committed'",
                device.id,
            )
            assert len(commit) == 1
            received = datetime.fromisoformat(commit[0]["received_at"]).timestamp()
            assert received >= up_at, (device.id, commit[0]["received_at"], up_at)
        # the outbox-numbered reports around the outage: one unbroken run of seqs, some made
        # while the fleet was down
        seqs = [
            (r["seq"], r["ts"])
            for r in query(
                stack,
                "SELECT seq, ts FROM telemetry_messages WHERE device_id = ? AND ts BETWEEN ? AND ? "
                f"AND kind IN ({', '.join('?' * len(OUTBOX_KINDS))}) ORDER BY seq",
                device.id,
                down_at - 5,
                up_at + 5,
                *OUTBOX_KINDS,
            )
        ]
        numbers = [s for s, _ in seqs]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), numbers
        while_down = [s for s, ts in seqs if down_at < ts < up_at]
        assert len(while_down) >= 3, (device.id, seqs, down_at, up_at)

    for device, t in zip(fleet, traffic, strict=True):
        assert t.errors == [], (device.id, t.errors[:3])
        assert 1 in t.versions and t.versions[-1] == 2
        switched = t.versions.index(2)
        assert set(t.versions[switched:]) == {2}, device.id  # one switch, never back
