"""The device registry: list, filter, search and page devices; change group and tags;
decommission. ``GET /v1/device`` is the calling device's own record (device signature)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from fleet.auth import DeviceAuth, Operator, Viewer
from fleet.dependencies import Devices, Now
from fleet.devices import Device, DevicePatch, DeviceQuery, DeviceStatus
from fleet.store import Page

router = APIRouter(prefix="/v1", tags=["devices"])


class Decommission(BaseModel):
    reason: str = Field(default="", max_length=256)


@router.get("/devices", summary="List devices: filter, search by id, paginate (viewer)")
def list_devices(
    devices: Devices,
    _: Viewer,
    group: str | None = None,
    tag: Annotated[list[str], Query(description="repeat for several; all must match")] = [],  # noqa: B006
    profile: str | None = None,
    status: DeviceStatus | None = None,
    online: bool | None = None,
    search: Annotated[str | None, Query(max_length=64, description="id substring")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Page[Device]:
    query = DeviceQuery(
        group=group,
        tags=tuple(tag),
        profile=profile,
        status=status,
        online=online,
        search=search,
        limit=limit,
        offset=offset,
    )
    return devices.find(query)


@router.get("/devices/{device_id}", summary="One device (viewer)")
def get_device(device_id: str, devices: Devices, _: Viewer) -> Device:
    return devices.get(device_id)


@router.patch("/devices/{device_id}", summary="Change a device's group and tags (operator)")
def update_device(
    device_id: str, body: DevicePatch, devices: Devices, operator: Operator, now: Now
) -> Device:
    return devices.update(device_id, body, operator.actor, now)


@router.post(
    "/devices/{device_id}/decommission",
    summary="Decommission a device: its credentials stop working at once (operator)",
)
def decommission_device(
    device_id: str,
    devices: Devices,
    operator: Operator,
    now: Now,
    body: Decommission | None = None,
) -> Device:
    return devices.decommission(device_id, operator.actor, now, body.reason if body else "")


@router.get("/device", summary="The calling device's own record (device signature)")
def own_record(device: DeviceAuth, devices: Devices) -> Device:
    return devices.get(device.id)
