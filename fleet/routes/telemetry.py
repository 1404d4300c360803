"""Device telemetry (viewer): state and last heartbeat, heartbeat series, drift windows, drift
merged across the devices on one model version, and the ingestion counters.

``since``/``until`` take ISO 8601 times or epoch seconds; the default range is the last 24
hours. The module's ``lifespan`` runs the MQTT ingester (:mod:`fleet.ingest`) for as long as
the app when ``ingest.enabled`` is set (``EDGEFLEET_INGEST__ENABLED=true``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Query

from fleet.auth import Viewer
from fleet.dependencies import DB, Context, Instant, Now, VersionPath
from fleet.ingest import IngestConfig, Ingester, IngestMetrics
from fleet.registry import ArtifactStore
from fleet.telemetry import (
    DeviceTelemetry,
    DriftWindow,
    HeartbeatSeries,
    MergedDrift,
    RegistryReferences,
    TelemetryService,
)

router = APIRouter(prefix="/v1", tags=["telemetry"])
DEFAULT_RANGE = timedelta(hours=24)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    ctx = app.state.fleet
    if not ctx.settings.ingest.enabled:
        yield
        return
    ingester = Ingester(
        IngestConfig.from_settings(ctx.settings),
        ctx.store,
        IngestMetrics(ctx.metrics.registry),
        ctx.clock,
    )
    ingester.start()
    app.state.ingester = ingester
    try:
        yield
    finally:
        await asyncio.to_thread(ingester.stop)


def get_telemetry(db: DB) -> TelemetryService:
    return TelemetryService(db)


def get_references(db: DB, ctx: Context) -> RegistryReferences:
    return RegistryReferences(db, ArtifactStore(ctx.settings.artifacts_dir))


Telemetry = Annotated[TelemetryService, Depends(get_telemetry)]
References = Annotated[RegistryReferences, Depends(get_references)]
Since = Annotated[Instant | None, Query(description="exclusive; default until - 24h")]
Until = Annotated[Instant | None, Query(description="inclusive; default now")]


def _range(since: datetime | None, until: datetime | None, now: datetime) -> tuple[float, float]:
    hi = until or now
    lo = since or hi - DEFAULT_RANGE
    return lo.timestamp(), hi.timestamp()


@router.get(
    "/devices/{device_id}/telemetry",
    summary="A device's current state, last heartbeat and last update transition (viewer)",
)
def device_telemetry(device_id: str, telemetry: Telemetry, _: Viewer) -> DeviceTelemetry:
    return telemetry.detail(device_id)


@router.get(
    "/devices/{device_id}/heartbeats",
    summary="Heartbeat time series of a device; repeat metric= to pick metrics (viewer)",
)
def heartbeats(
    device_id: str,
    telemetry: Telemetry,
    _: Viewer,
    now: Now,
    since: Since = None,
    until: Until = None,
    metric: Annotated[list[str], Query(description="e.g. cpu_percent; default all")] = [],  # noqa: B006
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> HeartbeatSeries:
    lo, hi = _range(since, until, now)
    return telemetry.heartbeats(device_id, lo, hi, tuple(metric), limit)


@router.get("/devices/{device_id}/drift", summary="A device's drift windows (viewer)")
def device_drift(
    device_id: str,
    telemetry: Telemetry,
    _: Viewer,
    now: Now,
    since: Since = None,
    until: Until = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> list[DriftWindow]:
    lo, hi = _range(since, until, now)
    return list(telemetry.drift_windows(device_id, lo, hi, limit))


@router.get(
    "/drift/merged/{model}/{version}",
    summary="Drift of the summed counts of all devices on one model version (viewer)",
)
def merged_drift(
    model: str,
    version: VersionPath,
    telemetry: Telemetry,
    references: References,
    _: Viewer,
    now: Now,
    since: Since = None,
    until: Until = None,
    group: Annotated[str | None, Query(max_length=64)] = None,
) -> MergedDrift:
    lo, hi = _range(since, until, now)
    return telemetry.merged_drift(references, model, version, lo, hi, group)


@router.get("/telemetry/ingest", summary="All-time MQTT ingestion counters (viewer)")
def ingest_counters(telemetry: Telemetry, _: Viewer) -> dict[str, int]:
    return telemetry.ingest_counters()
