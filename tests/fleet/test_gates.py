"""Rollout gates (pure): each gate's pass / fail / wait / skip with its reason, stuck devices
counted as failures, drift bounds that depend on sample size, and the stage decision (fail at
once, soak, max wait)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.gates import (
    Action,
    DeviceProgress,
    DriftInput,
    GateConfig,
    GateConfigError,
    LatencyInput,
    Outcome,
    StageInputs,
    Status,
    drift_gate,
    evaluate,
    latency_gate,
    reporting_gate,
    trial_gate,
    updates_gate,
)

CFG = GateConfig(stuck_timeout_s=600)
NOW = 10_000.0


def dev(i: int, outcome: Outcome, assigned: float | None = NOW - 60, last: float | None = None):
    return DeviceProgress(f"d{i}", 0, outcome, assigned, last)


@pytest.mark.parametrize(
    ("outcomes", "status", "words"),
    [
        ((), Status.SKIP, "no devices"),
        ((Outcome.COMMITTED,) * 20, Status.PASS, "20 of 20 committed"),
        ((Outcome.COMMITTED,) * 19 + (Outcome.FAILED,), Status.PASS, "19 of 20"),
        ((Outcome.COMMITTED,) * 18 + (Outcome.FAILED,) * 2, Status.FAIL, "below 95%"),
        ((Outcome.COMMITTED,) * 18 + (Outcome.ROLLED_BACK,) * 2, Status.FAIL, "d18, d19"),
        ((Outcome.COMMITTED,) * 10 + (Outcome.UPDATING,) * 10, Status.WAIT, "10 still updating"),
        ((Outcome.FAILED,) + (Outcome.PENDING,) * 3, Status.FAIL, "at most 75%"),
    ],
)
def test_updates_gate(outcomes: tuple[Outcome, ...], status: Status, words: str) -> None:
    got = updates_gate(CFG, tuple(dev(i, o) for i, o in enumerate(outcomes)), NOW)
    assert got.status is status
    assert words in got.reason


def test_max_failures_is_an_absolute_cap() -> None:
    cfg = GateConfig(min_success_rate=0.0, max_failures=1)
    devices = tuple(dev(i, Outcome.FAILED if i < 2 else Outcome.COMMITTED) for i in range(100))
    got = updates_gate(cfg, devices, NOW)
    assert got.status is Status.FAIL and "more than the 1 allowed" in got.reason


def test_a_silent_device_is_stuck_after_the_timeout_and_counts_as_failed() -> None:
    fresh = dev(1, Outcome.UPDATING, assigned=NOW - 700, last=NOW - 100)
    silent = dev(2, Outcome.PENDING, assigned=NOW - 700)
    assert not fresh.stuck(NOW, 600) and silent.stuck(NOW, 600)
    assert not dev(3, Outcome.PENDING, assigned=None).stuck(NOW, 600)  # stage not started
    got = updates_gate(CFG, (fresh, silent), NOW)
    assert got.status is Status.FAIL and "d2 (stuck)" in got.reason


def test_trial_gate() -> None:
    assert trial_gate(CFG, ()).status is Status.PASS
    got = trial_gate(CFG, ("d7",))
    assert got.status is Status.FAIL and "d7" in got.reason and "on their own" in got.reason
    assert trial_gate(GateConfig(max_trial_failures=1), ("d7",)).status is Status.PASS


@pytest.mark.parametrize(
    ("new", "old", "control", "status"),
    [
        ((10.0, 11.0, 12.0), (10.0, 10.0, 10.0), 5, Status.PASS),
        ((16.0, 16.0, 17.0), (10.0, 10.0, 10.0), 5, Status.FAIL),
        ((10.0, 11.0), (10.0, 10.0, 10.0), 5, Status.WAIT),
        ((10.0, 11.0, 12.0), (), 0, Status.SKIP),
        ((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), 3, Status.FAIL),
    ],
)
def test_latency_gate(new: tuple, old: tuple, control: int, status: Status) -> None:
    got = latency_gate(CFG, LatencyInput(new, old, control))
    assert got.status is status, got.reason


@given(
    st.lists(st.floats(0.1, 1000), min_size=3, max_size=20),
    st.floats(1.0, 3.0),
)
def test_latency_ratio_property(old: list[float], factor: float) -> None:
    new = tuple(x * factor for x in old)
    got = latency_gate(CFG, LatencyInput(new, tuple(old), 3))
    assert got.value == pytest.approx(factor)
    assert (got.status is Status.FAIL) == (got.value is not None and got.value > 1.5)


def _sample(rng: np.random.Generator, p: np.ndarray, n: int) -> tuple[int, ...]:
    return tuple(int(x) for x in rng.multinomial(n, p))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([1000, 5000, 50_000]))
def test_drift_gate_passes_identical_distributions_at_any_size(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    p = np.array([0.7, 0.2, 0.1])
    got = drift_gate(
        CFG, DriftInput(_sample(rng, p, n), _sample(rng, p, n), n, n, control_devices=3)
    )
    assert got.status is Status.PASS, got.reason


def test_drift_gate_fails_a_shifted_output_and_waits_for_data() -> None:
    rng = np.random.default_rng(1)
    canary = _sample(rng, np.array([0.4, 0.4, 0.2]), 3000)
    control = _sample(rng, np.array([0.7, 0.2, 0.1]), 3000)
    got = drift_gate(CFG, DriftInput(canary, control, 3000, 3000, control_devices=3))
    assert got.status is Status.FAIL and "output classes PSI" in got.reason
    small = drift_gate(CFG, DriftInput(canary, control, 3000, 500, control_devices=3))
    assert small.status is Status.WAIT and "not enough data yet" in small.reason
    assert drift_gate(CFG, DriftInput(canary, (), 3000, 0)).status is Status.SKIP


def test_drift_gate_pads_new_classes_and_judges_features_when_shared() -> None:
    got = drift_gate(CFG, DriftInput((900, 100, 1), (900, 100), 1001, 1000, 2))
    assert got.status is Status.PASS
    rng = np.random.default_rng(2)
    same = np.full(10, 0.1)
    shifted = np.linspace(0.01, 0.19, 10)
    shifted /= shifted.sum()
    classes = _sample(rng, np.array([0.5, 0.5]), 4000)
    features = tuple((_sample(rng, shifted, 4000), _sample(rng, same, 4000)) for _ in range(2)) + (
        (_sample(rng, same, 4000), _sample(rng, same, 4000)),
    )
    got = drift_gate(
        CFG,
        DriftInput(classes, classes, 4000, 4000, 2, features, ("a", "b", "c")),
    )
    assert got.status is Status.FAIL and "2 of 3 input features drifted (a, b)" in got.reason


def test_reporting_gate_is_optional() -> None:
    assert reporting_gate(CFG, ()) is None
    cfg = GateConfig(min_reporting=2)
    devices = (dev(1, Outcome.UPDATING, last=NOW), dev(2, Outcome.PENDING))
    assert reporting_gate(cfg, devices).status is Status.WAIT  # type: ignore[union-attr]
    devices = (dev(1, Outcome.UPDATING, last=NOW),)
    assert reporting_gate(cfg, devices).status is Status.PASS  # type: ignore[union-attr]


def _inputs(devices: tuple[DeviceProgress, ...], started: float, **kw: object) -> StageInputs:
    return StageInputs(0, started, 300.0, 3600.0, devices, **kw)  # type: ignore[arg-type]


def test_decision_fails_at_once_soaks_then_passes() -> None:
    ok = (dev(1, Outcome.COMMITTED),)
    failed = (dev(1, Outcome.FAILED),)
    assert evaluate(CFG, _inputs(failed, NOW - 10), NOW).action is Action.FAIL
    soaking = evaluate(CFG, _inputs(ok, NOW - 10), NOW)
    assert soaking.action is Action.WAIT and "soaking, 290s left" in soaking.reason
    done = evaluate(CFG, _inputs(ok, NOW - 300), NOW)
    assert done.action is Action.PASS
    assert {v.gate: v.status for v in done.verdicts} == {
        "updates": Status.PASS,
        "trial": Status.PASS,
        "latency": Status.SKIP,
        "drift": Status.SKIP,
    }


def test_not_enough_data_waits_up_to_max_wait_then_fails() -> None:
    ok = (dev(1, Outcome.COMMITTED),)
    lat = LatencyInput((10.0,), (10.0,), control_devices=5)
    waiting = evaluate(CFG, _inputs(ok, NOW - 400, latency=lat), NOW)
    assert waiting.action is Action.WAIT and "latency: not enough data" in waiting.reason
    over = evaluate(CFG, _inputs(ok, NOW - 3600, latency=lat), NOW)
    assert over.action is Action.FAIL and "max wait" in over.reason


@pytest.mark.parametrize(
    "bad",
    [
        {"min_success_rate": 1.5},
        {"max_failures": -1},
        {"latency_ratio": 0.5},
        {"drift_alpha": 0.0},
        {"min_drift_n": 0},
        {"stuck_timeout_s": 0},
    ],
)
def test_bad_thresholds_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(GateConfigError, match="invalid gate thresholds"):
        GateConfig(**bad)  # type: ignore[arg-type]
