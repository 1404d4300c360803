"""Request-scoped FastAPI dependencies: the app context, a database connection, the clock, and
the services built on them, as ``Annotated`` aliases so route signatures read like prose::

    def list_devices(devices: Devices, _: Viewer, group: str | None = None) -> ...

Each request gets its own SQLite connection (closed after the response); every service of that
request shares it. Nothing here decides who may call what (that is :mod:`fleet.auth`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Path, Request
from pydantic import AfterValidator, AwareDatetime
from sqlite_utils import Database

from fleet.audit import AuditLog
from fleet.devices import DeviceRegistry, RevocationListener
from fleet.enrollment import EnrollmentListener, EnrollmentService, TrustRootSource
from fleet.metrics import FleetMetrics
from fleet.settings import FleetSettings
from fleet.store import Store
from fleet.tokens import TokenService

Clock = Callable[[], datetime]


@dataclass
class AppContext:
    """What ``create_app`` built, kept on ``app.state.fleet``. Later parts add their long-lived
    components (TUF repository, ingestion, scheduler) in their own router's lifespan and may
    append :class:`RevocationListener` s and :class:`EnrollmentListener` s here."""

    settings: FleetSettings
    store: Store
    clock: Clock
    trust_root: TrustRootSource
    metrics: FleetMetrics
    revocation_listeners: list[RevocationListener] = field(default_factory=list)
    enrollment_listeners: list[EnrollmentListener] = field(default_factory=list)


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


# a release version in a URL path: SQLite stores integers in 64 bits, so a larger number would
# fail in the database (a 500) instead of being refused (a 422)
SQLITE_INT_MAX = 2**63 - 1
VersionPath = Annotated[int, Path(ge=1, le=SQLITE_INT_MAX, description="a release version")]


_OUT_OF_RANGE = "time out of range: give an ISO 8601 time between 1900 and 9998"


def _instant(value: datetime) -> datetime:
    """A time from a query string, in UTC (naive means UTC). Years 1900..9998 only: converting
    year 1 or 9999 across a time zone, or a day's range around it, overflows (a 500)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    try:
        value = value.astimezone(UTC)
    except OverflowError:  # beyond what datetime holds in UTC
        raise ValueError(_OUT_OF_RANGE) from None
    if not 1900 <= value.year <= 9998:
        raise ValueError(_OUT_OF_RANGE)
    return value


# a time in a query (``since``/``until`` filters); the second refuses one without a time zone
Instant = Annotated[datetime, AfterValidator(_instant)]
AwareInstant = Annotated[AwareDatetime, AfterValidator(_instant)]

Tokens = Annotated[TokenService, Depends(get_tokens)]
Devices = Annotated[DeviceRegistry, Depends(get_devices)]
Enrollments = Annotated[EnrollmentService, Depends(get_enrollment)]
Audit = Annotated[AuditLog, Depends(get_audit)]
