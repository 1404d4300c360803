"""Release assignments: give one device or a whole group a release (operator), read a device's
current assignment (viewer).

``POST /v1/devices/{id}/assignment`` and ``POST /v1/groups/{group}/assignment`` take
``{"model": ..., "version": ..., "rollback": false}`` and answer 201 with the signed
assignments and which devices' documents the broker has acknowledged (``published``); the rest
(``pending``, with ``publish_error``) are stored and published by the retry job once the broker
is back. A group assignment covers the group's active devices, all or none. Refusals say why:
404 unknown release/device/empty group, 409 decommissioned device or a version not newer than
the current one (older, for a rollback), 422 no artifact fits the device's profile, 503 no
signing key. Publishing and the retry job run in :mod:`fleet.routes.updates`' lifespan.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, status
from pydantic import BaseModel, ConfigDict, Field

from fleet.auth import Operator, Viewer
from fleet.dependencies import DB, SQLITE_INT_MAX, Context, Now
from fleet.desired_outbox import DesiredOutbox
from fleet.desired_state import (
    Assignment,
    AssignmentResult,
    DesiredStateService,
    NoAssignmentError,
)
from fleet.registry import ModelRegistry

router = APIRouter(prefix="/v1", tags=["assignments"])


class AssignmentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, max_length=128, description="model name")
    version: int = Field(ge=1, le=SQLITE_INT_MAX, description="a published version of the model")
    rollback: bool = Field(
        default=False, description="an explicit, signed return to a version older than current"
    )


def get_outbox(request: Request) -> DesiredOutbox | None:
    outbox: DesiredOutbox | None = getattr(request.app.state, "desired_outbox", None)
    return outbox


def get_desired_state(
    db: DB, ctx: Context, outbox: Annotated[DesiredOutbox | None, Depends(get_outbox)]
) -> DesiredStateService:
    return DesiredStateService(db, ctx.settings, outbox)


DesiredState = Annotated[DesiredStateService, Depends(get_desired_state)]


@router.post(
    "/devices/{device_id}/assignment",
    status_code=status.HTTP_201_CREATED,
    summary="Assign a release (or a signed rollback) to one device (operator)",
)
def assign_device(
    device_id: str,
    body: AssignmentRequest,
    desired: DesiredState,
    db: DB,
    operator: Operator,
    now: Now,
) -> AssignmentResult:
    release = ModelRegistry(db).get(body.model, body.version)
    return desired.assign([device_id], release, body.rollback, None, operator.actor, now)


@router.post(
    "/groups/{group}/assignment",
    status_code=status.HTTP_201_CREATED,
    summary="Assign a release (or a signed rollback) to every active device of a group (operator)",
)
def assign_group(
    group: str,
    body: AssignmentRequest,
    desired: DesiredState,
    db: DB,
    operator: Operator,
    now: Now,
) -> AssignmentResult:
    release = ModelRegistry(db).get(body.model, body.version)
    devices = desired.group_devices(group)
    return desired.assign(devices, release, body.rollback, None, operator.actor, now)


@router.get(
    "/devices/{device_id}/assignment",
    summary="A device's current assignment: release, serial, signed document (viewer)",
)
def get_assignment(device_id: str, desired: DesiredState, _: Viewer) -> Assignment:
    found = desired.current(device_id)
    if found is None:
        raise NoAssignmentError(
            f"device {device_id} has no assignment yet; POST /v1/devices/{device_id}/assignment "
            "(`fleet assign DEVICE --model M --version N`) gives it one"
        )
    return found
