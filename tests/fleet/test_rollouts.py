"""The rollout controller on a real SQLite file: releases v1/v2 published with real keys,
devices in the registry, their reports written through the ingestion path, a fake clock passed
to every step. A good release goes through every stage; a canary failing its trial gets the
whole rollout rolled back (signed rollbacks to v1 for every device that took v2); canaries
whose outputs shift are stopped by the drift gate before the next stage; stuck devices and
missing data end in the policy; late joiners are included; a crash between assigning and
recording is recovered."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

import pytest
from sqlite_utils import Database

from fleet.audit import Actor
from fleet.desired_state import DesiredStateService
from fleet.errors import ConflictError
from fleet.gates import GateConfig
from fleet.registry import ModelRegistry
from fleet.rollout_plan import RolloutState, RolloutTransitionError
from fleet.rollouts import (
    ActiveRolloutExistsError,
    RolloutService,
    RolloutSpec,
    StageSpec,
    Target,
    controller_tick,
)
from fleet.settings import FleetSettings, load_settings
from fleet.store import Store, connect


def _helpers() -> ModuleType:
    name = "rollout_fleet"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


H = _helpers()
T0 = datetime(2030, 1, 2, 3, 0, 0, tzinfo=UTC)
OP = Actor("token:op", "alice")
SAME = (0.5, 0.2, 0.15, 0.1, 0.05)
SHIFTED = (0.3, 0.2, 0.2, 0.15, 0.15)
GATES = GateConfig(min_latency_samples=2, min_drift_n=400, stuck_timeout_s=900)
STAGES = tuple(StageSpec(p, soak_s=300, max_wait_s=3600) for p in (10, 50, 100))


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def step(self, seconds: float = 60) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir with keys, repository and releases v1, v2 (built once, copied per test)."""
    root = tmp_path_factory.mktemp("template")
    settings = load_settings(data_dir=root / "data", public_base_url="http://fleet.test")
    H.publish_releases(settings, T0 - timedelta(days=1), root)
    return root / "data"


@pytest.fixture
def settings(template: Path, tmp_path: Path) -> FleetSettings:
    import shutil

    shutil.copytree(template, tmp_path / "data")
    return load_settings(data_dir=tmp_path / "data", public_base_url="http://fleet.test")


@pytest.fixture
def db(settings: FleetSettings) -> Iterator[Database]:
    with closing(connect(settings.db_path)) as conn:
        yield conn


class World:
    """Twenty devices on v1, their reports, the rollout service and a clock."""

    def __init__(self, db: Database, settings: FleetSettings, n: int = 20) -> None:
        self.db, self.settings, self.clock = db, settings, Clock()
        self.reports = H.Reports(db, settings)
        self.devices = [f"dev-{i:02d}" for i in range(n)]
        for d in self.devices:
            self.join(d)
        self.service = RolloutService(db, settings)

    def join(self, device: str) -> None:
        H.add_device(self.db, device, self.clock.now)
        self.reports.state(device, 1, self.clock.now)

    def create(self, **kw: object) -> str:
        spec = RolloutSpec(H.MODEL, 2, stages=STAGES, gates=GATES, **kw)  # type: ignore[arg-type]
        return self.service.create(spec, OP, self.clock.now).id

    def assigned(self, rollout_id: str, version: int = 2, rollback: bool = False) -> set[str]:
        return {
            r[0]
            for r in self.db.execute(
                "SELECT device_id FROM assignments WHERE rollout_id = ? AND version = ? "
                "AND rollback = ?",
                [rollout_id, version, int(rollback)],
            )
        }

    def tick(self, rollout_id: str, seconds: float = 60) -> RolloutState:
        now = self.clock.step(seconds)
        return self.service.tick(rollout_id, now).state

    def report_window(self, rollout_id: str, canary: tuple[float, ...] = SAME, p95: float = 10.0):
        """One minute of reports: updated devices on v2, the others on v1."""
        now = self.clock.now
        on_new = self.committed(rollout_id)
        for d in self.devices:
            version = 2 if d in on_new else 1
            self.reports.heartbeat(d, version, p95 if version == 2 else 10.0, now)
            self.reports.drift(d, version, canary if version == 2 else SAME, 200, now)

    def committed(self, rollout_id: str) -> set[str]:
        return {
            r[0]
            for r in self.db.execute(
                "SELECT device_id FROM update_events WHERE to_state = 'committed' "
                "AND release_version = 2 AND rollback = 0"
            )
        }

    def commit_new(self, rollout_id: str) -> set[str]:
        fresh = self.assigned(rollout_id) - self.committed(rollout_id)
        for d in sorted(fresh):
            self.reports.update(d, 2, "committed", self.clock.now)
        return fresh

    def stage_of(self, rollout_id: str) -> dict[str, int]:
        return dict(
            self.db.execute(
                "SELECT device_id, stage FROM rollout_devices WHERE rollout_id = ?", [rollout_id]
            ).fetchall()
        )


@pytest.fixture
def world(db: Database, settings: FleetSettings) -> World:
    return World(db, settings)


def test_a_good_release_goes_through_every_stage(world: World) -> None:
    rid = world.create()
    stages = world.stage_of(rid)
    assert sorted(stages.values()) == [0, 0] + [1] * 8 + [2] * 10
    assert world.assigned(rid) == {d for d, s in stages.items() if s == 0}
    seen_stages = []
    for _ in range(40):
        world.commit_new(rid)
        world.report_window(rid)
        state = world.tick(rid)
        rollout = world.service.get(rid)
        seen_stages.append(rollout.stage)
        assert state is not RolloutState.PAUSED, rollout.reason
        if state is RolloutState.COMPLETED:
            break
    assert state is RolloutState.COMPLETED
    assert world.assigned(rid) == set(world.devices)
    status = world.service.status(rid, world.clock.now)
    # every stage soaked at least its 300 s before the gates let it go
    times = [e.ts for e in status.events]
    assert all(b - a >= timedelta(seconds=300) for a, b in zip(times, times[1:], strict=False))
    assert seen_stages[-1] == 2
    assert [s.committed for s in status.stages] == [2, 8, 10]
    assert [e.event for e in status.events] == ["create", "promote", "promote", "complete"]
    verdicts = {v.gate: v.status.value for v in world.service.get(rid).verdicts}
    assert verdicts["updates"] == "pass"
    # the last stage had no control cohort left: latency and drift were judged earlier
    promote = status.events[1].reason
    assert "every gate passed" in promote


def test_a_canary_failing_its_trial_rolls_back_every_device_that_took_it(world: World) -> None:
    rid = world.create(policy="rollback")
    canaries = sorted(world.assigned(rid))
    assert len(canaries) == 2
    world.reports.update(canaries[0], 2, "committed", world.clock.now)
    world.reports.update(
        canaries[1], 2, "rolling_back", world.clock.now, frm="trial", reason="error rate 12%"
    )
    assert world.tick(rid) is RolloutState.ROLLING_BACK
    rollout = world.service.get(rid)
    assert "trial gate failed" in rollout.reason and canaries[1] in rollout.reason
    # signed rollbacks to v1 for both devices the rollout assigned; nobody else touched
    assert world.assigned(rid, version=1, rollback=True) == set(canaries)
    assert world.assigned(rid) == set(canaries)
    assert world.tick(rid) is RolloutState.ROLLING_BACK  # canary 0 still runs v2
    world.reports.update(canaries[0], 1, "committed", world.clock.now, rollback=True)
    assert world.tick(rid) is RolloutState.ROLLED_BACK
    status = world.service.status(rid, world.clock.now)
    assert status.stages[0].rolled_back == 2
    assert [e.event for e in status.events][-2:] == ["gate_failed_rollback", "rollback_done"]


def test_shifted_outputs_are_stopped_by_the_drift_gate_before_the_next_stage(
    world: World,
) -> None:
    rid = world.create(policy="pause")
    for _ in range(20):
        world.commit_new(rid)
        world.report_window(rid, canary=SHIFTED)
        if world.tick(rid) is not RolloutState.RUNNING:
            break
    rollout = world.service.get(rid)
    assert rollout.state is RolloutState.PAUSED
    assert rollout.stage == 0
    assert "drift gate failed" in rollout.reason and "output classes PSI" in rollout.reason
    verdicts = {v.gate: v.status.value for v in rollout.verdicts}
    assert verdicts == {"updates": "pass", "trial": "pass", "latency": "pass", "drift": "fail"}
    assert len(world.assigned(rid)) == 2  # stage 2 never started
    # paused: the controller neither judges nor assigns
    assert world.tick(rid) is RolloutState.PAUSED
    # the operator aborts: rollbacks to v1 for the two canaries
    world.service.abort(rid, OP, world.clock.now, "drifted")
    assert world.assigned(rid, version=1, rollback=True) == world.assigned(rid)


def test_slow_canaries_fail_the_latency_gate(world: World) -> None:
    rid = world.create(policy="pause")
    for _ in range(10):
        world.commit_new(rid)
        world.report_window(rid, p95=25.0)
        if world.tick(rid) is not RolloutState.RUNNING:
            break
    rollout = world.service.get(rid)
    assert rollout.state is RolloutState.PAUSED
    assert "latency gate failed" in rollout.reason and "2.50x" in rollout.reason


def test_a_silent_canary_is_stuck_then_failed_not_a_blocker(world: World) -> None:
    rid = world.create(policy="pause")
    canaries = sorted(world.assigned(rid))
    world.reports.update(canaries[0], 2, "committed", world.clock.now)
    for _ in range(14):  # 14 minutes: still within the 15 min stuck timeout
        world.report_window(rid)
        assert world.tick(rid) is RolloutState.RUNNING
    assert "still updating" in world.service.get(rid).reason
    world.tick(rid, seconds=120)
    rollout = world.service.get(rid)
    assert rollout.state is RolloutState.PAUSED
    assert f"{canaries[1]} (stuck)" in rollout.reason


def test_not_enough_drift_data_waits_up_to_max_wait_then_the_policy_decides(
    world: World,
) -> None:
    rid = world.create(policy="pause")
    world.commit_new(rid)
    assert world.tick(rid, 400) is RolloutState.RUNNING  # soaked, but no reports at all
    assert "not enough data yet" in world.service.get(rid).reason
    assert world.tick(rid, 3300) is RolloutState.PAUSED
    assert "max wait of 3600s" in world.service.get(rid).reason


def test_devices_that_join_the_target_are_included(world: World) -> None:
    rid = world.create()
    world.service.pause(rid, OP, world.clock.now)
    world.service.promote(rid, OP, world.clock.now)  # paused -> stage 2 running
    late = [f"late-{i}" for i in range(30)]
    for d in late:
        world.join(d)
    world.tick(rid)
    placed = world.stage_of(rid)
    assert set(late) <= set(placed)
    due = {d for d in late if placed[d] <= 1}
    assert due and due != set(late)  # by their own hash share: some now, some later
    assert due <= world.assigned(rid)
    assert not (set(late) - due) & world.assigned(rid)


def test_one_active_rollout_per_model_and_target(world: World) -> None:
    rid = world.create()
    with pytest.raises(ActiveRolloutExistsError, match=f"rollout {rid} .* is running"):
        world.create()
    with pytest.raises(RolloutTransitionError, match="cannot take resume"):
        world.service.resume(rid, OP, world.clock.now)
    world.service.abort(rid, OP, world.clock.now)
    world.tick(rid)
    world.tick(rid, 2000)  # canaries never reported: stuck past the timeout
    assert world.service.get(rid).state is RolloutState.ROLLED_BACK
    with pytest.raises(ConflictError, match="no device of target all needs"):
        world.service.create(RolloutSpec(H.MODEL, 1, stages=STAGES), OP, world.clock.now)
    # the first one has ended: a new rollout of v2 may start
    assert world.create() != rid


def test_a_crash_between_assigning_and_recording_is_recovered(world: World) -> None:
    rid = world.create()
    world.service.pause(rid, OP, world.clock.now)
    world.service.promote(rid, OP, world.clock.now)
    # as if the process died after DesiredStateService.assign committed for stage 2:
    stage1 = [d for d, s in world.stage_of(rid).items() if s == 1]
    world.db.execute(
        "UPDATE rollout_devices SET assigned_at = NULL WHERE rollout_id = ? AND stage = 1", [rid]
    )
    world.db.conn.commit()
    store = Store(world.settings.db_path)
    results = controller_tick(store, world.settings, None, world.clock.step())
    assert [r.rollout_id for r in results] == [rid]
    rows = world.db.execute(
        "SELECT count(*) FROM rollout_devices WHERE rollout_id = ? AND stage = 1 "
        "AND assigned_at IS NOT NULL AND note IS NULL",
        [rid],
    ).fetchone()
    assert rows[0] == len(stage1)
    serials = world.db.execute(
        "SELECT max(serial) FROM assignments WHERE device_id = ?", [stage1[0]]
    ).fetchone()
    assert serials[0] == 1  # not assigned twice
    desired = DesiredStateService(world.db, world.settings)
    assert desired.current(stage1[0]).rollout_id == rid  # type: ignore[union-attr]
    assert ModelRegistry(world.db).get(H.MODEL, 2).version == 2


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (Target("group", ("line-1",)), {"dev-00", "dev-01", "dev-02"}),
        (Target("tags", ("cam", "north")), {"dev-03"}),
        (Target("profiles", (H.PROFILE, "rpi4-aarch64")), None),
    ],
)
def test_targets_select_their_devices(
    world: World, target: Target, expected: set[str] | None
) -> None:
    world.db.execute("UPDATE devices SET group_name = 'line-1' WHERE id < 'dev-03'")
    world.db.execute("UPDATE devices SET tags = '[\"cam\",\"north\"]' WHERE id = 'dev-03'")
    world.db.execute("UPDATE devices SET tags = '[\"cam\"]' WHERE id = 'dev-04'")
    world.db.conn.commit()
    rid = world.create(target=target)
    assert set(world.stage_of(rid)) == (expected or set(world.devices))
