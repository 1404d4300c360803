"""Rollout planning, pure: which stage each device is in, how big each stage is, and the
rollout's state machine as one table.

* **Stage sizes** (:func:`stage_sizes`): stages are cumulative percentages of the target
  (default 1 → 10 → 50 → 100); stage ``i`` covers ``ceil(p_i * n / 100)`` devices in all, and
  never fewer than ``i + 1`` so every stage gets at least one device of its own while devices
  remain (with fewer devices than stages the last stages are empty). The last stage is 100 %.
* **Stage assignment** (:func:`assign_stages`): devices are ranked by a stable hash of
  ``(rollout id, device id)`` (:func:`device_fraction`); the first ``sizes[0]`` are the canaries,
  and so on. A device that joins the target later (:func:`stage_for_late_device`) goes to the
  first stage whose cumulative share exceeds its own hash fraction, so joining never moves a
  device that was already placed: a canary stays the canary.
* **State machine** (:data:`TRANSITIONS`, :func:`next_state`): one row per (state, event); a
  pair not in the table is refused with :class:`RolloutTransitionError` saying what is allowed.

This module does no I/O and knows no database, clock or HTTP; the controller
(:mod:`fleet.rollouts`) stores what it returns.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum

from fleet.errors import ConflictError, InvalidInputError

DEFAULT_PERCENTS: tuple[float, ...] = (1.0, 10.0, 50.0, 100.0)
MAX_STAGES = 20


class RolloutPlanError(InvalidInputError):
    """A stage list that cannot be a rollout plan (HTTP 422)."""


class RolloutTransitionError(ConflictError):
    """An event that the rollout's current state does not accept (HTTP 409)."""


class RolloutState(StrEnum):
    RUNNING = "running"  # the current stage's devices are assigned; gates are watched
    PAUSED = "paused"  # nothing is assigned or judged until an operator resumes or aborts
    ROLLING_BACK = "rolling_back"  # signed rollbacks issued; waiting for devices to report
    ROLLED_BACK = "rolled_back"  # terminal: every device of the rollout is back (or stuck)
    COMPLETED = "completed"  # terminal: the last stage passed its gates


ACTIVE_STATES: frozenset[RolloutState] = frozenset(
    {RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.ROLLING_BACK}
)


class RolloutEvent(StrEnum):
    PROMOTE = "promote"  # gates passed after the soak (or an operator said so): next stage
    COMPLETE = "complete"  # the same, on the last stage
    GATE_FAILED_PAUSE = "gate_failed_pause"  # a gate failed, policy `pause`
    GATE_FAILED_ROLLBACK = "gate_failed_rollback"  # a gate failed, policy `rollback`
    PAUSE = "pause"  # operator
    RESUME = "resume"  # operator
    ABORT = "abort"  # operator: roll back every device of the rollout
    ROLLBACK_DONE = "rollback_done"  # every rolled-back device reported (or timed out)


S, E = RolloutState, RolloutEvent

TRANSITIONS: Mapping[tuple[RolloutState, RolloutEvent], RolloutState] = {
    (S.RUNNING, E.PROMOTE): S.RUNNING,
    (S.RUNNING, E.COMPLETE): S.COMPLETED,
    (S.RUNNING, E.GATE_FAILED_PAUSE): S.PAUSED,
    (S.RUNNING, E.GATE_FAILED_ROLLBACK): S.ROLLING_BACK,
    (S.RUNNING, E.PAUSE): S.PAUSED,
    (S.RUNNING, E.ABORT): S.ROLLING_BACK,
    (S.PAUSED, E.RESUME): S.RUNNING,
    # an operator's "promote now" on a paused rollout promotes and runs again
    (S.PAUSED, E.PROMOTE): S.RUNNING,
    (S.PAUSED, E.COMPLETE): S.COMPLETED,
    (S.PAUSED, E.ABORT): S.ROLLING_BACK,
    (S.ROLLING_BACK, E.ROLLBACK_DONE): S.ROLLED_BACK,
}


def allowed_events(state: RolloutState) -> tuple[RolloutEvent, ...]:
    return tuple(e for (s, e) in TRANSITIONS if s is state)


def next_state(state: RolloutState, event: RolloutEvent) -> RolloutState:
    """The state after ``event``, or :class:`RolloutTransitionError` naming what is allowed."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        allowed = ", ".join(allowed_events(state)) or "nothing (the rollout has ended)"
        raise RolloutTransitionError(
            f"a {state} rollout cannot take {event}; it accepts: {allowed}"
        ) from None


def advance_event(stage: int, stage_count: int) -> RolloutEvent:
    """What passing stage ``stage`` means: the next stage, or the end of the rollout."""
    return RolloutEvent.COMPLETE if stage + 1 >= stage_count else RolloutEvent.PROMOTE


def failure_event(policy: str) -> RolloutEvent:
    """The event a failing gate becomes under the rollout's policy (``pause``/``rollback``)."""
    if policy == "pause":
        return RolloutEvent.GATE_FAILED_PAUSE
    if policy == "rollback":
        return RolloutEvent.GATE_FAILED_ROLLBACK
    raise RolloutPlanError(f"unknown failure policy {policy!r}; use 'pause' or 'rollback'")


# --- stages -----------------------------------------------------------------------------------


def check_percents(percents: Sequence[float]) -> tuple[float, ...]:
    """The stage percentages, validated: 1 to 20 stages, strictly growing, ending at 100."""
    stages = tuple(float(p) for p in percents)
    if not 1 <= len(stages) <= MAX_STAGES:
        raise RolloutPlanError(f"a rollout has 1 to {MAX_STAGES} stages, not {len(stages)}")
    if any(not (0 < p <= 100) or math.isnan(p) for p in stages):
        raise RolloutPlanError(f"stage percentages must be in (0, 100]; got {list(stages)}")
    if any(b <= a for a, b in zip(stages, stages[1:], strict=False)):
        raise RolloutPlanError(
            f"stage percentages are cumulative and must grow: {list(stages)} (e.g. 1, 10, 50, 100)"
        )
    if stages[-1] != 100:
        raise RolloutPlanError(
            f"the last stage must reach 100% of the target, not {stages[-1]:g}%; add a 100 stage"
        )
    return stages


def stage_sizes(n: int, percents: Sequence[float]) -> tuple[int, ...]:
    """How many devices each stage adds (not cumulative), for ``n`` devices in the target.

    Cumulative size ``c_i = min(n, max(ceil(p_i n / 100), c_{i-1} + 1))``: at least one device
    per stage while devices remain; the sizes sum to ``n``.
    """
    if n < 0:
        raise RolloutPlanError(f"a target cannot have {n} devices")
    stages = check_percents(percents)
    sizes: list[int] = []
    done = 0
    for i, p in enumerate(stages):
        # round the product first: 7% of 100 is 7.000000000000001 in floating point
        wanted = math.ceil(round(p * n / 100.0, 9))
        cumulative = n if i == len(stages) - 1 else min(n, max(wanted, done + 1))
        sizes.append(cumulative - done)
        done = cumulative
    return tuple(sizes)


def device_fraction(rollout_id: str, device_id: str) -> float:
    """A stable number in [0, 1) for the pair: the first 8 bytes of SHA-256 over both ids."""
    digest = hashlib.sha256(f"{rollout_id}\x00{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_stages(
    rollout_id: str, device_ids: Iterable[str], percents: Sequence[float]
) -> dict[str, int]:
    """Every device's stage index: ranked by :func:`device_fraction`, cut by :func:`stage_sizes`."""
    ranked = sorted(set(device_ids), key=lambda d: (device_fraction(rollout_id, d), d))
    stages: dict[str, int] = {}
    start = 0
    for stage, size in enumerate(stage_sizes(len(ranked), percents)):
        for device in ranked[start : start + size]:
            stages[device] = stage
        start += size
    return stages


def stage_for_late_device(rollout_id: str, device_id: str, percents: Sequence[float]) -> int:
    """The stage of a device that joined the target after the rollout was planned: the first
    stage whose cumulative share is above the device's hash fraction."""
    stages = check_percents(percents)
    u = device_fraction(rollout_id, device_id) * 100.0
    return next(i for i, p in enumerate(stages) if u < p or i == len(stages) - 1)
