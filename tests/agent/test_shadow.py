"""The shadow step's decision and its tap (pure; the engine's shadow is in test_updater.py)."""

from __future__ import annotations

import numpy as np
import pytest

from agent.shadow import ShadowStats, ShadowTap, ShadowThresholds, describe, evaluate_shadow
from agent.trial import Continue, Fail, Pass

T = ShadowThresholds(samples=50, min_agreement=0.95, max_seconds=60.0)


@pytest.mark.parametrize(
    ("rows", "agreed", "elapsed", "outcome"),
    [
        (0, 0, 0.0, Continue),
        (49, 49, 10.0, Continue),  # not enough rows yet, time left
        (50, 48, 1.0, Pass),  # 0.96
        (50, 47, 1.0, Fail),  # 0.94 < 0.95
        (50, 50, 1.0, Pass),
        (49, 49, 60.0, Fail),  # out of time with too few rows: fail closed
        (0, 0, 60.0, Fail),
        (50, 48, 600.0, Pass),  # enough rows decides whatever the time
    ],
)
def test_decision(rows: int, agreed: int, elapsed: float, outcome: type) -> None:
    assert isinstance(evaluate_shadow(ShadowStats(rows, agreed, 0.2, 0.1), T, elapsed), outcome)


def test_reasons_name_the_figures_and_the_threshold() -> None:
    refused = evaluate_shadow(ShadowStats(50, 6, 0.021, 0.025), T, 1.0)
    assert isinstance(refused, Fail)
    assert refused.reason == (
        "agreement with the active model 0.120 (6 of 50 live rows) is below the release's "
        "min_shadow_agreement 0.95; single-row latency candidate 0.021 ms vs active 0.025 ms "
        "(0.84x)"
    )
    idle = evaluate_shadow(ShadowStats(3, 3), T, 61.0)
    assert isinstance(idle, Fail) and idle.reason.startswith("only 3 of 50 live rows in 61 s")
    assert "fail closed" in idle.reason
    passed = evaluate_shadow(ShadowStats(50, 50, 0.2, 0.1), T, 1.0)
    assert isinstance(passed, Pass)
    assert passed.note == describe(ShadowStats(50, 50, 0.2, 0.1))
    assert passed.note.startswith("agreement 1.000 (50 of 50 live rows); single-row latency")
    assert "(2.00x)" in passed.note


def test_tap_is_bounded_copies_and_drains() -> None:
    tap = ShadowTap(n_features=3, capacity=4)
    assert tap.drain() is None
    x = np.arange(9, dtype=np.float32).reshape(3, 3)
    tap.add(x, np.array([0, 1, 2]))
    x[:] = -1  # the service reuses its block: the tap kept a copy
    tap.add(np.ones((3, 3), np.float32), np.array([5, 5, 5]))  # only one row fits
    assert tap.dropped == 2
    drained = tap.drain()
    assert drained is not None
    rows, served = drained
    assert rows.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [1, 1, 1]]
    assert served.tolist() == [0, 1, 2, 5]
    assert tap.drain() is None
    tap.want(1)  # the engine needs one more row only
    tap.add(np.zeros((2, 3), np.float32), np.array([1, 1]))
    drained = tap.drain()
    assert drained is not None and len(drained[0]) == 1 and tap.dropped == 3
    with pytest.raises(ValueError, match="at least one row"):
        ShadowTap(3, 0)
