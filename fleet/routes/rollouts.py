"""Staged rollouts over HTTP, and the lifespan that runs the rollout controller.

* ``POST /v1/rollouts`` (operator) takes ``{"model", "version", "target": {"kind": "all" |
  "group" | "tags" | "profiles", "values": [...]}, "stages": [{"percent", "soak_s",
  "max_wait_s"}], "gates": {...}, "policy": "pause" | "rollback"}`` (everything but model and
  version has defaults: 1/10/50/100 %, 10 min soak, 6 h max wait, :class:`fleet.gates.GateConfig`,
  rollback) and answers 201 with the rollout, stage 1 already assigned. 409 when the model has an
  active rollout to the same target (the answer names it) or no device needs the release, 404
  for an unknown release or an empty target, 422 for a bad plan or thresholds.
* ``GET /v1/rollouts`` (viewer; ``?state=``, ``?model=``) lists rollouts; ``GET
  /v1/rollouts/{id}`` answers the rollout, per-stage progress (pending / updating / committed /
  failed / rolled back), every device's progress, the last gate verdicts and the history.
* ``POST /v1/rollouts/{id}/pause|resume|promote|abort`` (operator, ``{"reason": ...}``
  optional) change the state as :data:`fleet.rollout_plan.TRANSITIONS` allows (409 otherwise),
  audited; ``abort`` rolls back every device the rollout assigned.

The lifespan adds the ``rollout_controller`` job to ``app.state.scheduler`` (made by
:mod:`fleet.routes.repository`'s lifespan, entered before this one); the job reads the desired
outbox (:mod:`fleet.routes.updates`) at each run.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, FastAPI, Request, status
from pydantic import BaseModel, ConfigDict, Field

from fleet.auth import Operator, Viewer
from fleet.dependencies import DB, SQLITE_INT_MAX, AppContext, Context, Now
from fleet.desired_outbox import DesiredOutbox
from fleet.gates import GateConfig
from fleet.rollout_plan import RolloutState
from fleet.rollouts import (
    CONTROLLER_EVERY,
    CONTROLLER_JOB,
    DEFAULT_MAX_WAIT_S,
    DEFAULT_SOAK_S,
    Rollout,
    RolloutService,
    RolloutSpec,
    RolloutStatus,
    StageSpec,
    Target,
    controller_job,
    default_stages,
)
from fleet.scheduler import add_job

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["rollouts"])


class TargetBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["all", "group", "tags", "profiles"] = "all"
    values: list[str] = Field(default_factory=list, max_length=64)


class StageBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    percent: float = Field(gt=0, le=100, description="cumulative share of the target")
    soak_s: float = Field(default=DEFAULT_SOAK_S, ge=0, description="minimum time in the stage")
    max_wait_s: float = Field(
        default=DEFAULT_MAX_WAIT_S, ge=0, description="how long to wait for enough data"
    )


class GatesBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min_success_rate: float = 0.95
    max_failures: int | None = None
    max_trial_failures: int = 0
    latency_ratio: float = 1.5
    min_latency_samples: int = 3
    drift_alpha: float = 0.01
    min_drift_n: int = 1000
    min_reporting: int = 0
    stuck_timeout_s: float = 1800.0


class RolloutRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, max_length=128)
    version: int = Field(ge=1, le=SQLITE_INT_MAX)
    target: TargetBody = Field(default_factory=TargetBody)
    stages: list[StageBody] | None = Field(default=None, min_length=1, max_length=20)
    gates: GatesBody = Field(default_factory=GatesBody)
    policy: Literal["pause", "rollback"] = "rollback"

    def spec(self) -> RolloutSpec:
        stages = (
            tuple(StageSpec(s.percent, s.soak_s, s.max_wait_s) for s in self.stages)
            if self.stages
            else default_stages()
        )
        return RolloutSpec(
            self.model,
            self.version,
            Target(self.target.kind, tuple(self.target.values)),
            stages,
            GateConfig(**self.gates.model_dump()),
            self.policy,
        )


class ControlBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    reason: str = Field(default="", max_length=500)


def get_rollouts(db: DB, ctx: Context, request: Request) -> RolloutService:
    outbox: DesiredOutbox | None = getattr(request.app.state, "desired_outbox", None)
    return RolloutService(db, ctx.settings, outbox)


Rollouts = Annotated[RolloutService, Depends(get_rollouts)]


@router.post(
    "/rollouts",
    status_code=status.HTTP_201_CREATED,
    summary="Start a staged rollout of a release to a target (operator)",
)
def create_rollout(
    body: RolloutRequest, rollouts: Rollouts, operator: Operator, now: Now
) -> Rollout:
    return rollouts.create(body.spec(), operator.actor, now)


@router.get("/rollouts", summary="List rollouts, newest first (viewer)")
def list_rollouts(
    rollouts: Rollouts,
    _: Viewer,
    state: RolloutState | None = None,
    model: str | None = None,
) -> list[Rollout]:
    return rollouts.find(state, model)


@router.get(
    "/rollouts/{rollout_id}",
    summary="A rollout with per-stage progress, device progress, gate verdicts, history (viewer)",
)
def show_rollout(rollout_id: str, rollouts: Rollouts, _: Viewer, now: Now) -> RolloutStatus:
    return rollouts.status(rollout_id, now)


@router.post("/rollouts/{rollout_id}/pause", summary="Pause a running rollout (operator)")
def pause_rollout(
    rollout_id: str, rollouts: Rollouts, operator: Operator, now: Now, body: ControlBody
) -> Rollout:
    return rollouts.pause(rollout_id, operator.actor, now, body.reason)


@router.post(
    "/rollouts/{rollout_id}/resume",
    summary="Resume a paused rollout; the current stage's soak starts over (operator)",
)
def resume_rollout(
    rollout_id: str, rollouts: Rollouts, operator: Operator, now: Now, body: ControlBody
) -> Rollout:
    return rollouts.resume(rollout_id, operator.actor, now, body.reason)


@router.post(
    "/rollouts/{rollout_id}/promote",
    summary="Start the next stage now, whatever the gates say (operator)",
)
def promote_rollout(
    rollout_id: str, rollouts: Rollouts, operator: Operator, now: Now, body: ControlBody
) -> Rollout:
    return rollouts.promote(rollout_id, operator.actor, now, body.reason)


@router.post(
    "/rollouts/{rollout_id}/abort",
    summary="Abort: signed rollback of every device the rollout assigned (operator)",
)
def abort_rollout(
    rollout_id: str, rollouts: Rollouts, operator: Operator, now: Now, body: ControlBody
) -> Rollout:
    return rollouts.abort(rollout_id, operator.actor, now, body.reason)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Run the rollout controller on the app's scheduler for as long as the app."""
    ctx: AppContext = app.state.fleet
    scheduler = getattr(app.state, "scheduler", None)
    if scheduler is None:
        log.error("no scheduler on the app: rollouts do not advance on their own")
        yield
        return
    job = controller_job(
        ctx.store,
        ctx.settings,
        lambda: getattr(app.state, "desired_outbox", None),
        ctx.clock,
    )
    add_job(scheduler, CONTROLLER_JOB, job, CONTROLLER_EVERY)
    try:
        yield
    finally:
        if scheduler.get_job(CONTROLLER_JOB) is not None:
            scheduler.remove_job(CONTROLLER_JOB)
