"""A device's update history and current update state, for operators.

The history is the device's ``update`` reports as MQTT ingestion stored them
(``update_events``, one row per state transition: release, from/to state, attempt, reason,
seconds per step), newest first. The current state puts side by side what the fleet wants
(the newest assignment, and whether the broker has it), what the device last said it runs
(its ``state`` report) and where its newest update stands (the last transition).

Read-only; this module stores nothing (ingestion writes the events, :mod:`fleet.desired_state`
the assignments).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlite_utils import Database

from fleet.desired_state import DesiredStateService
from fleet.devices import DeviceRegistry
from fleet.settings import FleetSettings


@dataclass(frozen=True)
class UpdateTransition:
    seq: int
    at: datetime  # the device's clock
    model: str
    version: int
    rollback: bool
    from_state: str
    to_state: str
    attempt: int
    reason: str | None
    elapsed_s: Mapping[str, float]


@dataclass(frozen=True)
class DesiredSummary:
    model: str
    version: int
    serial: int
    rollback: bool
    rollout_id: str | None
    issued_at: datetime
    expires: datetime
    published: bool


@dataclass(frozen=True)
class UpdateStatus:
    """Desired vs. running vs. the last transition. ``in_sync``: the device reports running
    the desired release."""

    device_id: str
    status: str
    online: bool
    desired: DesiredSummary | None
    running_model: str | None
    running_version: int | None
    last_transition: UpdateTransition | None
    in_sync: bool


@dataclass(frozen=True)
class DeviceUpdates:
    current: UpdateStatus
    history: tuple[UpdateTransition, ...]
    total: int  # transitions stored for the device (history holds the newest ``limit``)


def _transition(row: Mapping[str, Any]) -> UpdateTransition:
    return UpdateTransition(
        seq=int(row["seq"]),
        at=datetime.fromtimestamp(float(row["ts"]), UTC),
        model=row["release_name"],
        version=int(row["release_version"]),
        rollback=bool(row["rollback"]),
        from_state=row["from_state"],
        to_state=row["to_state"],
        attempt=int(row["attempt"]),
        reason=row["reason"],
        elapsed_s=json.loads(row["elapsed_s"] or "{}"),
    )


def device_updates(
    db: Database, settings: FleetSettings, device_id: str, limit: int = 100
) -> DeviceUpdates:
    """The device's update transitions (newest ``limit``) and current update state."""
    device = DeviceRegistry(db).get(device_id)
    events = tuple(
        _transition(r)
        for r in db.query(
            "SELECT * FROM update_events WHERE device_id = ? ORDER BY seq DESC LIMIT ?",
            [device_id, limit],
        )
    )
    total = db.execute(
        "SELECT count(*) FROM update_events WHERE device_id = ?", [device_id]
    ).fetchone()[0]
    latest = DesiredStateService(db, settings).current(device_id)
    desired = None
    if latest is not None:
        desired = DesiredSummary(
            model=latest.model,
            version=latest.version,
            serial=latest.serial,
            rollback=latest.rollback,
            rollout_id=latest.rollout_id,
            issued_at=latest.issued_at,
            expires=latest.expires,
            published=latest.published_at is not None,
        )
    state = db.execute(
        "SELECT model_name, model_version FROM device_state WHERE device_id = ?", [device_id]
    ).fetchone()
    running_model = state[0] if state else None
    running_version = int(state[1]) if state and state[1] is not None else None
    in_sync = desired is not None and (desired.model, desired.version) == (
        running_model,
        running_version,
    )
    current = UpdateStatus(
        device_id=device_id,
        status=device.status.value,
        online=device.online,
        desired=desired,
        running_model=running_model,
        running_version=running_version,
        last_transition=events[0] if events else None,
        in_sync=in_sync,
    )
    return DeviceUpdates(current, events, int(total))
