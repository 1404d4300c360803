"""The health snapshot: problems found, JSON round trip, and /, /health, /metrics over HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.config import Listen
from agent.health import (
    DriftFigures,
    FeatureVerdict,
    HealthSnapshot,
    InferenceFigures,
    ModelFigures,
    SystemFigures,
    UpdateFigures,
    assemble,
    render_html,
    render_prometheus,
    render_text,
)
from agent.http_server import HttpServer, health_server

NOW = 1_750_000_000.0


def snapshot(**changes: object) -> HealthSnapshot:
    parts: dict[str, object] = {
        "agent_version": "0.1.0",
        "device_id": "gw-0001",
        "profile": "x86_64-gateway",
        "now": NOW,
        "started_at": NOW - 3725,
        "model": ModelFigures("pdm-classifier", 2, "b", "onnxruntime", "onnx", NOW - 60),
        "broker_connected": True,
        "outbox_depth": 3,
        "outbox_oldest_age_seconds": 1.5,
        "inference": InferenceFigures(
            requests=10,
            rows=640,
            rejected=1,
            errors=0,
            p50_ms=0.2,
            p95_ms=0.5,
            p99_ms=0.9,
            latency_count=10,
            latency_seconds_total=0.004,
            latency_buckets=((0.0001, 0), (0.00025, 6), (0.0005, 9), (0.001, 10)),
        ),
        "drift": DriftFigures(
            window_end=NOW - 30,
            rows=5000,
            drifted=True,
            features=(
                FeatureVerdict('temp "C"', False, 0.01, 0.02, 0.03),
                FeatureVerdict("vib<rms>", True, 0.4, 0.2, 0.25),
            ),
        ),
        "update": UpdateFigures("committed", "committed v2", "", NOW - 100),
        "system": SystemFigures(50 << 20, 8 << 30, 6 << 30, 64 << 30, 40 << 30, 1.5),
    }
    parts.update(changes)
    return assemble(**parts)  # type: ignore[arg-type]


def test_healthy_has_no_problems() -> None:
    s = snapshot(drift=None)
    assert s.ok and s.problems == ()
    assert s.uptime_seconds == 3725


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"model": None}, "no model is installed"),
        ({"broker_connected": False}, "not connected to the MQTT broker"),
        ({"outbox_oldest_age_seconds": 7300.0}, "oldest unsent report is 2h 1m old"),
        ({"inference": InferenceFigures(errors=2)}, "2 inference error(s)"),
        ({}, "input drift in the last window: vib<rms>"),
        ({"update": UpdateFigures("rolled_back", "", "trial p95 too high")}, "trial p95"),
    ],
)
def test_problems(changes: dict[str, object], says: str) -> None:
    s = snapshot(**changes)
    assert not s.ok
    assert any(says in p for p in s.problems), s.problems


def test_json_round_trip() -> None:
    s = snapshot()
    doc = json.loads(json.dumps(s.to_dict()))
    assert doc["status"] == "degraded"
    assert HealthSnapshot.from_dict(doc) == s
    empty = snapshot(model=None, drift=None, update=None)
    assert HealthSnapshot.from_dict(json.loads(json.dumps(empty.to_dict()))) == empty


def test_text_lists_everything() -> None:
    text = render_text(snapshot())
    for needle in ("gw-0001", "pdm-classifier v2", "slot", "0.50 ms", "vib<rms>", "committed v2"):
        assert needle in text


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_html_escapes_and_fits_a_phone() -> None:
    page = render_html(snapshot())
    parser = _Collector()
    parser.feed(page)
    text = "".join(parser.text)
    assert 'temp "C"' in text and "vib<rms>" in text  # escaped in the markup, intact as text
    assert "<rms>" not in page
    assert 'name="viewport"' in page and "script" not in parser.tags


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_prometheus_text() -> None:
    m = parse_metrics(render_prometheus(snapshot()))
    assert m[("edgefleet_agent_inference_requests_total", ())] == 10
    assert m[("edgefleet_agent_inference_latency_seconds_bucket", (("le", "0.00025"),))] == 6
    assert m[("edgefleet_agent_inference_latency_seconds_bucket", (("le", "+Inf"),))] == 10
    assert m[("edgefleet_agent_drift_psi", (("feature", 'temp "C"'),))] == 0.01
    assert m[("edgefleet_agent_drift_feature_drifted", (("feature", "vib<rms>"),))] == 1
    labels = (("format", "onnx"), ("name", "pdm-classifier"), ("runtime", "onnxruntime"))
    assert m[("edgefleet_agent_model_version", (*labels, ("slot", "b")))] == 2
    assert m[("edgefleet_agent_up", ())] == 0


@pytest.fixture
def server() -> Iterator[tuple[HttpServer, list[HealthSnapshot]]]:
    current = [snapshot()]
    srv = health_server(Listen("127.0.0.1", 0), lambda: current[0])
    srv.start()
    try:
        yield srv, current
    finally:
        srv.stop()


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def test_over_http(server: tuple[HttpServer, list[HealthSnapshot]]) -> None:
    srv, current = server
    status, ctype, body = get(srv.url + "/health")
    assert status == 200 and ctype == "application/json"
    assert HealthSnapshot.from_dict(json.loads(body)) == current[0]

    status, ctype, body = get(srv.url + "/")
    assert status == 200 and ctype.startswith("text/html")
    assert "pdm-classifier v2" in body and "gw-0001" in body

    status, ctype, body = get(srv.url + "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    assert parse_metrics(body)[("edgefleet_agent_outbox_depth", ())] == 3

    current[0] = snapshot(model=None, broker_connected=False)  # every request is a new snapshot
    body = get(srv.url + "/health")[2]
    assert json.loads(body)["model"] is None and json.loads(body)["broker_connected"] is False
    assert "none installed" in get(srv.url + "/")[2]
    assert ("edgefleet_agent_broker_connected", ()) in parse_metrics(get(srv.url + "/metrics")[2])

    status, _, body = get(srv.url + "/nope")
    assert status == 404 and "/health" in json.loads(body)["error"]


def test_snapshot_failure_is_a_500_that_says_why() -> None:
    def broken() -> HealthSnapshot:
        raise RuntimeError("outbox database is locked")

    srv = health_server(Listen("127.0.0.1", 0), broken)
    srv.start()
    try:
        status, _, body = get(srv.url + "/health")
    finally:
        srv.stop()
    assert status == 500 and "outbox database is locked" in json.loads(body)["error"]
