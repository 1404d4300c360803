"""Metrics and logs: requests counted by route template, database gauges read at scrape time,
one JSON object per log line with the extra fields at the top level."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleet.logs import JsonFormatter, configure_logging
from fleet.metrics import CallbackGauge, FleetMetrics


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_requests_are_counted_by_route_template(http: httpx.Client, viewer: dict[str, str]) -> None:
    for device in ("dev-aaaaaaaaaaaa", "dev-bbbbbbbbbbbb"):
        assert http.get(f"/v1/devices/{device}", headers=viewer).status_code == 404
    http.get("/no/such/path")
    got = samples(http.get("/metrics").text)
    key = (
        "edgefleet_http_requests_total",
        (("method", "GET"), ("route", "/v1/devices/{device_id}"), ("status", "404")),
    )
    assert got[key] == 2
    unmatched = (
        "edgefleet_http_requests_total",
        (("method", "GET"), ("route", "<unmatched>"), ("status", "404")),
    )
    assert got[unmatched] == 1
    assert not any("dev-aaaaaaaaaaaa" in str(labels) for _, labels in got)
    assert any(name == "edgefleet_http_request_duration_seconds_count" for name, _ in got)


def test_device_gauge_reads_the_database(
    http: httpx.Client, admin: dict[str, str], tuf_repo: object
) -> None:
    secret = http.post("/v1/enrollment-tokens", json={"uses": 2}, headers=admin).json()["secret"]
    body = {
        "token": secret,
        "profile": "x86_64-gateway",
        "facts": {"arch": "x86_64", "ram_mb": 512, "agent_version": "0.1.0"},
    }
    ids = [
        http.post("/v1/enroll", json={**body, "public_key": key}).json()["device_id"]
        for key in ("11" * 32, "22" * 32)
    ]
    http.post(f"/v1/devices/{ids[0]}/decommission", headers=admin)
    got = samples(http.get("/metrics").text)
    assert got[("edgefleet_devices", (("online", "false"), ("status", "active")))] == 1
    assert got[("edgefleet_devices", (("online", "false"), ("status", "decommissioned")))] == 1


def test_a_failing_gauge_does_not_break_the_scrape(caplog: pytest.LogCaptureFixture) -> None:
    metrics = FleetMetrics()

    def broken() -> dict[tuple[str, ...], float]:
        raise RuntimeError("db gone")

    metrics.add(CallbackGauge("edgefleet_broken", "always fails", ["x"], broken))
    body, content_type = metrics.render()
    assert b"edgefleet_http_requests_total" in body and content_type.startswith("text/plain")
    assert "edgefleet_broken could not be read" in caplog.text


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_logs_one_object_per_line(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("INFO", json_lines=True, stream=stream)
    log = logging.getLogger("fleet.test")
    log.info("device %s enrolled", "dev-1", extra={"device_id": "dev-1", "n": 3})
    log.debug("hidden")
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        log.exception("it failed")
    logging.getLogger("uvicorn.error").warning("from uvicorn")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 3
    first = lines[0]
    assert first["msg"] == "device dev-1 enrolled" and first["level"] == "INFO"
    assert first["logger"] == "fleet.test" and first["device_id"] == "dev-1" and first["n"] == 3
    assert first["ts"].endswith("+00:00")
    assert "ValueError: bad" in lines[1]["exc"]
    assert lines[2]["logger"] == "uvicorn.error"


def test_text_logs_for_a_terminal(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("INFO", json_lines=False, stream=stream)
    logging.getLogger("fleet.test").info("hello")
    assert stream.getvalue().strip().endswith("INFO fleet.test: hello")


def test_the_formatter_never_fails_on_odd_extras() -> None:
    record = logging.makeLogRecord({"msg": "x", "levelname": "INFO", "name": "n"})
    record.__dict__["obj"] = object()
    record.__dict__["color_message"] = "\x1b[36mx\x1b[0m"  # uvicorn's; dropped
    doc = json.loads(JsonFormatter().format(record))
    assert doc["obj"].startswith("<object") and "color_message" not in doc
