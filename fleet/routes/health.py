"""``GET /healthz``: liveness and database reachability, for load balancers (no token)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from fleet.dependencies import DB, Context
from fleet.store import schema_version

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str
    schema_version: int
    environment: str


@router.get("/healthz", summary="Liveness and database check (public)")
def healthz(db: DB, ctx: Context) -> Health:
    return Health(
        status="ok", schema_version=schema_version(db), environment=ctx.settings.environment
    )
