"""The broker's credential files over HTTP (admin), and the lifespan that keeps them in sync.

``GET /v1/security/broker`` answers whether the fleet keeps the broker's password and ACL files
(``broker_auth.enabled``), where they are, how many users the last sync wrote and when, and the
last reload error. ``POST /v1/security/broker/sync`` rewrites them and reloads the broker now.

When ``broker_auth.enabled``, the lifespan builds :class:`fleet.broker_auth.BrokerAuthFiles`,
syncs once at start, registers it as an enrollment and revocation listener (a new device can
connect at once, a decommissioned one is kicked at once) and adds the ``broker_auth_sync`` job
to ``app.state.scheduler`` (made by :mod:`fleet.routes.repository`, entered before this one),
which retries a failed reload. The files and the reload live in :mod:`fleet.broker_auth`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel

from fleet.auth import Admin
from fleet.broker_auth import BrokerAuthFiles
from fleet.dependencies import AppContext
from fleet.errors import UnavailableError
from fleet.scheduler import add_job

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/security", tags=["security"])
SYNC_JOB = "broker_auth_sync"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    ctx: AppContext = app.state.fleet
    if not ctx.settings.broker_auth.enabled:
        app.state.broker_auth = None
        yield
        return
    files = BrokerAuthFiles(ctx.settings, ctx.store, ctx.clock)
    files.safe_sync(ctx.clock())
    app.state.broker_auth = files
    ctx.enrollment_listeners.append(files)
    ctx.revocation_listeners.append(files)
    scheduler = getattr(app.state, "scheduler", None)
    if scheduler is not None:
        add_job(
            scheduler,
            SYNC_JOB,
            lambda: files.safe_sync(ctx.clock()),
            ctx.settings.broker_auth.sync_every,
        )
    try:
        yield
    finally:
        if scheduler is not None and scheduler.get_job(SYNC_JOB) is not None:
            scheduler.remove_job(SYNC_JOB)
        ctx.enrollment_listeners.remove(files)
        ctx.revocation_listeners.remove(files)


class BrokerAuthStatus(BaseModel):
    enabled: bool
    password_file: str | None = None
    acl_file: str | None = None
    users: int | None = None  # the fleet's own user plus every active device
    synced_at: datetime | None = None
    last_error: str | None = None


def _files(request: Request) -> BrokerAuthFiles | None:
    files: BrokerAuthFiles | None = getattr(request.app.state, "broker_auth", None)
    return files


def _status(files: BrokerAuthFiles | None) -> BrokerAuthStatus:
    if files is None:
        return BrokerAuthStatus(enabled=False)
    return BrokerAuthStatus(
        enabled=True,
        password_file=str(files.password_file),
        acl_file=str(files.acl_file),
        users=files.last.users if files.last else None,
        synced_at=files.last.at if files.last else None,
        last_error=files.last_error,
    )


@router.get("/broker", summary="The broker's password and ACL files: where, users, sync (admin)")
def broker_status(request: Request, _: Admin) -> BrokerAuthStatus:
    return _status(_files(request))


@router.post("/broker/sync", summary="Rewrite the broker's credential files and reload (admin)")
def broker_sync(request: Request, _: Admin) -> BrokerAuthStatus:
    files = _files(request)
    if files is None:
        raise UnavailableError(
            "the fleet does not keep the broker's credential files; set broker_auth.enabled"
        )
    files.sync(files.clock())
    return _status(files)
