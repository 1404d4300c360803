"""Alerts (viewer to read, operator to acknowledge or evaluate now).

``GET /v1/alerts`` lists alerts (``state=open|resolved|all``, ``kind``, ``subject``);
``GET /v1/alerts/{id}`` is one alert with its webhook deliveries. The rules run on the
scheduler (``evaluate_alerts``, see :mod:`fleet.routes.webhooks`); ``POST /v1/alerts/evaluate``
runs them at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from fleet.alert_service import AlertService, Evaluation
from fleet.auth import Operator, Viewer
from fleet.dependencies import DB, Context, Now
from fleet.webhooks import Delivery

router = APIRouter(prefix="/v1", tags=["alerts"])


def get_alerts(db: DB, ctx: Context) -> AlertService:
    return AlertService(db, ctx.settings)


Alerts = Annotated[AlertService, Depends(get_alerts)]


@dataclass(frozen=True)
class AlertDetail:
    alert: dict[str, Any]
    deliveries: list[Delivery]


@router.get("/alerts", summary="List alerts, newest first (viewer)")
def list_alerts(
    alerts: Alerts,
    _: Viewer,
    state: Annotated[str, Query(pattern="^(open|resolved|all)$")] = "open",
    kind: str | None = None,
    subject: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> list[dict[str, Any]]:
    return [a.to_dict() for a in alerts.find(state, kind, subject, limit)]


@router.get("/alerts/{alert_id}", summary="One alert and its webhook deliveries (viewer)")
def show_alert(alert_id: str, alerts: Alerts, _: Viewer) -> AlertDetail:
    alert = alerts.get(alert_id)
    return AlertDetail(alert.to_dict(), alerts.webhooks.deliveries(alert_id))


@router.post("/alerts/{alert_id}/acknowledge", summary="Acknowledge an alert (operator)")
def acknowledge(alert_id: str, alerts: Alerts, who: Operator, now: Now) -> dict[str, Any]:
    return alerts.acknowledge(alert_id, who.actor.id, now).to_dict()


@router.post("/alerts/evaluate", summary="Run the alert rules now (operator)")
def evaluate_now(alerts: Alerts, _: Operator, now: Now) -> Evaluation:
    return alerts.evaluate(now)
