"""The device registry: enrolled devices, their groups and tags, listing, and decommissioning.

A device row is created by enrollment (:mod:`fleet.enrollment`) and never deleted: a
decommissioned device keeps its history but loses its credentials at once (its MQTT password
hash is cleared, device request signatures are refused, and every registered
:class:`RevocationListener` is told, e.g. to rewrite the broker's password file). MQTT
ingestion fills ``online`` and ``last_seen``.

This module owns the ``devices`` table's queries. It does not issue enrollment tokens, verify
request signatures (:mod:`protocol.device_auth`) or talk to the broker.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field
from sqlite_utils import Database

from fleet.audit import Actor, AuditLog
from fleet.errors import DeviceDecommissionedError, DeviceNotFoundError, InvalidInputError
from fleet.store import Page, from_iso, immediate, iso, to_json

log = logging.getLogger(__name__)

TABLE = "devices"
LABEL_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._:=-]{0,63}"
_LABEL = re.compile(LABEL_PATTERN)
MAX_TAGS = 32


class DeviceStatus(StrEnum):
    ACTIVE = "active"
    DECOMMISSIONED = "decommissioned"


def validate_group(group: str | None) -> str | None:
    if group is not None and not _LABEL.fullmatch(group):
        raise InvalidInputError(
            f"group {group!r} is not valid: use 1-64 letters, digits and . _ : = - "
            "(starting with a letter or digit)"
        )
    return group


def validate_tags(tags: Iterable[str]) -> tuple[str, ...]:
    """Tags as a sorted, de-duplicated tuple; :class:`InvalidInputError` for a bad one."""
    out = sorted(set(tags))
    for tag in out:
        if not _LABEL.fullmatch(tag):
            raise InvalidInputError(
                f"tag {tag!r} is not valid: use 1-64 letters, digits and . _ : = - "
                "(e.g. site=berlin)"
            )
    if len(out) > MAX_TAGS:
        raise InvalidInputError(f"a device has at most {MAX_TAGS} tags, got {len(out)}")
    return tuple(out)


@dataclass(frozen=True)
class Device:
    id: str
    public_key: str  # raw Ed25519 key, 64 hex digits
    profile: str
    facts: Mapping[str, Any]
    agent_version: str
    group: str | None
    tags: tuple[str, ...]
    enrolled_at: datetime
    enrollment_token_id: str | None
    status: DeviceStatus
    decommissioned_at: datetime | None
    online: bool
    last_seen: datetime | None
    mqtt_username: str = field(repr=False)


@dataclass(frozen=True)
class DeviceQuery:
    """Filters for :meth:`DeviceRegistry.find`; every given filter must match."""

    group: str | None = None
    tags: tuple[str, ...] = ()
    profile: str | None = None
    status: DeviceStatus | None = None
    online: bool | None = None
    search: str | None = None  # substring of the device id
    limit: int = 100
    offset: int = 0


class DevicePatch(BaseModel):
    """Changes to a device's placement. ``group: null`` clears the group; ``tags`` replaces
    all tags; ``add_tags``/``remove_tags`` edit them. Omitted fields stay as they are."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    group: str | None = None
    tags: list[str] | None = Field(default=None, max_length=MAX_TAGS)
    add_tags: list[str] = Field(default_factory=list, max_length=MAX_TAGS)
    remove_tags: list[str] = Field(default_factory=list, max_length=MAX_TAGS)


class RevocationListener(Protocol):
    """Told (after commit) when a device's credentials are revoked, e.g. to rewrite the
    broker's password file and kick the device's MQTT session."""

    def device_revoked(self, device_id: str) -> None: ...


def _device(row: Mapping[str, Any]) -> Device:
    return Device(
        id=row["id"],
        public_key=row["public_key"],
        profile=row["profile"],
        facts=json.loads(row["facts"]),
        agent_version=row["agent_version"],
        group=row["group_name"],
        tags=tuple(json.loads(row["tags"])),
        enrolled_at=from_iso(row["enrolled_at"]),
        enrollment_token_id=row["enrollment_token_id"],
        status=DeviceStatus(row["status"]),
        decommissioned_at=from_iso(row["decommissioned_at"]) if row["decommissioned_at"] else None,
        online=bool(row["online"]),
        last_seen=from_iso(row["last_seen"]) if row["last_seen"] else None,
        mqtt_username=row["mqtt_username"],
    )


def _like_substring(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class DeviceRegistry:
    def __init__(self, db: Database, listeners: Sequence[RevocationListener] = ()) -> None:
        self.db = db
        self.listeners = listeners
        self.audit = AuditLog(db)

    # --- reading ----------------------------------------------------------------------------

    def get(self, device_id: str) -> Device:
        rows = list(self.db.query(f"SELECT * FROM {TABLE} WHERE id = ?", [device_id]))
        if not rows:
            raise DeviceNotFoundError(
                f"no device {device_id!r}; GET /v1/devices?search=... finds devices by id"
            )
        return _device(rows[0])

    def exists(self, device_id: str) -> bool:
        return (
            self.db.execute(f"SELECT 1 FROM {TABLE} WHERE id = ?", [device_id]).fetchone()
            is not None
        )

    def find(self, query: DeviceQuery) -> Page[Device]:
        where: list[str] = []
        params: list[Any] = []
        if query.group is not None:
            where.append("group_name = ?")
            params.append(query.group)
        for tag in query.tags:
            where.append(f"EXISTS (SELECT 1 FROM json_each({TABLE}.tags) WHERE value = ?)")
            params.append(tag)
        if query.profile is not None:
            where.append("profile = ?")
            params.append(query.profile)
        if query.status is not None:
            where.append("status = ?")
            params.append(query.status.value)
        if query.online is not None:
            where.append("online = ?")
            params.append(int(query.online))
        if query.search:
            where.append("id LIKE ? ESCAPE '\\'")
            params.append(_like_substring(query.search))
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        total = self.db.execute(f"SELECT count(*) FROM {TABLE} {clause}", params).fetchone()[0]
        rows = self.db.query(
            f"SELECT * FROM {TABLE} {clause} ORDER BY enrolled_at, rowid LIMIT ? OFFSET ?",
            [*params, query.limit, query.offset],
        )
        return Page(tuple(_device(r) for r in rows), int(total), query.limit, query.offset)

    def signing_key(self, device_id: str) -> tuple[bytes, DeviceStatus] | None:
        """The device's raw public key and status, for request-signature checks."""
        row = self.db.execute(
            f"SELECT public_key, status FROM {TABLE} WHERE id = ?", [device_id]
        ).fetchone()
        return (bytes.fromhex(row[0]), DeviceStatus(row[1])) if row else None

    def broker_credentials(self) -> list[tuple[str, str]]:
        """``(username, $7$ hash)`` of every active device: the broker's password file."""
        return [
            (r[0], r[1])
            for r in self.db.execute(
                f"SELECT mqtt_username, mqtt_password_hash FROM {TABLE} "
                "WHERE status = 'active' AND mqtt_password_hash IS NOT NULL ORDER BY id"
            )
        ]

    def counts(self) -> dict[tuple[str, ...], int]:
        """Device counts by (status, online) for the metrics gauge."""
        rows = self.db.execute(
            f"SELECT status, online, count(*) FROM {TABLE} GROUP BY status, online"
        )
        return {(r[0], "true" if r[1] else "false"): int(r[2]) for r in rows}

    # --- writing ----------------------------------------------------------------------------

    def insert(self, row: Mapping[str, Any]) -> None:
        """Add a device row (enrollment calls this inside its transaction)."""
        self.db.table(TABLE).insert(dict(row))

    def update(self, device_id: str, patch: DevicePatch, actor: Actor, now: datetime) -> Device:
        changes: dict[str, Any] = {}
        with immediate(self.db):
            device = self.get(device_id)
            if device.status is DeviceStatus.DECOMMISSIONED:
                raise DeviceDecommissionedError(
                    f"device {device_id} is decommissioned and cannot be changed; enroll the "
                    "hardware again to give it a new identity"
                )
            if "group" in patch.model_fields_set:
                changes["group_name"] = validate_group(patch.group)
            tags = set(device.tags if patch.tags is None else validate_tags(patch.tags))
            tags |= set(validate_tags(patch.add_tags))
            tags -= set(patch.remove_tags)
            new_tags = validate_tags(tags)
            if new_tags != device.tags:
                changes["tags"] = to_json(list(new_tags))
            if not changes:
                return device
            self.db.table(TABLE).update(device_id, changes)
            detail = {
                "group": changes.get("group_name", device.group),
                "tags": list(new_tags),
                "before": {"group": device.group, "tags": list(device.tags)},
            }
            self.audit.record(actor, "device.update", device_id, now, detail)
        return self.get(device_id)

    def decommission(self, device_id: str, actor: Actor, now: datetime, reason: str = "") -> Device:
        """Retire a device: its credentials stop working at once. Repeating it is harmless."""
        with immediate(self.db):
            device = self.get(device_id)
            if device.status is DeviceStatus.DECOMMISSIONED:
                return device
            self.db.execute(
                f"UPDATE {TABLE} SET status = 'decommissioned', decommissioned_at = ?, "
                "mqtt_password_hash = NULL, online = 0 WHERE id = ?",
                [iso(now), device_id],
            )
            self.audit.record(actor, "device.decommission", device_id, now, {"reason": reason})
        for listener in self.listeners:
            try:
                listener.device_revoked(device_id)
            except Exception:  # the revocation is committed; a listener failure must not hide it
                log.exception("revocation listener failed", extra={"device_id": device_id})
        log.info("device decommissioned", extra={"device_id": device_id, "actor": actor.id})
        return self.get(device_id)
