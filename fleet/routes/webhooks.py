"""Webhooks (admin), and the lifespan that runs the alert jobs.

``POST /v1/webhooks`` adds a receiver (``{"url", "secret"}``), ``GET /v1/webhooks`` lists them
(never the secrets), ``DELETE /v1/webhooks/{id}`` disables one (settings webhooks are changed
in the settings). Deliveries are described in :mod:`fleet.webhooks`.

The lifespan syncs ``alerts.webhooks`` from the settings into the table, then adds two jobs to
``app.state.scheduler``: ``evaluate_alerts`` (every ``alerts.evaluate_every``) and
``deliver_webhooks`` (every ``alerts.deliver_every``). It lives in this module because
lifespans are entered in module-name order and the scheduler is made by
:mod:`fleet.routes.repository`'s: ``webhooks`` sorts after it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import httpx
from fastapi import APIRouter, Depends, FastAPI
from pydantic import BaseModel, Field

from fleet.alert_service import deliver_job, evaluate_job
from fleet.auth import Admin
from fleet.dependencies import DB, AppContext, Now
from fleet.scheduler import add_job
from fleet.webhooks import Webhook, WebhookService

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["alerts"])
EVALUATE_JOB = "evaluate_alerts"
DELIVER_JOB = "deliver_webhooks"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    ctx: AppContext = app.state.fleet
    settings = ctx.settings
    with ctx.store.connect() as db:
        WebhookService(db).sync_settings(settings.alerts.webhooks, ctx.clock())
    client = httpx.Client(
        timeout=settings.alerts.delivery_timeout.total_seconds(), follow_redirects=False
    )
    scheduler = getattr(app.state, "scheduler", None)
    if scheduler is not None:
        add_job(
            scheduler,
            EVALUATE_JOB,
            lambda: evaluate_job(ctx.store, settings, ctx.clock()),
            settings.alerts.evaluate_every,
        )
        add_job(
            scheduler,
            DELIVER_JOB,
            lambda: deliver_job(ctx.store, settings, ctx.clock(), client),
            settings.alerts.deliver_every,
        )
    else:  # pragma: no cover - the repository module always makes one
        log.error("no scheduler on the app: alerts are not evaluated nor delivered")
    try:
        yield
    finally:
        if scheduler is not None:
            for job in (EVALUATE_JOB, DELIVER_JOB):
                if scheduler.get_job(job) is not None:
                    scheduler.remove_job(job)
        client.close()


def get_webhooks(db: DB) -> WebhookService:
    return WebhookService(db)


Webhooks = Annotated[WebhookService, Depends(get_webhooks)]


class NewWebhook(BaseModel):
    url: str = Field(max_length=2048, description="http(s):// URL that receives alert POSTs")
    secret: str = Field(min_length=16, max_length=256, description="HMAC-SHA256 key, 16+ chars")


@router.get("/webhooks", summary="List webhooks, without their secrets (admin)")
def list_webhooks(webhooks: Webhooks, _: Admin) -> list[Webhook]:
    return webhooks.all()


@router.post("/webhooks", status_code=201, summary="Add a webhook for alert events (admin)")
def add_webhook(body: NewWebhook, webhooks: Webhooks, who: Admin, now: Now) -> Webhook:
    return webhooks.add(body.url, body.secret, who.actor.id, now)


@router.delete("/webhooks/{webhook_id}", summary="Disable a webhook (admin)")
def disable_webhook(webhook_id: str, webhooks: Webhooks, _: Admin, now: Now) -> Webhook:
    return webhooks.disable(webhook_id, now)
