"""Staged rollouts: the service operators call and the controller job that drives them.

A rollout takes one published release to a target (all active devices, a group, devices with
all of some tags, devices of some firmware profiles) in stages. Everything lives in the
database (``rollouts``, ``rollout_devices``, ``rollout_events``; migration ``m0007``), so a fleet
manager killed mid-rollout carries on from the stored state at its next tick.

* :meth:`RolloutService.create` checks the release and the one-active-rollout rule (per model and
  target; a second is refused with the id and state of the first), places every device of the
  target in a stage (:func:`fleet.rollout_plan.assign_stages`) and assigns stage 0.
* :func:`controller_tick` (the ``rollout_controller`` scheduler job, every
  :data:`CONTROLLER_EVERY`) for each running rollout: places devices that joined the target
  (by their own hash share), assigns the release to every placed device of a started stage not
  assigned yet (offline devices get it from the retained desired document when they return),
  reads the stored reports into :mod:`fleet.gates` records, and promotes, completes, pauses or
  rolls back. For a rolling-back rollout it issues signed rollbacks (to each device's previous
  version) to every device the rollout assigned, and ends the rollback once each device that
  took the release reports the old one again (or stayed silent past the stuck timeout).
* Operators pause, resume, promote now and abort (= roll back); each is audited
  (``rollout.create``/``pause``/``resume``/``promote``/``abort``) and recorded as a rollout
  event; the controller's own changes are events by ``system``.

Assignments go through :meth:`fleet.desired_state.DesiredStateService.assign` only (which signs,
stores, then publishes), always outside this module's own transactions. The order of writes
(previous version stored, then assigned, then ``assigned_at``) makes a crash between them
harmless: the next tick recognises the device's newest assignment as this rollout's.

Planning and gate rules are pure (:mod:`fleet.rollout_plan`, :mod:`fleet.gates`); this module
reads and writes the database and calls them.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlite_utils import Database

from fleet.audit import SYSTEM, Actor, AuditLog
from fleet.desired_outbox import DesiredOutbox
from fleet.desired_state import DesiredStateService
from fleet.devices import validate_group, validate_tags
from fleet.errors import ConflictError, FleetError, InvalidInputError, NotFoundError
from fleet.gates import (
    Action,
    DeviceProgress,
    GateConfig,
    GateVerdict,
    Outcome,
    StageInputs,
    Status,
    evaluate,
)
from fleet.registry import ModelRegistry, Release
from fleet.rollout_plan import (
    ACTIVE_STATES,
    DEFAULT_PERCENTS,
    RolloutEvent,
    RolloutState,
    advance_event,
    assign_stages,
    check_percents,
    failure_event,
    next_state,
    stage_for_late_device,
)
from fleet.rollout_reports import RolloutReports
from fleet.settings import FleetSettings
from fleet.store import Store, from_iso, immediate, iso, to_json

log = logging.getLogger(__name__)

CONTROLLER_JOB = "rollout_controller"
# one thread at a time issues a rollout's assignments (in this process; the database's
# serials and the recovery of assignments made "meanwhile" cover the rest)
_ASSIGNING = threading.Lock()
CONTROLLER_EVERY = timedelta(seconds=5)
DEFAULT_SOAK_S = 600.0
DEFAULT_MAX_WAIT_S = 6 * 3600.0
TARGET_KINDS = ("all", "group", "tags", "profiles")


# --- errors -----------------------------------------------------------------------------------


class RolloutNotFoundError(NotFoundError):
    """No rollout has this id (HTTP 404)."""


class ActiveRolloutExistsError(ConflictError):
    """The model already has an active rollout to this target (HTTP 409)."""


class EmptyTargetError(NotFoundError):
    """The target has no active device (HTTP 404)."""


# --- values -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Which devices a rollout covers: ``all``; a ``group`` (one name); ``tags`` (devices with
    every tag); ``profiles`` (devices of any of these firmware profiles)."""

    kind: str = "all"
    values: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise InvalidInputError(
                f"unknown target kind {self.kind!r}; use one of {', '.join(TARGET_KINDS)}"
            )
        if self.kind == "all" and self.values:
            raise InvalidInputError("target 'all' takes no values")
        if self.kind == "group":
            if len(self.values) != 1:
                raise InvalidInputError("target 'group' takes exactly one group name")
            validate_group(self.values[0])
        if self.kind in ("tags", "profiles"):
            if not self.values:
                raise InvalidInputError(f"target {self.kind!r} needs at least one value")
            if self.kind == "tags":
                validate_tags(self.values)
            object.__setattr__(self, "values", tuple(sorted(set(self.values))))

    @property
    def key(self) -> str:
        """Canonical text of the target (the one-active-rollout rule compares these)."""
        return self.kind if self.kind == "all" else f"{self.kind}:{','.join(self.values)}"

    def sql(self) -> tuple[str, list[Any]]:
        """A WHERE clause over ``devices`` selecting the target's active devices."""
        where, params = "status = 'active'", []
        if self.kind == "group":
            where += " AND group_name = ?"
            params.append(self.values[0])
        elif self.kind == "tags":
            for tag in self.values:
                where += " AND EXISTS (SELECT 1 FROM json_each(devices.tags) WHERE value = ?)"
                params.append(tag)
        elif self.kind == "profiles":
            where += f" AND profile IN ({', '.join('?' * len(self.values))})"
            params.extend(self.values)
        return where, params


@dataclass(frozen=True)
class StageSpec:
    """One stage: cumulative share of the target, minimum soak, and how long it may wait for
    enough data before the policy decides (seconds)."""

    percent: float
    soak_s: float = DEFAULT_SOAK_S
    max_wait_s: float = DEFAULT_MAX_WAIT_S


def default_stages() -> tuple[StageSpec, ...]:
    return tuple(StageSpec(p) for p in DEFAULT_PERCENTS)


@dataclass(frozen=True)
class RolloutSpec:
    model: str
    version: int
    target: Target = field(default_factory=Target)
    stages: tuple[StageSpec, ...] = field(default_factory=default_stages)
    gates: GateConfig = field(default_factory=GateConfig)
    policy: str = "rollback"

    def __post_init__(self) -> None:
        check_percents([s.percent for s in self.stages])
        for s in self.stages:
            if s.soak_s < 0 or s.max_wait_s < s.soak_s:
                raise InvalidInputError(
                    f"stage {s.percent:g}%: soak_s must be >= 0 and max_wait_s >= soak_s "
                    f"(got soak {s.soak_s:g}s, max wait {s.max_wait_s:g}s)"
                )
        failure_event(self.policy)  # refuses an unknown policy


@dataclass(frozen=True)
class Rollout:
    id: str
    model: str
    version: int
    target: Target
    stages: tuple[StageSpec, ...]
    gates: GateConfig
    policy: str
    state: RolloutState
    stage: int
    stage_started_at: datetime
    verdicts: tuple[GateVerdict, ...]
    reason: str
    created_at: datetime
    created_by: str
    created_by_name: str
    updated_at: datetime
    ended_at: datetime | None


@dataclass(frozen=True)
class StageProgress:
    """Devices of one stage by where they stand (stuck devices count as failed)."""

    index: int
    percent: float
    status: str  # done | current | waiting
    devices: int
    pending: int
    updating: int
    committed: int
    failed: int
    rolled_back: int


@dataclass(frozen=True)
class RolloutEventRecord:
    ts: datetime
    from_state: str
    event: str
    to_state: str
    stage: int
    actor: str
    reason: str


@dataclass(frozen=True)
class RolloutStatus:
    rollout: Rollout
    stages: tuple[StageProgress, ...]
    devices: tuple[DeviceProgress, ...]
    events: tuple[RolloutEventRecord, ...]


@dataclass(frozen=True)
class TickResult:
    rollout_id: str
    state: RolloutState
    stage: int
    action: str  # what the tick did: waited, promoted, completed, paused, rolling back, ...
    reason: str


def _epoch(t: datetime) -> float:
    return t.timestamp()


def _rollout(row: Mapping[str, Any]) -> Rollout:
    target = json.loads(row["target_value"])
    return Rollout(
        id=row["id"],
        model=row["model"],
        version=int(row["version"]),
        target=Target(row["target_kind"], tuple(target)),
        stages=tuple(StageSpec(**s) for s in json.loads(row["stages"])),
        gates=GateConfig(**json.loads(row["gates"])),
        policy=row["policy"],
        state=RolloutState(row["state"]),
        stage=int(row["stage"]),
        stage_started_at=from_iso(row["stage_started_at"]),
        verdicts=tuple(
            GateVerdict(
                v["gate"], Status(v["status"]), v["reason"], v.get("value"), v.get("threshold")
            )
            for v in json.loads(row["verdicts"])
        ),
        reason=row["reason"],
        created_at=from_iso(row["created_at"]),
        created_by=row["created_by"],
        created_by_name=row["created_by_name"],
        updated_at=from_iso(row["updated_at"]),
        ended_at=from_iso(row["ended_at"]) if row["ended_at"] else None,
    )


# --- the service ------------------------------------------------------------------------------


class RolloutService:
    """Rollouts on one connection. ``outbox`` publishes assignments after commit (None: the
    desired-state retry job publishes them)."""

    def __init__(
        self, db: Database, settings: FleetSettings, outbox: DesiredOutbox | None = None
    ) -> None:
        self.db = db
        self.settings = settings
        self.desired = DesiredStateService(db, settings, outbox)
        self.audit = AuditLog(db)

    # --- reading ----------------------------------------------------------------------------

    def get(self, rollout_id: str) -> Rollout:
        row = self.db.execute("SELECT * FROM rollouts WHERE id = ?", [rollout_id]).fetchone()
        if row is None:
            raise RolloutNotFoundError(
                f"no rollout {rollout_id!r}; GET /v1/rollouts (`fleet rollout list`) lists them"
            )
        cols = [d[0] for d in self.db.execute("SELECT * FROM rollouts LIMIT 0").description]
        return _rollout(dict(zip(cols, row, strict=True)))

    def find(self, state: RolloutState | None = None, model: str | None = None) -> list[Rollout]:
        where, params = [], []
        if state is not None:
            where.append("state = ?")
            params.append(state.value)
        if model is not None:
            where.append("model = ?")
            params.append(model)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self.db.query(f"SELECT * FROM rollouts {clause} ORDER BY created_at DESC", params)
        return [_rollout(r) for r in rows]

    def status(self, rollout_id: str, now: datetime) -> RolloutStatus:
        rollout = self.get(rollout_id)
        devices = self._progress(rollout)
        stuck_after = rollout.gates.stuck_timeout_s
        stages = []
        for i, spec in enumerate(rollout.stages):
            mine = [d for d in devices if d.stage == i]
            counts: dict[Outcome, int] = defaultdict(int)
            for d in mine:
                stuck = d.stuck(_epoch(now), stuck_after)
                counts[Outcome.FAILED if stuck else d.outcome] += 1
            if rollout.state is RolloutState.COMPLETED or i < rollout.stage:
                status = "done"
            elif i == rollout.stage:
                status = "current"
            else:
                status = "waiting"
            stages.append(
                StageProgress(
                    i,
                    spec.percent,
                    status,
                    len(mine),
                    counts[Outcome.PENDING],
                    counts[Outcome.UPDATING],
                    counts[Outcome.COMMITTED],
                    counts[Outcome.FAILED],
                    counts[Outcome.ROLLED_BACK],
                )
            )
        events = tuple(
            RolloutEventRecord(
                from_iso(r["ts"]),
                r["from_state"],
                r["event"],
                r["to_state"],
                int(r["stage"]),
                r["actor"],
                r["reason"],
            )
            for r in self.db.query(
                "SELECT * FROM rollout_events WHERE rollout_id = ? ORDER BY id", [rollout_id]
            )
        )
        return RolloutStatus(rollout, tuple(stages), tuple(devices), events)

    # --- creating ---------------------------------------------------------------------------

    def create(self, spec: RolloutSpec, actor: Actor, now: datetime) -> Rollout:
        """Plan and start a rollout (stage 0 assigned before this returns)."""
        release = ModelRegistry(self.db).get(spec.model, spec.version)
        if release.status != "published":
            raise ConflictError(
                f"{spec.model} v{spec.version} is {release.status}; roll out a published release"
            )
        rollout_id = f"ro-{secrets.token_hex(6)}"
        with immediate(self.db):
            self._refuse_second(spec)
            device_ids = self._target_devices(spec.target)
            if not device_ids:
                raise EmptyTargetError(
                    f"target {spec.target.key} has no active devices; GET /v1/devices lists "
                    "devices with their group, tags and profile"
                )
            self._refuse_nothing_to_do(spec, device_ids)
            row = {
                "id": rollout_id,
                "model": spec.model,
                "version": spec.version,
                "target_kind": spec.target.kind,
                "target_value": to_json(list(spec.target.values)),
                "target_key": spec.target.key,
                "stages": json.dumps([asdict(s) for s in spec.stages]),
                "gates": to_json(asdict(spec.gates)),
                "policy": spec.policy,
                "state": RolloutState.RUNNING.value,
                "stage": 0,
                "stage_started_at": iso(now),
                "verdicts": "[]",
                "reason": "stage 1 started",
                "created_at": iso(now),
                "created_by": actor.id,
                "created_by_name": actor.name,
                "updated_at": iso(now),
                "ended_at": None,
            }
            self.db.table("rollouts").insert(row)
            placed = assign_stages(rollout_id, device_ids, [s.percent for s in spec.stages])
            self._place(rollout_id, placed, now)
            self._event(rollout_id, "", "create", RolloutState.RUNNING, 0, actor, now, "")
            self.audit.record(
                actor,
                "rollout.create",
                rollout_id,
                now,
                {
                    "model": spec.model,
                    "version": spec.version,
                    "target": spec.target.key,
                    "devices": len(device_ids),
                    "stages": [s.percent for s in spec.stages],
                    "policy": spec.policy,
                },
            )
        log.info(
            "rollout %s of %s v%d to %s (%d devices) created",
            rollout_id,
            spec.model,
            spec.version,
            spec.target.key,
            len(device_ids),
        )
        rollout = self.get(rollout_id)
        self._assign_due(rollout, release, now)
        return rollout

    def _refuse_second(self, spec: RolloutSpec) -> None:
        row = self.db.execute(
            "SELECT id, version, state FROM rollouts WHERE model = ? AND target_key = ? "
            f"AND state IN ({', '.join('?' * len(ACTIVE_STATES))})",
            [spec.model, spec.target.key, *sorted(ACTIVE_STATES)],
        ).fetchone()
        if row is not None:
            raise ActiveRolloutExistsError(
                f"rollout {row[0]} of {spec.model} v{row[1]} to {spec.target.key} is {row[2]}; "
                "only one active rollout per model and target: wait for it to end, or abort it "
                f"(`fleet rollout abort {row[0]}`)"
            )

    def _refuse_nothing_to_do(self, spec: RolloutSpec, device_ids: Sequence[str]) -> None:
        for device in device_ids:
            current = self.desired.current_release(device)
            if current is None or (current.model == spec.model and current.version < spec.version):
                return
        raise ConflictError(
            f"no device of target {spec.target.key} needs {spec.model} v{spec.version}: each "
            "runs (or is assigned) that version or a newer one, or another model; roll out a "
            "newer release"
        )

    def _target_devices(self, target: Target) -> list[str]:
        where, params = target.sql()
        return [r[0] for r in self.db.execute(f"SELECT id FROM devices WHERE {where}", params)]

    def _place(self, rollout_id: str, placed: Mapping[str, int], now: datetime) -> None:
        self.db.table("rollout_devices").insert_all(
            (
                {
                    "rollout_id": rollout_id,
                    "device_id": d,
                    "stage": s,
                    "from_version": None,
                    "placed_at": iso(now),
                    "assigned_at": None,
                    "rollback_at": None,
                    "note": None,
                }
                for d, s in placed.items()
            ),
        )

    def _event(
        self,
        rollout_id: str,
        from_state: str,
        event: str,
        to_state: RolloutState,
        stage: int,
        actor: Actor,
        now: datetime,
        reason: str,
    ) -> None:
        self.db.table("rollout_events").insert(
            {
                "rollout_id": rollout_id,
                "ts": iso(now),
                "from_state": from_state,
                "event": event,
                "to_state": to_state.value,
                "stage": stage,
                "actor": actor.id,
                "reason": reason,
            }
        )

    # --- operator control -------------------------------------------------------------------

    def pause(self, rollout_id: str, actor: Actor, now: datetime, reason: str = "") -> Rollout:
        return self._operator(rollout_id, RolloutEvent.PAUSE, actor, now, reason)

    def resume(self, rollout_id: str, actor: Actor, now: datetime, reason: str = "") -> Rollout:
        """Run again; the current stage's soak starts over (its gates judge fresh data)."""
        return self._operator(rollout_id, RolloutEvent.RESUME, actor, now, reason)

    def promote(self, rollout_id: str, actor: Actor, now: datetime, reason: str = "") -> Rollout:
        """Start the next stage now, whatever the gates say (on the last stage: complete)."""
        rollout = self.get(rollout_id)
        event = advance_event(rollout.stage, len(rollout.stages))
        return self._operator(rollout_id, event, actor, now, reason)

    def abort(self, rollout_id: str, actor: Actor, now: datetime, reason: str = "") -> Rollout:
        """Roll back every device the rollout assigned (signed rollbacks issued now)."""
        return self._operator(rollout_id, RolloutEvent.ABORT, actor, now, reason)

    def _operator(
        self, rollout_id: str, event: RolloutEvent, actor: Actor, now: datetime, reason: str
    ) -> Rollout:
        with immediate(self.db):
            rollout = self.get(rollout_id)
            self._transition(rollout, event, actor, now, reason or f"{event} by {actor.id}")
            self.audit.record(
                actor,
                f"rollout.{'promote' if event is RolloutEvent.COMPLETE else event.value}",
                rollout_id,
                now,
                {"from_state": rollout.state.value, "stage": rollout.stage, "reason": reason},
            )
        self._act(self.get(rollout_id), now)
        return self.get(rollout_id)

    def _transition(
        self,
        rollout: Rollout,
        event: RolloutEvent,
        actor: Actor,
        now: datetime,
        reason: str,
        verdicts: Sequence[GateVerdict] | None = None,
    ) -> RolloutState:
        """Store the state after ``event`` (inside the caller's transaction)."""
        to = next_state(rollout.state, event)
        stage = rollout.stage
        changes: dict[str, Any] = {"state": to.value, "updated_at": iso(now), "reason": reason}
        if event is RolloutEvent.PROMOTE:
            stage += 1
            changes.update(stage=stage, stage_started_at=iso(now))
        if event is RolloutEvent.RESUME:
            changes["stage_started_at"] = iso(now)
        if to in (RolloutState.COMPLETED, RolloutState.ROLLED_BACK):
            changes["ended_at"] = iso(now)
        if verdicts is not None:
            changes["verdicts"] = json.dumps([asdict(v) for v in verdicts])
        self.db.table("rollouts").update(rollout.id, changes)
        self._event(rollout.id, rollout.state.value, event.value, to, stage, actor, now, reason)
        log.info("rollout %s: %s -> %s (%s): %s", rollout.id, rollout.state, to, event, reason)
        return to

    # --- the controller ---------------------------------------------------------------------

    def tick(self, rollout_id: str, now: datetime) -> TickResult:
        """One controller step for one rollout (see the module docstring)."""
        rollout = self.get(rollout_id)
        if rollout.state is RolloutState.RUNNING:
            return self._run(rollout, now)
        if rollout.state is RolloutState.ROLLING_BACK:
            return self._follow_rollback(rollout, now)
        return TickResult(rollout.id, rollout.state, rollout.stage, "nothing", rollout.reason)

    def _act(self, rollout: Rollout, now: datetime) -> None:
        """What a state asks for at once: assignments of started stages, or rollbacks."""
        if rollout.state is RolloutState.RUNNING:
            self._assign_due(rollout, self._release(rollout), now)
        elif rollout.state is RolloutState.ROLLING_BACK:
            self._issue_rollbacks(rollout, now)

    def _release(self, rollout: Rollout) -> Release:
        return ModelRegistry(self.db).get(rollout.model, rollout.version)

    def _run(self, rollout: Rollout, now: datetime) -> TickResult:
        release = self._release(rollout)
        self._place_late_joiners(rollout, now)
        self._assign_due(rollout, release, now)
        decision = evaluate(rollout.gates, self._inputs(rollout, now), _epoch(now))
        with immediate(self.db):
            current = self.get(rollout.id)
            if current.state is not rollout.state or current.stage != rollout.stage:
                # an operator acted while the gates were read: their word stands
                return TickResult(rollout.id, current.state, current.stage, "nothing", "changed")
            if decision.action is Action.WAIT:
                self.db.table("rollouts").update(
                    rollout.id,
                    {
                        "verdicts": json.dumps([asdict(v) for v in decision.verdicts]),
                        "reason": decision.reason,
                    },
                )
                return TickResult(
                    rollout.id, rollout.state, rollout.stage, "waited", decision.reason
                )
            if decision.action is Action.PASS:
                event = advance_event(rollout.stage, len(rollout.stages))
            else:
                event = failure_event(rollout.policy)
            reason = f"stage {rollout.stage + 1}: {decision.reason}"
            to = self._transition(rollout, event, SYSTEM, now, reason, decision.verdicts)
        after = self.get(rollout.id)
        self._act(after, now)
        return TickResult(rollout.id, to, after.stage, event.value, reason)

    def _place_late_joiners(self, rollout: Rollout, now: datetime) -> None:
        where, params = rollout.target.sql()
        new = [
            r[0]
            for r in self.db.execute(
                f"SELECT id FROM devices WHERE {where} AND id NOT IN "
                "(SELECT device_id FROM rollout_devices WHERE rollout_id = ?)",
                [*params, rollout.id],
            )
        ]
        if not new:
            return
        percents = [s.percent for s in rollout.stages]
        with immediate(self.db):
            self._place(
                rollout.id, {d: stage_for_late_device(rollout.id, d, percents) for d in new}, now
            )
        log.info("rollout %s: %d device(s) joined the target", rollout.id, len(new))

    def _assign_due(self, rollout: Rollout, release: Release, now: datetime) -> None:
        """Assign the release to every placed device of a started stage not assigned yet."""
        with _ASSIGNING:  # the controller job and an operator's request may both get here
            self._assign_due_now(rollout, release, now)

    def _assign_due_now(self, rollout: Rollout, release: Release, now: datetime) -> None:
        rows = list(
            self.db.query(
                "SELECT device_id, from_version FROM rollout_devices WHERE rollout_id = ? "
                "AND stage <= ? AND assigned_at IS NULL AND note IS NULL",
                [rollout.id, rollout.stage],
            )
        )
        if not rows:
            return
        eligible: dict[str, int | None] = {}
        notes: dict[str, str] = {}
        recovered: dict[str, str] = {}
        for row in rows:
            device = row["device_id"]
            latest = self.desired.current(device)
            if latest is not None and latest.rollout_id == rollout.id and not latest.rollback:
                recovered[device] = iso(latest.issued_at)  # assigned before a crash
                continue
            current = self.desired.current_release(device)
            if current is not None and current.model != rollout.model:
                notes[device] = f"runs {current.model}, not {rollout.model}"
            elif current is not None and current.version >= rollout.version:
                notes[device] = f"already on {current.model} v{current.version}"
            else:
                eligible[device] = current.version if current else None
        with immediate(self.db):
            table = self.db.table("rollout_devices")
            for device, at in recovered.items():
                table.update((rollout.id, device), {"assigned_at": at})
            for device, note in notes.items():
                table.update((rollout.id, device), {"note": note})
            for device, version in eligible.items():
                table.update((rollout.id, device), {"from_version": version})
        if not eligible:
            return
        try:
            self.desired.assign(list(eligible), release, False, rollout.id, SYSTEM, now)
            done = list(eligible)
        except FleetError as exc:
            log.warning("rollout %s: assigning together refused (%s); one by one", rollout.id, exc)
            done = []
            for device in eligible:
                try:
                    self.desired.assign([device], release, False, rollout.id, SYSTEM, now)
                    done.append(device)
                except FleetError as one:
                    latest = self.desired.current(device)
                    if latest is not None and latest.rollout_id == rollout.id:
                        done.append(device)  # assigned meanwhile by this rollout
                        continue
                    with immediate(self.db):
                        self.db.table("rollout_devices").update(
                            (rollout.id, device), {"note": f"not assigned: {one}"}
                        )
        with immediate(self.db):
            for device in done:
                self.db.table("rollout_devices").update(
                    (rollout.id, device), {"assigned_at": iso(now)}
                )
        log.info(
            "rollout %s: %s v%d assigned to %d device(s)",
            rollout.id,
            rollout.model,
            rollout.version,
            len(done),
        )

    def _inputs(self, rollout: Rollout, now: datetime) -> StageInputs:
        reports = RolloutReports(self.db, rollout.id, rollout.model, rollout.version)
        devices = reports.progress()
        spec = rollout.stages[rollout.stage]
        control = sum(1 for d in devices if d.assigned_at is None)
        lo, hi = _epoch(rollout.stage_started_at), _epoch(now)
        return StageInputs(
            stage=rollout.stage,
            stage_started_at=lo,
            soak_s=spec.soak_s,
            max_wait_s=spec.max_wait_s,
            devices=tuple(d for d in devices if d.stage == rollout.stage),
            trial_failures=tuple(d.device_id for d in devices if d.trial_failed),
            latency=reports.latency(lo, hi, control),
            drift=reports.drift(lo, hi, control),
        )

    def _progress(self, rollout: Rollout) -> list[DeviceProgress]:
        return RolloutReports(self.db, rollout.id, rollout.model, rollout.version).progress()

    # --- rolling back -----------------------------------------------------------------------

    def _issue_rollbacks(self, rollout: Rollout, now: datetime) -> None:
        """Signed rollbacks, to each device's previous version, for every device the rollout
        assigned and has not rolled back yet."""
        with _ASSIGNING:
            self._issue_rollbacks_now(rollout, now)

    def _issue_rollbacks_now(self, rollout: Rollout, now: datetime) -> None:
        rows = list(
            self.db.query(
                "SELECT device_id, from_version FROM rollout_devices WHERE rollout_id = ? "
                "AND assigned_at IS NOT NULL AND rollback_at IS NULL",
                [rollout.id],
            )
        )
        by_version: dict[int, list[str]] = defaultdict(list)
        notes: dict[str, str] = {}
        recovered: dict[str, str] = {}
        for row in rows:
            device, version = row["device_id"], row["from_version"]
            latest = self.desired.current(device)
            if latest is not None and latest.rollback and latest.rollout_id == rollout.id:
                recovered[device] = iso(latest.issued_at)
            elif version is None:
                notes[device] = "no previous release to roll back to"
            elif latest is None or latest.version != rollout.version:
                notes[device] = "assigned another release since; not rolled back"
            else:
                by_version[int(version)].append(device)
        done: dict[str, str] = dict(recovered)
        for device in notes:
            done[device] = iso(now)
        registry = ModelRegistry(self.db)
        for version, devices in by_version.items():
            release = registry.get(rollout.model, version)
            try:
                self.desired.assign(devices, release, True, rollout.id, SYSTEM, now)
                done.update((d, iso(now)) for d in devices)
            except FleetError as exc:
                log.warning(
                    "rollout %s: rollback together refused (%s); one by one", rollout.id, exc
                )
                for device in devices:
                    try:
                        self.desired.assign([device], release, True, rollout.id, SYSTEM, now)
                        done[device] = iso(now)
                    except FleetError as one:
                        notes[device] = f"rollback refused: {one}"
                        done[device] = iso(now)
        with immediate(self.db):
            table = self.db.table("rollout_devices")
            for device, at in done.items():
                changes: dict[str, Any] = {"rollback_at": at}
                if device in notes:
                    changes["note"] = notes[device]
                table.update((rollout.id, device), changes)
        if done:
            log.info("rollout %s: rollback issued to %d device(s)", rollout.id, len(done))

    def _follow_rollback(self, rollout: Rollout, now: datetime) -> TickResult:
        self._issue_rollbacks(rollout, now)
        devices = self._progress(rollout)
        took = [d for d in devices if d.assigned_at is not None]
        waiting = [
            d
            for d in took
            if d.outcome is not Outcome.ROLLED_BACK
            and d.outcome is not Outcome.PENDING  # never started the update: nothing to undo
            and d.outcome is not Outcome.FAILED
            and not d.stuck(_epoch(now), rollout.gates.stuck_timeout_s)
        ]
        if waiting:
            reason = (
                f"rolling back: {len(waiting)} device(s) not back yet "
                f"({', '.join(d.device_id for d in waiting[:5])})"
            )
            with immediate(self.db):
                self.db.table("rollouts").update(rollout.id, {"reason": reason})
            return TickResult(rollout.id, rollout.state, rollout.stage, "waited", reason)
        stuck = [d.device_id for d in took if d.stuck(_epoch(now), rollout.gates.stuck_timeout_s)]
        reason = f"{len(took)} device(s) rolled back"
        if stuck:
            reason += f"; {len(stuck)} silent past the stuck timeout: {', '.join(stuck[:5])}"
        with immediate(self.db):
            current = self.get(rollout.id)
            if current.state is not RolloutState.ROLLING_BACK:
                return TickResult(rollout.id, current.state, current.stage, "nothing", "changed")
            to = self._transition(current, RolloutEvent.ROLLBACK_DONE, SYSTEM, now, reason)
        return TickResult(rollout.id, to, rollout.stage, RolloutEvent.ROLLBACK_DONE.value, reason)


# --- the scheduler job ------------------------------------------------------------------------


def controller_tick(
    store: Store,
    settings: FleetSettings,
    outbox: DesiredOutbox | None,
    now: datetime,
) -> list[TickResult]:
    """The ``rollout_controller`` job: one step for every running or rolling-back rollout. A
    rollout whose step fails is logged and tried again next time; the others go on."""
    results = []
    with store.connect() as db:
        ids = [
            r[0]
            for r in db.execute(
                "SELECT id FROM rollouts WHERE state IN (?, ?) ORDER BY created_at",
                [RolloutState.RUNNING.value, RolloutState.ROLLING_BACK.value],
            )
        ]
        service = RolloutService(db, settings, outbox)
        for rollout_id in ids:
            try:
                results.append(service.tick(rollout_id, now))
            except FleetError as exc:
                log.error(
                    "rollout %s: controller step failed, retried next tick: %s", rollout_id, exc
                )
    return results


def controller_job(
    store: Store,
    settings: FleetSettings,
    outbox: Callable[[], DesiredOutbox | None],
    clock: Callable[[], datetime],
) -> Callable[[], list[TickResult]]:
    """The job function the scheduler runs (reads the outbox and the clock at each run)."""
    return lambda: controller_tick(store, settings, outbox(), clock())
