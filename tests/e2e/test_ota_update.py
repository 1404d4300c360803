"""Signed OTA model updates through the whole stack: a real Mosquitto, the real fleet app, real
``edge-agent run`` processes enrolled with ``edge-agent provision``.

* v1 -> v2 assigned over the fleet API goes through every state to committed while a client
  sends inference requests the whole time, and none of them fails; the fleet's update history
  (ingested from the device's ``update`` topic) shows every transition.
* A release whose golden set passes on the server but whose single-row latency is over the
  device profile's budget is refused at health_check; the device keeps serving v1.
* A release whose outputs collapse to one class passes health_check and is rolled back during
  trial by the device alone (no fleet round trip); the device serves v1 again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

HAPPY = [
    ("idle", "downloading"),
    ("downloading", "verifying"),
    ("verifying", "installing"),
    ("installing", "health_check"),
    ("health_check", "activating"),
    ("activating", "trial"),
    ("trial", "committed"),
]


def transitions(history: list[dict[str, Any]], version: int) -> list[tuple[str, str]]:
    return [(t["from_state"], t["to_state"]) for t in reversed(history) if t["version"] == version]


def test_v1_to_v2_commits_through_every_state_and_no_request_fails(
    stack: Any, devices: Callable[..., Any], kit: Any
) -> None:
    device = devices(stack)
    traffic = kit.Traffic(device.predict_url, kit.traffic_rows())
    try:
        kit.wait_for("traffic on v1", lambda: len(traffic.versions) >= 20)
        started = time.monotonic()
        assigned = stack.assign(device.id, 2)
        assert assigned["published"] == [device.id], assigned  # the broker acknowledged it
        # the artifact the x86_64-gateway profile selects
        assert assigned["assignments"][0]["target_path"].endswith("/model.int8.onnx")
        final = stack.wait_final(device.id, 2)
        took = time.monotonic() - started
        assert (final["to_state"], final["reason"]) == ("committed", None), final
        kit.wait_for("traffic on v2", lambda: traffic.versions[-1:] == [2])
    finally:
        traffic.close()
    assert traffic.errors == [], traffic.errors[:5]
    assert {1, 2} <= set(traffic.versions)
    # served v1 until the switch, v2 after it: never back and forth
    first_v2 = traffic.versions.index(2)
    assert set(traffic.versions[first_v2:]) == {2}
    assert device.active_version() == 2 and device.predict(kit.traffic_rows(3)).model_version == 2
    record = device.record()
    assert record is not None and record.state.value == "committed"
    updates = stack.updates(device.id)
    assert transitions(updates["history"], 2) == HAPPY
    assert set(final["elapsed_s"]) >= {"downloading", "health_check", "trial"}
    current = updates["current"]
    assert current["desired"]["version"] == 2 and current["desired"]["published"]
    # the device's state report (retained birth) follows the switch: the fleet sees it in sync
    kit.wait_for(
        "the fleet to see the device run v2 in sync",
        lambda: stack.updates(device.id)["current"]["running_version"] == 2,
        15,
        0.2,
    )
    assert stack.updates(device.id)["current"]["in_sync"] is True
    print(f"v1 -> v2 through the real stack: {took:.2f}s, per state {final['elapsed_s']}")


def test_golden_failure_on_the_device_is_refused_at_health_check(
    stack: Any, devices: Callable[..., Any], kit: Any
) -> None:
    # v4 passed the server's golden replay at upload; on the device its single-row latency is
    # over the x86_64-gateway profile's 5 ms budget
    device = devices(stack)
    stack.assign(device.id, 4)
    final = stack.wait_final(device.id, 4)
    assert final["from_state"] == "health_check" and final["to_state"] == "failed", final
    assert final["reason"].startswith("health_check:") and "latency" in final["reason"], final
    assert ("installing", "health_check") in transitions(stack.updates(device.id)["history"], 4)
    assert device.active_version() == 1
    assert device.predict(kit.traffic_rows(3)).model_version == 1


def test_trial_failure_is_rolled_back_by_the_device_alone(
    stack: Any, devices: Callable[..., Any], kit: Any
) -> None:
    device = devices(stack)
    traffic = kit.Traffic(device.predict_url, kit.traffic_rows())
    try:
        kit.wait_for("traffic on v1", lambda: len(traffic.versions) >= 20)
        stack.assign(device.id, 3)
        final = stack.wait_final(device.id, 3)
        assert final["to_state"] == "rolled_back", final
        kit.wait_for("traffic back on v1", lambda: traffic.versions[-1:] == [1])
    finally:
        traffic.close()
    assert traffic.errors == [], traffic.errors[:5]
    history = stack.updates(device.id)["history"]
    steps = transitions(history, 3)
    why = next(t["reason"] for t in history if t["to_state"] == "rolling_back")
    assert why.startswith("trial:") and "predicted classes drift" in why, why
    assert ("activating", "trial") in steps and ("trial", "rolling_back") in steps, steps
    assert steps[-1] == ("rolling_back", "rolled_back")
    assert 3 in traffic.versions  # the new model did serve during its trial
    kit.wait_for(
        "the fleet to see the device run v1 again",
        lambda: stack.updates(device.id)["current"]["running_version"] == 1,
        15,
        0.2,
    )
    assert device.active_version() == 1
    assert device.predict(kit.traffic_rows(3)).model_version == 1
