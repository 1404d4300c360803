"""Rollout planning (pure): stage sizes for every target size, stable hash assignment that keeps
a canary a canary when devices join, and every (state, event) pair of the rollout table."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet.rollout_plan import (
    ACTIVE_STATES,
    DEFAULT_PERCENTS,
    TRANSITIONS,
    RolloutEvent,
    RolloutPlanError,
    RolloutState,
    RolloutTransitionError,
    advance_event,
    assign_stages,
    check_percents,
    device_fraction,
    failure_event,
    next_state,
    stage_for_late_device,
    stage_sizes,
)


@pytest.mark.parametrize("n", range(0, 1001))
def test_stage_sizes_cover_the_target_with_one_device_per_stage_first(n: int) -> None:
    sizes = stage_sizes(n, DEFAULT_PERCENTS)
    assert sum(sizes) == n
    assert all(s >= 0 for s in sizes)
    # every stage gets a device of its own while devices remain
    assert sizes == tuple(sorted(sizes, key=lambda s: s == 0))
    assert sum(1 for s in sizes if s > 0) == min(n, len(DEFAULT_PERCENTS))
    cumulative = list(itertools.accumulate(sizes))
    for i, p in enumerate(DEFAULT_PERCENTS):
        assert cumulative[i] >= min(n, -(-int(p * n) // 100))  # at least the percentage


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (1, (1, 0, 0, 0)),
        (3, (1, 1, 1, 0)),
        (4, (1, 1, 1, 1)),
        (100, (1, 9, 40, 50)),
        (1000, (10, 90, 400, 500)),
        (150, (2, 13, 60, 75)),
    ],
)
def test_stage_sizes_examples(n: int, expected: tuple[int, ...]) -> None:
    assert stage_sizes(n, DEFAULT_PERCENTS) == expected


@pytest.mark.parametrize(
    ("percents", "match"),
    [
        ((), "1 to 20"),
        ((10, 5, 100), "must grow"),
        ((10, 50), "reach 100"),
        ((0, 100), r"\(0, 100\]"),
        ((50, 150), r"\(0, 100\]"),
        ((float("nan"), 100), r"\(0, 100\]"),
    ],
)
def test_bad_stage_lists_are_refused(percents: tuple[float, ...], match: str) -> None:
    with pytest.raises(RolloutPlanError, match=match):
        check_percents(percents)


def test_the_hash_is_stable_and_depends_on_both_ids() -> None:
    # a fixed value: the stage of a device must never change between releases of edgefleet
    assert f"{device_fraction('ro-1', 'dev-1'):.12f}" == "0.863818456565"
    assert device_fraction("ro-1", "dev-1") != device_fraction("ro-2", "dev-1")
    assert device_fraction("ro-1", "dev-1") != device_fraction("ro-1", "dev-2")


@given(st.sets(st.text(min_size=1, max_size=12), max_size=60), st.text(max_size=8))
def test_assignment_follows_the_sizes_and_the_hash_order(ids: set[str], rollout: str) -> None:
    stages = assign_stages(rollout, ids, DEFAULT_PERCENTS)
    assert set(stages) == ids
    sizes = stage_sizes(len(ids), DEFAULT_PERCENTS)
    assert tuple(sum(1 for s in stages.values() if s == i) for i in range(4)) == sizes
    # lower hash, earlier (or same) stage
    ordered = sorted(ids, key=lambda d: (device_fraction(rollout, d), d))
    assert [stages[d] for d in ordered] == sorted(stages[d] for d in ordered)
    assert assign_stages(rollout, sorted(ids), DEFAULT_PERCENTS) == stages


def test_late_devices_go_by_their_own_hash_share() -> None:
    ids = [f"dev-{i}" for i in range(4000)]
    stages = [stage_for_late_device("ro-x", d, DEFAULT_PERCENTS) for d in ids]
    shares = [stages.count(i) / len(ids) for i in range(4)]
    assert shares[0] == pytest.approx(0.01, abs=0.006)
    assert shares[1] == pytest.approx(0.09, abs=0.02)
    assert shares[2] == pytest.approx(0.40, abs=0.03)
    assert shares[3] == pytest.approx(0.50, abs=0.03)


ALL_PAIRS = list(itertools.product(RolloutState, RolloutEvent))


@pytest.mark.parametrize(("state", "event"), ALL_PAIRS)
def test_every_state_event_pair(state: RolloutState, event: RolloutEvent) -> None:
    if (state, event) in TRANSITIONS:
        assert next_state(state, event) is TRANSITIONS[(state, event)]
    else:
        with pytest.raises(RolloutTransitionError, match=f"cannot take {event}"):
            next_state(state, event)


def test_ended_rollouts_accept_nothing_and_active_ones_can_be_aborted_or_finish() -> None:
    for state in (RolloutState.COMPLETED, RolloutState.ROLLED_BACK):
        assert state not in ACTIVE_STATES
        with pytest.raises(RolloutTransitionError, match="has ended"):
            next_state(state, RolloutEvent.RESUME)
    assert next_state(RolloutState.RUNNING, RolloutEvent.ABORT) is RolloutState.ROLLING_BACK
    assert next_state(RolloutState.PAUSED, RolloutEvent.ABORT) is RolloutState.ROLLING_BACK


def test_policy_and_advance_events() -> None:
    assert failure_event("pause") is RolloutEvent.GATE_FAILED_PAUSE
    assert failure_event("rollback") is RolloutEvent.GATE_FAILED_ROLLBACK
    with pytest.raises(RolloutPlanError, match="'pause' or 'rollback'"):
        failure_event("ignore")
    assert advance_event(0, 4) is RolloutEvent.PROMOTE
    assert advance_event(3, 4) is RolloutEvent.COMPLETE
