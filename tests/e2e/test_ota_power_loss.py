"""Power loss during an OTA update, through the real stack: a real ``edge-agent run`` process is
SIGKILLed inside each update state (the test pause hook, ``EDGEFLEET_TEST_PAUSE_IN`` /
``EDGEFLEET_TEST_PAUSE_MARKER``, holds it there after the state was saved), restarted without
the hook, and ends on a working model every time: the new one committed when the cut came
before or during a good release's trial, the old one when the release fails its trial or the
cut came while rolling back. Predictions work afterwards, the fleet's update history (ingested
over MQTT, including the reports queued in the outbox before the cut) shows the end, and the
fleet's view of the running release (the device's retained state) matches the active slot.

Each case runs once in CI; ``EDGEFLEET_REPEATS=N`` runs each N times on a fresh device, to hunt
for races (the long run; 3 repeats take about three minutes).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

REPEATS = int(os.environ.get("EDGEFLEET_REPEATS", "1"))
GOOD, TRIAL_FAILS = 2, 3  # the stack's releases (see tests/e2e/conftest.py)
CASES = [
    ("downloading", GOOD, "committed", 2),
    ("verifying", GOOD, "committed", 2),
    ("installing", GOOD, "committed", 2),
    ("health_check", GOOD, "committed", 2),
    ("activating", GOOD, "committed", 2),
    ("trial", GOOD, "committed", 2),
    ("trial", TRIAL_FAILS, "rolled_back", 1),
    ("rolling_back", TRIAL_FAILS, "rolled_back", 1),
]


@pytest.mark.parametrize("repeat", range(REPEATS))
@pytest.mark.parametrize(("pause_in", "version", "final", "serving"), CASES)
def test_power_loss_in_each_state_ends_on_a_working_model(
    stack: Any,
    devices: Callable[..., Any],
    kit: Any,
    pause_in: str,
    version: int,
    final: str,
    serving: int,
    repeat: int,
) -> None:
    device = devices(stack, start=False)
    marker = device.state / "paused"
    device.start({"EDGEFLEET_TEST_PAUSE_IN": pause_in, "EDGEFLEET_TEST_PAUSE_MARKER": str(marker)})
    assert device.wait_serving().model_version == 1
    traffic = kit.Traffic(device.predict_url, kit.traffic_rows())  # trials judge live requests
    try:
        stack.assign(device.id, version)

        def paused() -> bool:
            assert device.alive(), device.log()
            # the hook writes the state's name into the marker, then blocks
            return marker.exists() and marker.read_text() != ""

        kit.wait_for(f"the agent to pause in {pause_in}", paused, 60)
        assert marker.read_text() == pause_in
        device.kill()  # the power cut
        record = device.record()
        assert record is not None and record.state.value == pause_in  # saved before its action
        traffic.errors.clear()  # requests refused while the device was off are not the point

        device.start()
        device.wait_serving()
        end = stack.wait_final(device.id, version)
        assert end["to_state"] == final, (end, device.log())
        kit.wait_for(
            f"traffic served by v{serving}", lambda: traffic.versions[-1:] == [serving], 20
        )
    finally:
        traffic.close()
    assert device.active_version() == serving
    assert device.predict(kit.traffic_rows(8)).model_version == serving
    record = device.record()
    assert record is not None and record.state.value == final
    assert device.alive(), device.log()
    kit.wait_for(
        f"the fleet to see the device run v{serving}",
        lambda: stack.updates(device.id)["current"]["running_version"] == serving,
        15,
        0.2,
    )
