"""The update state machine's pure rules: every (state, event) pair, the record, recover()."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.update_states import (
    LIVE,
    MAX_ATTEMPTS,
    TERMINAL,
    TRANSITIONS,
    Baseline,
    FatalUpdateError,
    IllegalTransition,
    Installed,
    RecoveryKind,
    Refusal,
    TargetRef,
    TransientUpdateError,
    UpdateEvent,
    UpdateRecord,
    UpdateState,
    check_artifact,
    check_version,
    next_state,
    recover,
)

S, E = UpdateState, UpdateEvent

# the happy path and every exit, as DESIGN.md draws them
EXPECTED = {
    (S.IDLE, E.ACCEPTED): S.DOWNLOADING,
    (S.DOWNLOADING, E.DOWNLOADED): S.VERIFYING,
    (S.VERIFYING, E.VERIFIED): S.INSTALLING,
    (S.INSTALLING, E.INSTALLED): S.HEALTH_CHECK,
    (S.HEALTH_CHECK, E.HEALTHY): S.ACTIVATING,
    (S.HEALTH_CHECK, E.HEALTHY_SHADOW): S.SHADOW,  # the release asks for a shadow run
    (S.SHADOW, E.SHADOWED): S.ACTIVATING,
    (S.SHADOW, E.FAIL): S.FAILED,  # the candidate never served: refusing it is enough
    (S.ACTIVATING, E.ACTIVATED): S.TRIAL,
    (S.TRIAL, E.TRIAL_PASSED): S.COMMITTED,
    (S.HEALTH_CHECK, E.ROLL_BACK): S.ROLLING_BACK,
    (S.ACTIVATING, E.ROLL_BACK): S.ROLLING_BACK,
    (S.TRIAL, E.ROLL_BACK): S.ROLLING_BACK,
    (S.ROLLING_BACK, E.ROLLED_BACK): S.ROLLED_BACK,
    **{(s, E.FAIL): S.FAILED for s in (S.IDLE, S.DOWNLOADING, S.VERIFYING, S.INSTALLING)},
    (S.HEALTH_CHECK, E.FAIL): S.FAILED,
    (S.ROLLING_BACK, E.FAIL): S.FAILED,
}


def record(state: UpdateState = S.IDLE, attempt: int = 1) -> UpdateRecord:
    return UpdateRecord(
        update_id=7,
        model="pdm-classifier",
        version=2,
        rollback=False,
        serial=11,
        target_path="pdm-classifier/2/model.int8.onnx",
        state=state,
        started_at=1000.0,
        entered_at=1000.0,
        attempt=attempt,
    )


@pytest.mark.parametrize(("state", "event"), list(itertools.product(S, E)))
def test_every_pair(state: UpdateState, event: UpdateEvent) -> None:
    if (state, event) in EXPECTED:
        assert next_state(state, event) is EXPECTED[(state, event)]
    else:
        with pytest.raises(IllegalTransition, match=f"from {state.value}"):
            next_state(state, event)


def test_table_is_exactly_the_design() -> None:
    assert dict(TRANSITIONS) == EXPECTED


def test_finished_states_have_no_way_out_and_live_states_cannot_fail() -> None:
    for s in (S.COMMITTED, S.ROLLED_BACK, S.FAILED):
        assert not [e for (f, e) in TRANSITIONS if f == s]
    for s in (S.ACTIVATING, S.TRIAL):
        with pytest.raises(IllegalTransition):
            next_state(s, E.FAIL)


def test_shadow_is_not_live_and_cannot_roll_back() -> None:
    assert S.SHADOW not in LIVE and S.SHADOW not in TERMINAL
    with pytest.raises(IllegalTransition, match="from shadow only fail, shadowed"):
        next_state(S.SHADOW, E.ROLL_BACK)
    # the shadow only ever comes after a passed health check
    assert [f for (f, _), to in TRANSITIONS.items() if to is S.SHADOW] == [S.HEALTH_CHECK]


def test_every_state_reaches_a_final_state() -> None:
    final = {S.COMMITTED, S.ROLLED_BACK, S.FAILED}
    for start in S:
        seen, todo = set(), [start]
        while todo:
            s = todo.pop()
            seen.add(s)
            todo += [t for (f, _), t in TRANSITIONS.items() if f == s and t not in seen]
        assert seen & final or start in final, start


@given(st.lists(st.sampled_from(list(E)), max_size=12), st.floats(0, 100))
def test_walks_follow_the_table_and_add_up_time(events: list[UpdateEvent], step: float) -> None:
    r = record()
    now = r.entered_at
    for event in events:
        now += step
        if (r.state, event) not in TRANSITIONS:
            with pytest.raises(IllegalTransition):
                r.moved(event, now)
            continue
        before = r
        r = r.moved(event, now, reason="why" if event is E.FAIL else "")
        assert r.state is TRANSITIONS[(before.state, event)]
        assert r.entered_at == now
        assert sum(r.elapsed.values()) == pytest.approx(now - record().entered_at)
    assert UpdateRecord.from_json(r.to_json()) == r


def test_record_round_trip_with_everything() -> None:
    r = record(S.TRIAL)
    full = UpdateRecord(
        **{
            **r.__dict__,
            "files": (TargetRef("m/2/a.onnx", 10, "ab" * 32),),
            "from_slot": "a",
            "to_slot": "b",
            "baseline": Baseline(40, 1, 0.002),
            "rollout_id": "r1",
            "custom_json": '{"x":1}',
            "elapsed": {"downloading": 1.5},
        }
    )
    assert UpdateRecord.from_json(full.to_json()) == full


def test_unreadable_record_says_what_to_do() -> None:
    with pytest.raises(ValueError, match="unreadable"):
        UpdateRecord.from_json('{"state": "flying"}')


@pytest.mark.parametrize(
    ("state", "kind", "resume"),
    [
        (S.IDLE, RecoveryKind.NOTHING, None),
        (S.COMMITTED, RecoveryKind.NOTHING, None),
        (S.ROLLED_BACK, RecoveryKind.NOTHING, None),
        (S.FAILED, RecoveryKind.NOTHING, None),
        (S.DOWNLOADING, RecoveryKind.RESUME, S.DOWNLOADING),
        (S.VERIFYING, RecoveryKind.RESUME, S.VERIFYING),
        (S.INSTALLING, RecoveryKind.RESUME, S.VERIFYING),
        (S.HEALTH_CHECK, RecoveryKind.RESUME, S.HEALTH_CHECK),
        (S.SHADOW, RecoveryKind.RESUME, S.SHADOW),  # redo the shadow from zero
        (S.ACTIVATING, RecoveryKind.RESUME, S.ACTIVATING),
        (S.TRIAL, RecoveryKind.RESUME, S.TRIAL),
        (S.ROLLING_BACK, RecoveryKind.RESUME, S.ROLLING_BACK),
    ],
)
def test_recover(state: UpdateState, kind: RecoveryKind, resume: UpdateState | None) -> None:
    action = recover(record(state, attempt=2))
    assert (action.kind, action.state) == (kind, resume)


@pytest.mark.parametrize("state", list(S))
def test_loop_counter(state: UpdateState) -> None:
    action = recover(record(state, attempt=MAX_ATTEMPTS + 1))
    if state in TERMINAL:
        assert action.kind is RecoveryKind.NOTHING
    elif state is S.ROLLING_BACK:
        assert action.kind is RecoveryKind.RESUME
    elif state in LIVE:
        assert action.kind is RecoveryKind.ROLL_BACK
        assert "restarted" in action.reason
    else:
        assert action.kind is RecoveryKind.FAIL
        assert "restarted" in action.reason
    # the action is always a legal move from the saved state
    if action.kind is RecoveryKind.ROLL_BACK:
        next_state(state, E.ROLL_BACK)
    if action.kind is RecoveryKind.FAIL:
        next_state(state, E.FAIL)


def test_no_record_nothing_to_do() -> None:
    assert recover(None).kind is RecoveryKind.NOTHING


def test_errors_split() -> None:
    assert TransientUpdateError("network", "x").transient
    assert not FatalUpdateError("bad_signature", "x").transient
    assert FatalUpdateError("bad_signature", "x").reason == "bad_signature"


@pytest.mark.parametrize(
    ("version", "rollback", "installed", "outcome"),
    [
        (2, False, None, True),  # first model: anything signed
        (1, True, None, True),
        (3, False, Installed("pdm-classifier", 2), True),
        (2, False, Installed("pdm-classifier", 2), False),  # already there
        (2, True, Installed("pdm-classifier", 2), False),
        (1, False, Installed("pdm-classifier", 2), Refusal.DOWNGRADE),
        (1, True, Installed("pdm-classifier", 2), True),  # a signed rollback
        (3, True, Installed("pdm-classifier", 2), Refusal.ROLLBACK_NOT_OLDER),
        (3, False, Installed("other", 2), Refusal.WRONG_MODEL),
    ],
)
def test_version_rule(
    version: int, rollback: bool, installed: Installed | None, outcome: bool | Refusal
) -> None:
    if isinstance(outcome, Refusal):
        with pytest.raises(FatalUpdateError) as info:
            check_version("pdm-classifier", version, rollback, installed)
        assert info.value.reason == outcome
    else:
        assert check_version("pdm-classifier", version, rollback, installed) is outcome


GOOD = {
    "target_model": "m",
    "target_version": 2,
    "profiles": (),
    "runtime": "onnxruntime",
    "length": 100,
}


@pytest.mark.parametrize(
    ("change", "refusal"),
    [
        ({}, None),
        ({"profiles": ("x86_64-gateway",)}, None),
        ({"target_version": 3}, Refusal.MIX_AND_MATCH),
        ({"target_model": "n"}, Refusal.MIX_AND_MATCH),
        ({"profiles": ("rpi3-armv7l",)}, Refusal.WRONG_PROFILE),
        ({"runtime": "tensorrt"}, Refusal.RUNTIME_UNAVAILABLE),
        ({"length": 1001}, Refusal.TOO_LARGE),
    ],
)
def test_artifact_rule(change: dict[str, object], refusal: Refusal | None) -> None:
    kwargs = {**GOOD, **change}

    def run() -> None:
        check_artifact(
            "m",
            2,
            profile_name="x86_64-gateway",
            profile_runtimes=("onnxruntime", "litert"),
            max_bytes=1000,
            **kwargs,  # type: ignore[arg-type]
        )

    if refusal is None:
        run()
    else:
        with pytest.raises(FatalUpdateError) as info:
            run()
        assert info.value.reason == refusal
