"""The agent's two HTTP servers (stdlib ``http.server``, one thread per connection).

* The **predict server** (default ``127.0.0.1:8471``, local applications only):
  ``POST /v1/predict`` ``{"inputs": [[...], ...]}`` → ``{"outputs": [[...]], "classes": [...],
  "model": {"name", "version"}}``; ``GET /v1/model`` names the active model. Errors are
  ``{"error": "<what was wrong and what to do>"}`` with 400 (malformed JSON, wrong shape or
  types), 411 (no Content-Length), 413 (body or batch too large), 422 (NaN/inf under the
  reject policy), 503 (no model installed), 500 (the runtime failed).
* The **health server** (the LAN address, default ``0.0.0.0:8470``, for field technicians):
  ``GET /health`` JSON, ``GET /`` an HTML page, ``GET /metrics`` Prometheus text.

The two are separate so the predict API never listens on the LAN by accident. This module parses
requests and renders responses; what a prediction or a snapshot is comes from
:mod:`agent.inference` and :mod:`agent.health`.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from agent.config import Listen
from agent.errors import InferenceError
from agent.health import HealthSnapshot, render_html, render_prometheus
from agent.inference import InferenceService, InputError, NoModelError

log = logging.getLogger(__name__)

PREDICT_PATH = "/v1/predict"
MODEL_PATH = "/v1/model"
LINGER_BYTES = 1024 * 1024  # at most this much of a refused body is read and dropped
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
IDLE_POLL_S = 3600.0  # how often an idle server looks at its shutdown flag (stop wakes it)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a local app reuses its connection
    server_version = "edgefleet-agent"
    sys_version = ""
    timeout = 60  # an idle keep-alive connection is closed after this many seconds
    # headers and body go out as separate writes: without TCP_NODELAY, Nagle's algorithm
    # holds the body until the client's delayed ACK (40 ms) on every keep-alive request
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    def send_body(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status: int, doc: Any) -> None:
        self.send_body(status, "application/json", json.dumps(doc).encode())

    def send_error_json(self, status: int, message: str) -> None:
        self.send_json(status, {"error": message})


class PredictHandler(_Handler):
    service: InferenceService
    max_body_bytes: int
    _linger = False

    def finish(self) -> None:
        super().finish()
        if self._linger:
            self._drain()

    def _drain(self) -> None:
        """After refusing a body unread, read (and drop) what the client is still sending for
        a moment before closing: closing a socket with unread data makes the kernel send a
        reset, which can destroy our error response before the client reads it."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(1.0)
            drained = 0
            while drained < LINGER_BYTES and (chunk := self.connection.recv(65536)):
                drained += len(chunk)
        except OSError:
            pass

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        if self.path.split("?", 1)[0] != PREDICT_PATH:
            self.close_connection = True  # the body was not read
            self.send_error_json(404, f"no such endpoint; POST {PREDICT_PATH}")
            return
        body = self._read_body()
        if body is None:
            return
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            self.send_error_json(400, f'body is not valid JSON ({exc}); send {{"inputs": [[...]]}}')
            return
        if not isinstance(doc, dict) or "inputs" not in doc:
            self.send_error_json(400, 'body must be a JSON object with "inputs": [[...], ...]')
            return
        try:
            result = self.service.predict_json(doc["inputs"])
        except InputError as exc:
            self.send_error_json(exc.status, str(exc))
            return
        except NoModelError as exc:
            self.send_error_json(503, str(exc))
            return
        except InferenceError as exc:
            log.error("inference failed: %s", exc)
            self.send_error_json(500, f"the model failed on this batch: {exc}")
            return
        self.send_json(
            200,
            {
                "outputs": result.outputs.tolist(),
                "classes": result.classes,
                "model": {"name": result.model_name, "version": result.model_version},
            },
        )

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        if self.path.split("?", 1)[0] != MODEL_PATH:
            self.send_error_json(404, f"no such endpoint; POST {PREDICT_PATH} or GET {MODEL_PATH}")
            return
        model = self.service.current()
        if model is None:
            self.send_error_json(
                503, "no model is installed; install one with `edge-agent model install BUNDLE_DIR`"
            )
            return
        r = model.release
        self.send_json(
            200,
            {
                "name": r.name,
                "version": r.version,
                "slot": model.installed.slot,
                "runtime": r.runtime,
                "format": r.format,
                "feature_names": list(r.feature_names),
                "class_names": list(r.class_names),
            },
        )

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            self._linger = True
            self.send_error_json(411, "chunked bodies are not accepted; send Content-Length")
            return None
        length_text = self.headers.get("Content-Length")
        if length_text is None or not length_text.strip().isdigit():
            self.close_connection = True
            self.send_error_json(411, "send a Content-Length header with the JSON body")
            return None
        length = int(length_text)
        if length > self.max_body_bytes:
            self.close_connection = True  # the body stays unread
            self._linger = True
            self.send_error_json(
                413,
                f"body of {length} bytes is over the limit of {self.max_body_bytes}; split the "
                "batch into smaller requests",
            )
            return None
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            self.send_error_json(400, f"body ended after {len(body)} of {length} bytes")
            return None
        return body


class HealthHandler(_Handler):
    snapshot: Callable[[], HealthSnapshot]

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        path = self.path.split("?", 1)[0]
        if path not in ("/", "/health", "/metrics"):
            self.send_error_json(404, "no such page; try /, /health or /metrics")
            return
        try:
            snap = self.snapshot()
        except Exception as exc:  # the page must say why rather than hang up
            log.exception("health snapshot failed")
            self.send_error_json(500, f"could not assemble the health snapshot: {exc}")
            return
        if path == "/health":
            self.send_json(200, snap.to_dict())
        elif path == "/metrics":
            self.send_body(200, PROMETHEUS_TYPE, render_prometheus(snap).encode())
        else:
            self.send_body(200, "text/html; charset=utf-8", render_html(snap).encode())

    do_HEAD = do_GET  # noqa: N815 - stdlib name


class HttpServer:
    """One threading HTTP server running in a background thread."""

    def __init__(self, name: str, listen: Listen, handler: type[BaseHTTPRequestHandler]) -> None:
        self.name = name
        server_class = type(
            "_Server6" if ":" in listen.host else "_Server4",
            (_Server,),
            {"address_family": socket.AF_INET6 if ":" in listen.host else socket.AF_INET},
        )
        try:
            self._server = server_class((listen.host, listen.port), handler)
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"cannot listen on {listen} for the {name} server ({exc.strerror}); another "
                f"process may hold the port — change http.{name}_listen in agent.toml",
            ) from exc
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> Listen:
        host, port = self._server.server_address[:2]
        return Listen(str(host), int(port))

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self) -> None:
        # serve_forever wakes every poll_interval only to look at its shutdown flag: an idle
        # agent's two servers woke 10 times a second at 0.2 s. stop() wakes it with a connection
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": IDLE_POLL_S},
            name=f"http-{self.name}",
            daemon=True,
        )
        self._thread.start()
        log.info("%s server listening on %s", self.name, self.url)

    def stop(self) -> None:
        """Stop accepting; requests already being handled run on their own daemon threads."""
        if self._thread is not None:
            # shutdown() sets its flag, then waits for serve_forever to look at it: connect until
            # it has (a connection accepted before the flag was set is served and closes empty)
            stopper = threading.Thread(target=self._server.shutdown, daemon=True)
            stopper.start()
            while stopper.is_alive():
                self._knock()
                stopper.join(0.05)
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def _knock(self) -> None:
        address = self.address
        wildcard = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
        host = wildcard.get(address.host, address.host)
        try:
            with socket.create_connection((host, address.port), timeout=1):
                pass
        except OSError:  # refused or timed out: the next knock, or serve_forever has ended
            pass


def predict_server(listen: Listen, service: InferenceService, max_body_bytes: int) -> HttpServer:
    handler = type(
        "BoundPredictHandler",
        (PredictHandler,),
        {"service": service, "max_body_bytes": max_body_bytes},
    )
    return HttpServer("predict", listen, handler)


def health_server(listen: Listen, snapshot: Callable[[], HealthSnapshot]) -> HttpServer:
    handler = type("BoundHealthHandler", (HealthHandler,), {"snapshot": staticmethod(snapshot)})
    return HttpServer("health", listen, handler)
