"""The audit log: who did what to which thing, and when.

Services call :meth:`AuditLog.record` inside the same transaction as the change they record, so
an audited change is never committed without its entry (and a rolled-back change leaves none).
Actions are dotted names (``token.create``, ``device.decommission``, ``release.sign``,
``rollout.pause``); the target is the id of the thing acted on; ``detail`` is a small JSON
object that never holds a secret.

This module stores and reads entries; it does not decide what is audited (the services do) and
offers no way to edit or delete an entry.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlite_utils import Database

from fleet.store import Page, from_iso, iso, to_json

TABLE = "audit"


@dataclass(frozen=True)
class Actor:
    """Who acted: ``token:<id>`` for an API token, ``cli:<user>`` for a local command,
    ``device:<id>`` for a device, ``system`` for the fleet manager itself."""

    id: str
    name: str = ""

    @classmethod
    def cli(cls, user: str) -> Actor:
        return cls(f"cli:{user}", user)


SYSTEM = Actor("system", "edgefleet")


@dataclass(frozen=True)
class AuditEntry:
    id: int
    ts: datetime
    actor: str
    actor_name: str
    action: str
    target: str
    detail: Mapping[str, Any] = field(default_factory=dict)


class AuditLog:
    def __init__(self, db: Database) -> None:
        self.db = db

    def record(
        self,
        actor: Actor,
        action: str,
        target: str,
        now: datetime,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        self.db.table(TABLE).insert(
            {
                "ts": iso(now),
                "actor": actor.id,
                "actor_name": actor.name,
                "action": action,
                "target": target,
                "detail": to_json(dict(detail or {})),
            }
        )

    def query(
        self,
        *,
        actor: str | None = None,
        action: str | None = None,
        target: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> Page[AuditEntry]:
        """Entries matching every given filter, newest first. ``action`` ending in ``.*``
        matches a prefix (``device.*``)."""
        where, params = [], []
        if actor:
            where.append("actor = ?")
            params.append(actor)
        if action and action.endswith(".*"):
            where.append("action LIKE ? ESCAPE '\\'")
            params.append(_like_prefix(action[:-1]))
        elif action:
            where.append("action = ?")
            params.append(action)
        if target:
            where.append("target = ?")
            params.append(target)
        if since:
            where.append("ts >= ?")
            params.append(iso(since))
        if until:
            where.append("ts < ?")
            params.append(iso(until))
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        total = self.db.execute(f"SELECT count(*) FROM {TABLE} {clause}", params).fetchone()[0]
        rows = self.db.query(
            f"SELECT * FROM {TABLE} {clause} ORDER BY id DESC LIMIT ? OFFSET ?",
            [*params, limit, offset],
        )
        items = tuple(
            AuditEntry(
                id=r["id"],
                ts=from_iso(r["ts"]),
                actor=r["actor"],
                actor_name=r["actor_name"],
                action=r["action"],
                target=r["target"],
                detail=json.loads(r["detail"]),
            )
            for r in rows
        )
        return Page(items, int(total), limit, offset)


def _like_prefix(prefix: str) -> str:
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"
