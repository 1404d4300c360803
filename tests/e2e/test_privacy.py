"""No raw input leaves the device: a real ``edge-agent run`` serves distinctive inputs while
everything it sends is captured, and no input value appears anywhere in it, nor in the fleet's
database; only counts and sums over windows of many rows do (at least ``drift_min_rows``, or
the agent's privacy floor for a window cut short by an update or a stop).

Captured: every message on the broker (a client subscribed to ``#``: state, heartbeats, drift
summaries, update transitions) and every HTTP request the agent makes to the fleet (method,
target, headers, body, through a recording proxy on loopback that the agent's ``fleet_url``
points at), including a signed update it downloads while serving the inputs.

The inputs are a few float32 values whose shortest decimal forms are long and unusual; each is
searched for in every captured byte string in its decimal forms (float32 and float64 repr,
``%.6g``) and as little-endian float32 and float64 bytes.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import sqlite3
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from typing import Any

import httpx
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.client import AgentClientError
from agent.config import StatePaths, load_config, render_config
from agent.drift import WindowPolicy

# float32-exact inputs with long, unusual decimal forms (a chance match in a summary is unlikely)
SECRETS = np.array(
    [0.7391873, 1.3862944, 0.5772157, 2.4142137, 0.3183099, 1.6180339, 0.9159656, 1.2020569],
    dtype=np.float32,
)
MIN_ROWS = 50


def needles(values: np.ndarray) -> list[bytes]:
    """Each input value as it could appear on the wire: text forms and raw bytes."""
    out: set[bytes] = set()
    for v in values.astype(np.float32):
        for text in (repr(float(v)), str(v), f"{float(v):.6g}", f"{float(v):.7f}"):
            out.add(text.encode())
        out.add(struct.pack("<f", float(v)))
        out.add(struct.pack("<d", float(v)))
    return sorted(out)


def leaks(blob: bytes, found_in: str, values: np.ndarray) -> list[str]:
    return [f"{n!r} in {found_in}" for n in needles(values) if n in blob]


class Recorder(http.server.ThreadingHTTPServer):
    """A loopback HTTP proxy to the fleet that keeps every request it forwards."""

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = upstream
        self.requests: list[bytes] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: Recorder

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
        pass

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        head = f"{self.command} {self.path}\n{self.headers}".encode()
        with self.server.lock:
            self.server.requests.append(head + b"\n" + body)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        with httpx.Client(timeout=30) as client:
            r = client.request(
                self.command, self.server.upstream + self.path, headers=headers, content=body
            )
        self.send_response(r.status_code)
        for k, v in r.headers.items():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(r.content)))
        self.end_headers()
        self.wfile.write(r.content)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward


@pytest.fixture
def recorder(stack: Any) -> Iterator[Recorder]:
    server = Recorder(stack.url)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


class Sniffer:
    """Every message any device publishes, as the broker delivers it to a ``#`` subscriber."""

    def __init__(self, broker: Any) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.on_connect = lambda c, *a: c.subscribe("#", qos=1)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self.subscribed.wait(10)

    def _on_message(self, c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def of(self, device: str, suffix: str) -> list[dict[str, Any]]:
        with self.lock:
            return [
                json.loads(p)
                for t, p in self.messages
                if t.startswith(f"edgefleet/v1/devices/{device}/") and t.endswith(suffix) and p
            ]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def sniffer(stack: Any) -> Iterator[Sniffer]:
    s = Sniffer(stack.broker)
    yield s
    s.close()


def secret_rows(n: int, features: int) -> np.ndarray:
    """``n`` rows made only of the secret values (each row a different rotation)."""
    idx = (np.arange(n)[:, None] + np.arange(features)[None, :]) % len(SECRETS)
    return SECRETS[idx]


def start_device(
    stack: Any, devices: Callable[..., Any], fleet_url: str, window: float, kit: Any
) -> Any:
    """A provisioned device talking to the fleet through ``fleet_url``, with fast telemetry,
    started (not yet asked for a prediction)."""
    device = devices(stack, start=False)
    config = load_config(device.state)
    config = dataclasses.replace(
        config,
        device=dataclasses.replace(config.device, fleet_url=fleet_url),
        telemetry=dataclasses.replace(
            config.telemetry,
            heartbeat_seconds=0.5,
            drift_window_seconds=window,
            drift_min_rows=MIN_ROWS,
        ),
    )
    StatePaths(device.state).config.write_bytes(render_config(config))
    device.start()
    kit.wait_for("the health page", lambda: _up(device.health_url), 90)
    return device


def _served(device: Any, row: np.ndarray) -> bool:
    try:
        device.predict(row, timeout=5)
        return True
    except (AgentClientError, OSError):  # not serving yet: no row was taken
        return False


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def all_leaks(sniffer: Sniffer, recorder: Recorder, stack: Any) -> list[str]:
    found: list[str] = []
    with sniffer.lock:
        for topic, payload in sniffer.messages:
            found += leaks(topic.encode() + b" " + payload, f"MQTT {topic}", SECRETS)
    for request in recorder.requests:
        found += leaks(request, f"HTTP {request[:60]!r}", SECRETS)
    with closing(sqlite3.connect(stack.settings.db_path)) as db:
        dump = "\n".join(db.iterdump()).encode()
    return found + leaks(dump, "the fleet database", SECRETS)


def test_no_raw_input_leaves_the_device(
    stack: Any,
    devices: Callable[..., Any],
    kit: Any,
    recorder: Recorder,
    sniffer: Sniffer,
) -> None:
    device = start_device(stack, devices, recorder.url, 1.0, kit)
    device.wait_serving()
    rows = secret_rows(4 * MIN_ROWS, kit.traffic_rows(1).shape[1])

    # serve the secrets, and update the model meanwhile (the trial needs traffic)
    traffic = kit.Traffic(device.predict_url, rows)
    try:
        stack.assign(device.id, 2)
        # the trial may well refuse v2 on these odd inputs: either way the device downloaded it
        # and reported every step (a refusal's reason included)
        assert stack.wait_final(device.id, 2)["to_state"] in ("committed", "rolled_back")
        kit.wait_for(
            "a drift summary of the served rows",
            lambda: sum(d["body"]["n"] for d in sniffer.of(device.id, "/drift")) >= MIN_ROWS,
            60,
        )
        kit.wait_for("a heartbeat", lambda: sniffer.of(device.id, "/heartbeat"), 30)
    finally:
        traffic.close()
    assert traffic.errors == [], traffic.errors[:3]
    device.stop()

    # the capture saw real traffic: reports on every topic and signed downloads over HTTP
    for suffix in ("/state", "/telemetry/heartbeat", "/telemetry/drift", "/update"):
        assert sniffer.of(device.id, suffix), suffix
    assert any(b"/v1/repository/targets/" in r for r in recorder.requests), recorder.requests[:3]
    summaries = sniffer.of(device.id, "/drift")
    floor = WindowPolicy().min_report_rows  # a window cut short (update, stop) may be smaller
    assert all(s["body"]["n"] >= floor for s in summaries), [s["body"]["n"] for s in summaries]

    found = all_leaks(sniffer, recorder, stack)
    assert found == [], found[:10]


def test_a_window_of_one_row_never_leaves_the_device(
    stack: Any,
    devices: Callable[..., Any],
    kit: Any,
    recorder: Recorder,
    sniffer: Sniffer,
) -> None:
    """One row served, then the agent stops: the window it cuts short would carry that row's
    inputs as its per-feature sums, so it is dropped, not sent."""
    device = start_device(stack, devices, recorder.url, 3600.0, kit)
    row = secret_rows(1, kit.traffic_rows(1).shape[1])
    kit.wait_for("the one prediction", lambda: _served(device, row), 30)
    kit.wait_for(
        "a heartbeat counting it",
        lambda: any(
            h["body"]["inferences_total"] >= 1 for h in sniffer.of(device.id, "/heartbeat")
        ),
        30,
    )
    device.stop()
    kit.wait_for(
        "the offline state",
        lambda: any(not m["body"]["online"] for m in sniffer.of(device.id, "/state")),
        30,
    )
    assert sniffer.of(device.id, "/drift") == []
    found = all_leaks(sniffer, recorder, stack)
    assert found == [], found[:10]


def test_the_leak_check_finds_a_leaked_value() -> None:
    """The search above would see a raw value in any of the forms it could be sent in."""
    value = SECRETS[3:4]
    for blob in (
        json.dumps({"x": float(value[0])}).encode(),
        json.dumps({"rows": value.tolist()}).encode(),
        value.tobytes(),
        value.astype(np.float64).tobytes(),
        f"{float(value[0]):.6g}".encode(),
    ):
        assert leaks(blob, "blob", SECRETS), blob
    assert not leaks(
        json.dumps({"n": 200, "sum": float(SECRETS.sum() * 25)}).encode(), "x", SECRETS
    )
