"""``GET /v1/audit``: the audit log, newest first (operator or admin)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from fleet.audit import AuditEntry
from fleet.auth import Operator
from fleet.dependencies import Audit, AwareInstant
from fleet.store import Page

router = APIRouter(prefix="/v1", tags=["audit"])


@router.get("/audit", summary="Audit log entries, newest first (operator)")
def list_audit(
    audit: Audit,
    _: Operator,
    actor: str | None = None,
    action: Annotated[str | None, Query(description="exact, or a prefix like device.*")] = None,
    target: str | None = None,
    since: AwareInstant | None = None,
    until: AwareInstant | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Page[AuditEntry]:
    return audit.query(
        actor=actor,
        action=action,
        target=target,
        since=since,
        until=until,
        limit=limit,
        offset=offset,
    )
