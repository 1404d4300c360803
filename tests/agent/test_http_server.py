"""The predict API over real HTTP on loopback, and the Python client against it."""

from __future__ import annotations

import http.client
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.bundle_install import install_bundle
from agent.client import AgentClient, AgentClientError
from agent.config import Listen
from agent.drift import DriftAccumulator
from agent.http_server import HttpServer, predict_server
from agent.inference import InferenceService, load_model
from agent.slots import Slots
from firmware_profiles import load_profile
from protocol.golden import GoldenSet

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "models" / "bundles" / "pdm-classifier" / "1"
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HttpServer, np.ndarray]]:
    slots = Slots(tmp_path_factory.mktemp("state") / "slots")
    installed = install_bundle(BUNDLE, slots, load_profile("x86_64-gateway")).installed
    service = InferenceService(max_rows=100)
    service.swap(load_model(installed, 1, DriftAccumulator))
    golden = GoldenSet.from_json(installed.file(installed.release.golden).read_bytes())
    server = predict_server(Listen("127.0.0.1", 0), service, MAX_BODY)
    server.start()
    try:
        yield server, np.array(golden.inputs)
    finally:
        server.stop()
        service.close()


def post(
    server: HttpServer, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection(server.address.host, server.address.port, timeout=10)
    try:
        conn.request("POST", "/v1/predict", body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_predict_good(served: tuple[HttpServer, np.ndarray]) -> None:
    server, x = served
    status, doc = post(server, json.dumps({"inputs": x[:3].tolist()}).encode())
    assert status == 200
    assert doc["model"] == {"name": "pdm-classifier", "version": 1}
    assert len(doc["outputs"]) == 3 and len(doc["outputs"][0]) == 5
    assert doc["classes"][0] in (
        "normal",
        "imbalance",
        "misalignment",
        "bearing_wear",
        "overheating",
    )
    assert np.allclose(np.sum(doc["outputs"], axis=1), 1.0, atol=0.05)  # softmax rows


def test_client(served: tuple[HttpServer, np.ndarray]) -> None:
    server, x = served
    with AgentClient(server.url) as client:
        one = client.predict(x[:1])
        many = client.predict(x[:64].tolist())  # the same kept-alive connection
        assert one.model_name == "pdm-classifier" and one.model_version == 1
        assert len(many.outputs) == 64 and many.classes[0] == one.classes[0]
        info = client.model()
        assert info["slot"] == "a" and len(info["feature_names"]) == 24
        with pytest.raises(AgentClientError) as err:
            client.predict([[1.0, 2.0]])
        assert err.value.status == 400 and "rows of 24 features" in err.value.message
        assert client.predict(x[:1]).classes == one.classes  # usable after an error


def test_client_unreachable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(AgentClientError) as err:
        AgentClient(f"http://127.0.0.1:{port}", timeout=2).predict([[0.0]])
    assert err.value.status == 0 and "edge-agent run" in err.value.message


def test_client_bad_url() -> None:
    with pytest.raises(ValueError, match="http://HOST:PORT"):
        AgentClient("127.0.0.1:8471")


ROW = [0.5] * 24


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"\xff\xfe", 400, "not valid JSON"),
        (b"[1, 2]", 400, 'a JSON object with "inputs"'),
        (b'{"rows": [[1]]}', 400, 'a JSON object with "inputs"'),
        (b'{"inputs": []}', 400, "non-empty list of rows"),
        (b'{"inputs": [[1, 2]]}', 400, "takes rows of 24 features"),
        (json.dumps({"inputs": [ROW, ROW[:-1]]}).encode(), 400, "different lengths [23, 24]"),
        (json.dumps({"inputs": [ROW[:-1] + ["x"]]}).encode(), 400, "row 0 column 23 is str"),
        (json.dumps({"inputs": [ROW[:-1] + [None]]}).encode(), 400, "row 0 column 23 is NoneType"),
        (json.dumps({"inputs": [ROW] * 101}).encode(), 413, "101 rows is over the limit of 100"),
        (b'{"inputs": [[' + b"1, " * 23 + b"NaN]]}", 422, "row 0 of the batch hold NaN"),
        (b'{"inputs": [[' + b"1, " * 23 + b"Infinity]]}", 422, "NaN or infinite"),
        (b'{"inputs": [[' + b"1, " * 23 + b"1e999]]}", 422, "NaN or infinite"),
    ],
)
def test_bad_requests(
    served: tuple[HttpServer, np.ndarray], body: bytes, status: int, says: str
) -> None:
    got, doc = post(served[0], body)
    assert got == status
    assert says in doc["error"]


def recv_all(s: socket.socket) -> str:
    """Everything the server sends until it closes the connection."""
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks).decode()


def test_body_too_large_is_refused_unread(served: tuple[HttpServer, np.ndarray]) -> None:
    server = served[0]
    with socket.create_connection((server.address.host, server.address.port), timeout=10) as s:
        s.sendall(
            b'POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n{"inputs"'
        )
        reply = recv_all(s)
    assert reply.startswith("HTTP/1.1 413")
    assert "over the limit of 65536" in reply and "Connection: close" in reply


def test_no_content_length(served: tuple[HttpServer, np.ndarray]) -> None:
    server = served[0]
    with socket.create_connection((server.address.host, server.address.port), timeout=10) as s:
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        assert recv_all(s).startswith("HTTP/1.1 411")


def test_unknown_paths(served: tuple[HttpServer, np.ndarray]) -> None:
    server = served[0]
    conn = http.client.HTTPConnection(server.address.host, server.address.port, timeout=10)
    conn.request("GET", "/v1/predict")
    r = conn.getresponse()
    assert r.status == 404 and "POST /v1/predict" in json.loads(r.read())["error"]
    conn.close()


def test_no_model_is_503(tmp_path: Path) -> None:
    server = predict_server(Listen("127.0.0.1", 0), InferenceService(), MAX_BODY)
    server.start()
    try:
        status, doc = post(server, json.dumps({"inputs": [ROW]}).encode())
        assert status == 503 and "edge-agent model install" in doc["error"]
        with pytest.raises(AgentClientError) as err:
            AgentClient(server.url).model()
        assert err.value.status == 503
    finally:
        server.stop()


def test_port_in_use_says_what_to_change(served: tuple[HttpServer, np.ndarray]) -> None:
    taken = served[0].address
    with pytest.raises(OSError, match="cannot listen on 127.0.0.1:.* http.predict_listen"):
        predict_server(taken, InferenceService(), MAX_BODY)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_an_idle_server_sleeps_and_still_stops(host: str) -> None:
    """No request: the server's thread is not woken to look at its shutdown flag (at 0.2 s it
    woke 5 times a second), and stop wakes it (a wildcard address through loopback)."""
    server = predict_server(Listen(host, 0), InferenceService(max_rows=1), MAX_BODY)
    others = set(threading.enumerate())  # the module's served server has one of the same name
    server.start()
    try:
        time.sleep(0.3)
        [thread] = [t for t in set(threading.enumerate()) - others if t.name == "http-predict"]
        status = Path(f"/proc/self/task/{thread.native_id}/status")

        def wake_ups() -> int:
            lines = status.read_text().splitlines()
            return next(int(line.split()[1]) for line in lines if line.startswith("vol"))

        before = wake_ups()
        time.sleep(2)
        woken = wake_ups() - before
    finally:
        stopper = threading.Thread(target=server.stop, daemon=True)
        stopper.start()
        stopper.join(30)  # a stop that waited for the hour-long poll would still be running
    assert not stopper.is_alive() and not thread.is_alive()
    assert woken <= 1, woken
