"""``GET /metrics``: Prometheus exposition text of this app's registry.

Policy: public by default (``metrics_auth = "none"``), as Prometheus scrapes usually run on an
internal network; in that case keep ``/metrics`` off the public reverse proxy. With
``metrics_auth = "viewer"`` (``EDGEFLEET_METRICS_AUTH=viewer``) a scrape needs a viewer token
(Prometheus: ``authorization: {credentials: efo_...}``). Metrics hold counts, never secrets.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from fleet.auth import authenticate
from fleet.dependencies import Context, Now, Tokens

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    summary="Prometheus metrics (public unless metrics_auth = viewer)",
    response_class=Response,
)
def metrics(request: Request, ctx: Context, tokens: Tokens, now: Now) -> Response:
    if ctx.settings.metrics_auth == "viewer":
        authenticate(request, tokens, now)  # any role may read metrics
    body, content_type = ctx.metrics.render()
    return Response(body, media_type=content_type)
