"""The fleet manager's composition root: :func:`create_app` builds the whole FastAPI app.

It opens (and migrates) the database, builds the app context (settings, store, clock, TUF trust
root, metrics) and includes every router of :mod:`fleet.routes`; nothing is built at import time.
Domain errors become JSON responses ``{"detail": ..., "error": ...}`` with the status of their
base class (:data:`STATUS_BY_ERROR`), so services raise :mod:`fleet.errors` and never
``HTTPException``.

To add an API area, add a module to :mod:`fleet.routes` (see its docstring); to add tables, add
a migration to :mod:`fleet.migrations`. Neither needs an edit here.
"""

from __future__ import annotations

import importlib.metadata
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from types import ModuleType
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from fleet import routes
from fleet.dependencies import AppContext, Clock
from fleet.devices import DeviceRegistry
from fleet.enrollment import TrustRootSource
from fleet.errors import (
    AuthenticationError,
    ConflictError,
    DeviceAuthenticationError,
    EnrollmentRefusedError,
    FleetError,
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    UnavailableError,
)
from fleet.metrics import CallbackGauge, FleetMetrics, RequestMetricsMiddleware
from fleet.settings import FleetSettings
from fleet.store import Store, migrate
from fleet.tuf_repo import TufRepository
from protocol.device_auth import SCHEME as DEVICE_SCHEME
from protocol.errors import ProtocolError

log = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[Exception], int] = {
    AuthenticationError: 401,
    PermissionDeniedError: 403,
    NotFoundError: 404,
    ConflictError: 409,
    PayloadTooLargeError: 413,
    InvalidInputError: 422,
    ProtocolError: 422,
    UnavailableError: 503,
}
DEFAULT_ERROR_STATUS = 400
BUSY_RETRY_AFTER_S = 2


class ErrorBody(BaseModel):
    """What every refused request answers: a domain error's message and class name, or
    FastAPI's list of request validation errors (then without ``error``)."""

    detail: Any = Field(description="what was wrong and what to do (or validation errors)")
    error: str | None = Field(default=None, description="the fleet error class")


# documented on every route: the spec then describes the error bodies the app really sends
# (FastAPI's default 422 schema knows only its own validation errors)
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorBody, "description": "refused: see `detail`"},
    503: {"model": ErrorBody, "description": "a dependency (signing key, broker) is missing"},
}


def status_for(exc: Exception) -> int:
    """The HTTP status of a domain error: that of its nearest mapped base class."""
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return DEFAULT_ERROR_STATUS


def _challenge(exc: Exception) -> dict[str, str]:
    if isinstance(exc, DeviceAuthenticationError):
        return {"WWW-Authenticate": DEVICE_SCHEME}
    if isinstance(exc, EnrollmentRefusedError):
        return {"WWW-Authenticate": 'Bearer realm="enrollment"'}
    if isinstance(exc, AuthenticationError):
        return {"WWW-Authenticate": "Bearer"}
    return {}


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    code = status_for(exc)
    if code >= 500:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
    return JSONResponse(
        {"detail": str(exc), "error": type(exc).__name__}, status_code=code, headers=_challenge(exc)
    )


async def _busy(request: Request, exc: Exception) -> JSONResponse:
    """SQLite's busy timeout ran out (a write lock held that long: a burst of writers on a
    loaded machine). Nothing was written; the client may simply try again."""
    if "locked" not in str(exc) and "busy" not in str(exc):
        raise exc
    log.warning("%s %s: database busy: %s", request.method, request.url.path, exc)
    return JSONResponse(
        {
            "detail": "the fleet manager is busy (its database stayed locked); nothing was "
            f"changed: retry in {BUSY_RETRY_AFTER_S} s",
            "error": "Busy",
        },
        status_code=503,
        headers={"Retry-After": str(BUSY_RETRY_AFTER_S)},
    )


def _version() -> str:
    try:
        return importlib.metadata.version("edgefleet")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _lifespan(
    modules: Sequence[ModuleType], store: Store
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            stack.callback(store.close)
            for module in modules:
                factory = getattr(module, "lifespan", None)
                if factory is not None:
                    await stack.enter_async_context(factory(app))
            yield

    return lifespan


def create_app(
    settings: FleetSettings,
    *,
    trust_root: TrustRootSource | None = None,
    clock: Clock | None = None,
) -> FastAPI:
    """The fleet manager app for ``settings``; the database is created/migrated here.

    ``trust_root`` defaults to the TUF repository under ``settings.tuf_dir`` (read per
    enrollment, so ``fleet keys init`` on a running server takes effect at once); ``clock``
    defaults to UTC wall time (tests pass a fixed one).
    """
    store = Store(settings.db_path, settings.db_busy_timeout_ms)
    with store.connect() as db:
        applied = migrate(db)
    if applied:
        log.info("database %s migrated: %s", store.path, ", ".join(m.name for m in applied))
    metrics = FleetMetrics()
    ctx = AppContext(
        settings=settings,
        store=store,
        clock=clock or (lambda: datetime.now(UTC)),
        trust_root=trust_root or TufRepository(settings.tuf_dir, {}),
        metrics=metrics,
    )

    def device_counts() -> dict[tuple[str, ...], int]:
        with store.connect() as conn:
            return DeviceRegistry(conn).counts()

    metrics.add(
        CallbackGauge(
            "edgefleet_devices",
            "Devices by status and online state",
            ["status", "online"],
            device_counts,
        )
    )
    modules = routes.discover()
    app = FastAPI(
        title="edgefleet fleet manager",
        version=_version(),
        description=(
            "Device and model registries, signed releases and staged rollouts. Authenticate "
            "with `Authorization: Bearer <token>` (roles: viewer < operator < admin); devices "
            "sign requests with their enrollment key."
        ),
        lifespan=_lifespan(modules, store),
    )
    app.state.fleet = ctx
    for module in modules:
        app.include_router(module.router, responses=ERROR_RESPONSES)
    app.add_exception_handler(FleetError, _domain_error)
    app.add_exception_handler(ProtocolError, _domain_error)
    app.add_exception_handler(sqlite3.OperationalError, _busy)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    return app
