"""Staged rollouts through the whole stack: a real Mosquitto, the real fleet app with its
scheduler's rollout controller, real ``edge-agent run`` processes with live traffic reporting
heartbeats and drift windows (short telemetry intervals), driven only over the fleet's HTTP API.

* A good release (v2) goes through both stages to completed (after an operator's pause and
  resume), every device ends on v2, including one that was offline when its stage started
  and got the release from its retained desired document when it came back.
* A release whose canaries fail their trial (v3: outputs collapse) is rolled back: the canaries
  revert on their own, the fleet signs rollbacks for every device that took it, the rollout ends
  rolled back and the last stage never gets the release.
* A release that is healthy on the device (passes golden set and trial) but shifts the output
  distribution (v5: class 0's bias raised) is stopped by the fleet's drift gate (canaries vs the
  control cohort still on v1) before the next stage; the operator aborts and every canary that
  committed v5 is rolled back to v1.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
from onnx import numpy_helper

from agent.config import TelemetryConfig, load_config, save_config

FAST = TelemetryConfig(heartbeat_seconds=1.0, drift_window_seconds=2.0, drift_min_rows=50)
GATES = {
    "min_drift_n": 300,
    "min_latency_samples": 2,
    "latency_ratio": 50.0,  # a loaded 2-core test box is noisy; the latency gate has unit tests
    "stuck_timeout_s": 180,
}


def shifted_model(data: bytes, delta: float = 6.0) -> bytes:
    """Class 0's output bias raised by ``delta``: on the traffic rows class 0 goes from 16 to
    27 of 64 (JS distance 0.17, under the device trial's 0.3: the device keeps it)."""
    model = onnx.load_from_string(data)
    for init in model.graph.initializer:
        if init.name == "dense_2.bias":
            bias = numpy_helper.to_array(init).copy()
            bias[0] += delta
            init.CopyFrom(numpy_helper.from_array(bias, init.name))
    return model.SerializeToString()


@dataclasses.dataclass
class Group:
    name: str
    devices: list[Any]
    traffic: list[Any]

    def close(self) -> None:
        for t in self.traffic:
            t.close()


def group_of(stack: Any, devices: Callable[..., Any], kit: Any, name: str, n: int = 3) -> Group:
    """``n`` devices with fast telemetry, in fleet group ``name``, serving live traffic."""
    made = []
    for _ in range(n):
        device = devices(stack, start=False)
        config = load_config(device.state)
        save_config(dataclasses.replace(config, telemetry=FAST))
        device.start()
        assert device.wait_serving().model_version == 1
        r = stack.http.patch(
            f"/v1/devices/{device.id}", json={"group": name}, headers=stack.operator
        )
        assert r.status_code == 200, r.text
        made.append(device)
    traffic = [kit.Traffic(d.predict_url, kit.traffic_rows()) for d in made]
    return Group(name, made, traffic)


def start(stack: Any, group: Group, version: int, stages: list[float], policy: str) -> str:
    body = {
        "model": "pdm-classifier",
        "version": version,
        "target": {"kind": "group", "values": [group.name]},
        "stages": [{"percent": p, "soak_s": 4, "max_wait_s": 120} for p in stages],
        "gates": GATES,
        "policy": policy,
    }
    r = stack.http.post("/v1/rollouts", json=body, headers=stack.operator)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def status(stack: Any, rid: str) -> dict[str, Any]:
    r = stack.http.get(f"/v1/rollouts/{rid}", headers=stack.operator)
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def control(stack: Any, rid: str, action: str) -> dict[str, Any]:
    r = stack.http.post(f"/v1/rollouts/{rid}/{action}", json={}, headers=stack.operator)
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def wait_state(stack: Any, kit: Any, rid: str, state: str, timeout: float = 150) -> dict:
    def reached() -> dict[str, Any] | None:
        doc = status(stack, rid)
        return doc if doc["rollout"]["state"] == state else None

    try:
        got: dict[str, Any] = kit.wait_for(f"rollout {rid} {state}", reached, timeout, 0.5)
    except AssertionError:
        raise AssertionError(f"rollout not {state}: {status(stack, rid)['rollout']}") from None
    return got


def assigned(stack: Any, rid: str, device: str) -> list[tuple[int, bool]]:
    """The device's current assignment as (version, rollback) if this rollout issued it."""
    r = stack.http.get(f"/v1/devices/{device}/assignment", headers=stack.operator)
    if r.status_code == 404:
        return []
    got = r.json()
    return [(got["version"], got["rollback"])] if got["rollout_id"] == rid else []


def test_a_good_release_goes_through_every_stage(
    stack: Any, devices: Callable[..., Any], kit: Any
) -> None:
    group = group_of(stack, devices, kit, "rollout-good")
    try:
        rid = start(stack, group, 2, [30, 100], "rollback")
        assert control(stack, rid, "pause")["state"] == "paused"
        time.sleep(8)  # longer than the soak and a controller tick: paused means no promotion
        doc = status(stack, rid)
        assert doc["rollout"]["state"] == "paused" and doc["rollout"]["stage"] == 0
        canary = [d for d in doc["devices"] if d["stage"] == 0]
        assert len(canary) == 1
        # a device of the last stage is offline when its stage starts
        last = {d["device_id"] for d in doc["devices"] if d["stage"] == 1}
        i, offline = next((i, d) for i, d in enumerate(group.devices) if d.id in last)
        group.traffic[i].close()
        offline.stop()
        assert control(stack, rid, "resume")["state"] == "running"
        kit.wait_for("stage 2", lambda: status(stack, rid)["rollout"]["stage"] == 1, 90, 0.5)
        time.sleep(6)
        doc = status(stack, rid)
        mine = next(d for d in doc["devices"] if d["device_id"] == offline.id)
        assert doc["rollout"]["state"] == "running" and mine["outcome"] == "pending", doc
        # back online: the retained desired document brings it the release
        offline.start()
        offline.wait_serving()
        group.traffic[i] = kit.Traffic(offline.predict_url, kit.traffic_rows())
        done = wait_state(stack, kit, rid, "completed")
    finally:
        group.close()
    assert [s["committed"] for s in done["stages"]] == [1, 2]
    assert [e["event"] for e in done["events"]] == [
        "create",
        "pause",
        "resume",
        "promote",
        "complete",
    ]
    verdicts = {v["gate"]: v["status"] for v in done["rollout"]["verdicts"]}
    assert verdicts["updates"] == "pass"
    promote = done["events"][3]["reason"]
    assert "every gate passed" in promote, promote
    for device in group.devices:
        kit.wait_for(f"{device.id} on v2", lambda d=device: d.active_version() == 2, 30)


def test_canaries_failing_their_trial_get_the_rollout_rolled_back(
    stack: Any, devices: Callable[..., Any], kit: Any
) -> None:
    group = group_of(stack, devices, kit, "rollout-trial")
    try:
        rid = start(stack, group, 3, [50, 100], "rollback")
        done = wait_state(stack, kit, rid, "rolled_back")
    finally:
        group.close()
    canaries = {d["device_id"] for d in done["devices"] if d["stage"] == 0}
    assert len(canaries) == 2
    failed = next(e for e in done["events"] if e["event"] == "gate_failed_rollback")
    assert "trial gate failed" in failed["reason"] or "updates gate failed" in failed["reason"]
    for device in group.devices:
        assert device.active_version() == 1
        got = assigned(stack, rid, device.id)
        if device.id in canaries:
            assert got == [(1, True)]  # the fleet's signed rollback
        else:
            assert got == []  # the last stage never got v3


def test_shifted_outputs_are_stopped_by_the_drift_gate_then_aborted(
    stack: Any, devices: Callable[..., Any], kit: Any, tmp_path: Path
) -> None:
    shifted = shifted_model(kit._fp32())
    stack.upload(
        kit.write_bundle(
            tmp_path / "b5",
            5,
            only="model.fp32.onnx",
            replace={
                "model.fp32.onnx": shifted,
                "golden/model.fp32.onnx.json": kit.golden_for(shifted, 2, tmp_path),
            },
        )
    )
    group = group_of(stack, devices, kit, "rollout-drift")
    try:
        rid = start(stack, group, 5, [50, 100], "pause")
        paused = wait_state(stack, kit, rid, "paused")
        rollout = paused["rollout"]
        assert rollout["stage"] == 0
        assert "drift gate failed" in rollout["reason"], rollout["reason"]
        verdicts = {v["gate"]: v["status"] for v in rollout["verdicts"]}
        assert verdicts["updates"] == "pass" and verdicts["drift"] == "fail", verdicts
        canaries = [d for d in group.devices if d.active_version() == 5]
        assert len(canaries) == 2
        assert control(stack, rid, "abort")["state"] == "rolling_back"
        wait_state(stack, kit, rid, "rolled_back")
    finally:
        group.close()
    for device in group.devices:
        kit.wait_for(f"{device.id} back on v1", lambda d=device: d.active_version() == 1, 30)
    others = [d for d in group.devices if d not in canaries]
    assert all(assigned(stack, rid, d.id) == [] for d in others)
    assert all(assigned(stack, rid, d.id) == [(1, True)] for d in canaries)
