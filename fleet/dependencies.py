"""Request-scoped FastAPI dependencies: the app context, a database connection, the clock, and
the services built on them, as ``Annotated`` aliases so route signatures read like prose::

    def list_devices(devices: Devices, _: Viewer, group: str | None = None) -> ...

Each request gets its own SQLite connection (closed after the response); every service of that
request shares it. Nothing here decides who may call what (that is :mod:`fleet.auth`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated

from fastapi import Depends, Request
from sqlite_utils import Database

from fleet.audit import AuditLog
from fleet.devices import DeviceRegistry, RevocationListener
from fleet.enrollment import EnrollmentService, TrustRootSource
from fleet.metrics import FleetMetrics
from fleet.settings import FleetSettings
from fleet.store import Store
from fleet.tokens import TokenService

Clock = Callable[[], datetime]


@dataclass
class AppContext:
    """What ``create_app`` built, kept on ``app.state.fleet``. Later parts add their long-lived
    components (TUF repository, ingestion, scheduler) in their own router's lifespan and may
    append :class:`RevocationListener` s here."""

    settings: FleetSettings
    store: Store
    clock: Clock
    trust_root: TrustRootSource
    metrics: FleetMetrics
    revocation_listeners: list[RevocationListener] = field(default_factory=list)


def get_context(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.fleet
    return ctx


Context = Annotated[AppContext, Depends(get_context)]


def get_db(ctx: Context) -> Iterator[Database]:
    with ctx.store.connect() as db:
        yield db


DB = Annotated[Database, Depends(get_db)]


def get_now(ctx: Context) -> datetime:
    return ctx.clock()


Now = Annotated[datetime, Depends(get_now)]


def get_tokens(db: DB) -> TokenService:
    return TokenService(db)


def get_devices(db: DB, ctx: Context) -> DeviceRegistry:
    return DeviceRegistry(db, ctx.revocation_listeners)


def get_enrollment(db: DB) -> EnrollmentService:
    return EnrollmentService(db)


def get_audit(db: DB) -> AuditLog:
    return AuditLog(db)


Tokens = Annotated[TokenService, Depends(get_tokens)]
Devices = Annotated[DeviceRegistry, Depends(get_devices)]
Enrollments = Annotated[EnrollmentService, Depends(get_enrollment)]
Audit = Annotated[AuditLog, Depends(get_audit)]
