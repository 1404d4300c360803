"""The trial decision: error rate, latency against the previous model, output drift, soak."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.trial import (
    Continue,
    Fail,
    Pass,
    TrialStats,
    TrialThresholds,
    evaluate_trial,
    js_distance,
)

T = TrialThresholds(
    soak_seconds=30, min_requests=20, max_error_rate=0.01, max_latency_ratio=2.0, max_seconds=600
)
PREV = TrialStats(requests=500, errors=0, p95_seconds=0.002)


def test_continue_during_soak_then_pass() -> None:
    new = TrialStats(50, 0, 0.002)
    assert evaluate_trial(new, PREV, T, elapsed=10) == Continue()
    assert evaluate_trial(new, PREV, T, elapsed=30) == Pass()


def test_error_rate_fails_at_once() -> None:
    decision = evaluate_trial(TrialStats(98, 2, 0.002), PREV, T, elapsed=1)
    assert isinstance(decision, Fail)
    assert "error rate 0.020" in decision.reason


def test_errors_with_no_success_fail() -> None:
    assert isinstance(evaluate_trial(TrialStats(0, 3, None), PREV, T, elapsed=1), Fail)


def test_latency_ratio() -> None:
    slow = TrialStats(50, 0, 0.0041)
    decision = evaluate_trial(slow, PREV, T, elapsed=1)
    assert isinstance(decision, Fail) and "2.05x" in decision.reason
    # too few requests on either side decide nothing yet
    assert evaluate_trial(TrialStats(5, 0, 0.01), PREV, T, elapsed=1) == Continue()
    assert evaluate_trial(slow, TrialStats(3, 0, 0.001), T, elapsed=1) == Continue()
    # no previous model: no ratio
    assert evaluate_trial(slow, None, T, elapsed=31) == Pass()


def test_output_drift_against_previous_on_same_inputs() -> None:
    new = TrialStats(50, 0, 0.002)
    same = evaluate_trial(new, PREV, T, 31, (10, 10, 10, 10, 10), (11, 9, 10, 10, 10))
    assert same == Pass()
    collapsed = evaluate_trial(new, PREV, T, 1, (50, 0, 0, 0, 0), (10, 10, 10, 10, 10))
    assert isinstance(collapsed, Fail) and "JS distance" in collapsed.reason


def test_little_traffic_waits_then_passes_saying_so() -> None:
    few = TrialStats(3, 0, 0.002)
    assert evaluate_trial(few, PREV, T, elapsed=100) == Continue()
    decision = evaluate_trial(few, PREV, T, elapsed=600)
    assert isinstance(decision, Pass) and "too little traffic" in decision.note


@given(st.lists(st.integers(0, 1000), min_size=2, max_size=8))
def test_js_distance_bounds(counts: list[int]) -> None:
    assert js_distance(counts, counts) == pytest.approx(0.0, abs=1e-6)
    other = list(reversed(counts))
    d = js_distance(counts, other)
    assert 0.0 <= d <= 1.0 + 1e-9
    assert d == pytest.approx(js_distance(other, counts))


def test_js_distance_disjoint_is_one() -> None:
    assert js_distance([5, 0], [0, 7]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="length"):
        js_distance([1], [1, 2])
