"""Prometheus metrics of one app: its own registry, HTTP request counters, gauges read at scrape.

Each :class:`FleetMetrics` owns a ``CollectorRegistry`` (not the process-global one), so two
apps in one process (tests) never clash. Other parts add their metrics to ``registry``, or a
:class:`CallbackGauge` for values that live in the database (read at scrape time, so they are
never stale and cost nothing between scrapes). HTTP requests are labelled by route template
(``/v1/devices/{device_id}``), never the raw path, to keep label cardinality bounded.

This module measures; it decides nothing about who may read ``/metrics`` (see
:mod:`fleet.routes.metrics`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)
http_log = logging.getLogger("fleet.http")

# paths polled by machines; their request log lines go to DEBUG
_QUIET_ROUTES = frozenset({"/healthz", "/metrics"})


class CallbackGauge(Collector):
    """A gauge family whose samples come from ``read()`` at each scrape: ``{labels: value}``."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str],
        read: Callable[[], Mapping[tuple[str, ...], float]],
    ) -> None:
        self.name, self.documentation, self.labels, self.read = name, documentation, labels, read

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.name, self.documentation, labels=list(self.labels))

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=list(self.labels))
        try:
            samples = self.read()
        except Exception:  # a scrape must not fail because one source did
            log.exception("metric %s could not be read", self.name)
            samples = {}
        for labels, value in samples.items():
            family.add_metric(list(labels), value)
        yield family


class FleetMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter(
            "edgefleet_http_requests_total",
            "HTTP requests by method, route template and status code",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "edgefleet_http_request_duration_seconds",
            "HTTP request duration by method and route template",
            ["method", "route"],
            registry=self.registry,
        )

    def add(self, collector: Collector) -> None:
        self.registry.register(collector)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestMetricsMiddleware:
    """ASGI middleware: count and time every HTTP request, and log one line per request."""

    def __init__(self, app: ASGIApp, metrics: FleetMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            elapsed = time.perf_counter() - start
            # the router stores the matched route in the scope; unmatched paths share one label
            route = getattr(scope.get("route"), "path", None) or "<unmatched>"
            method = scope["method"]
            self.metrics.http_requests.labels(method, route, str(status)).inc()
            self.metrics.http_duration.labels(method, route).observe(elapsed)
            http_log.log(
                logging.DEBUG if route in _QUIET_ROUTES and status < 400 else logging.INFO,
                "%s %s %d",
                method,
                scope["path"],
                status,
                extra={
                    "method": method,
                    "path": scope["path"],
                    "route": route,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 2),
                    "client": (scope.get("client") or ("", 0))[0],
                },
            )
