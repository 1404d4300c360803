"""Update history (viewer), and the lifespan that publishes desired documents.

``GET /v1/devices/{id}/updates`` answers the device's update transitions as ingested from its
``update`` reports, newest first, and its current state: the desired release (and whether the
broker has it), the release it reports running, its last transition.

The lifespan runs the desired-state publisher for as long as the app: the MQTT connection
(:class:`fleet.mqtt_publisher.MqttPublisher`, on ``app.state.desired_publisher``), the outbox
(``app.state.desired_outbox``, used by :mod:`fleet.routes.assignments`), the retry job
``publish_desired`` on ``app.state.scheduler`` (every ``desired.retry_every``: re-sign
documents close to expiry, publish what the broker has not acknowledged), and the listener
that clears a decommissioned device's retained document. It lives in this module because
lifespans are entered in module-name order and the scheduler is made by
:mod:`fleet.routes.repository`'s: ``updates`` sorts after it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, FastAPI, Query

from fleet.auth import Viewer
from fleet.dependencies import DB, AppContext, Context
from fleet.desired_outbox import DesiredOutbox
from fleet.desired_state import ClearOnDecommission, retry_job
from fleet.mqtt_publisher import MqttPublisher, PublisherConfig
from fleet.scheduler import add_job
from fleet.update_history import DeviceUpdates, device_updates

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["updates"])
RETRY_JOB = "publish_desired"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    ctx: AppContext = app.state.fleet
    publisher = MqttPublisher(PublisherConfig.from_settings(ctx.settings))
    publisher.start()
    outbox = DesiredOutbox(ctx.store, publisher)
    listener = ClearOnDecommission(ctx.store, ctx.settings, outbox, ctx.clock)
    app.state.desired_publisher = publisher
    app.state.desired_outbox = outbox
    ctx.revocation_listeners.append(listener)
    scheduler = getattr(app.state, "scheduler", None)
    if scheduler is not None:
        add_job(
            scheduler,
            RETRY_JOB,
            lambda: retry_job(ctx.store, ctx.settings, outbox, ctx.clock),
            ctx.settings.desired.retry_every,
        )
    else:  # pragma: no cover - the repository module always makes one
        log.error("no scheduler on the app: unpublished desired documents are not retried")
    try:
        yield
    finally:
        if scheduler is not None and scheduler.get_job(RETRY_JOB) is not None:
            scheduler.remove_job(RETRY_JOB)
        ctx.revocation_listeners.remove(listener)
        await asyncio.to_thread(publisher.stop)


@router.get(
    "/devices/{device_id}/updates",
    summary="A device's update history (newest first) and current update state (viewer)",
)
def updates(
    device_id: str,
    db: DB,
    ctx: Context,
    _: Viewer,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> DeviceUpdates:
    return device_updates(db, ctx.settings, device_id, limit)
