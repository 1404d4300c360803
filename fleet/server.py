"""The fleet app served by uvicorn in a background thread, on a free loopback port by default.

For tests, simulators, benchmarks and the demo, which need a real HTTP fleet manager inside
their own process. ``fleet serve`` runs uvicorn in the foreground instead.

This module starts and stops a server; it builds no app (pass one from
:func:`fleet.app.create_app`).
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class BackgroundServer:
    """``with BackgroundServer(app) as server: httpx.get(server.url + "/healthz")``."""

    def __init__(
        self,
        app: FastAPI,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        certfile: Path | None = None,
        keyfile: Path | None = None,
    ) -> None:
        """``certfile``/``keyfile``: serve HTTPS (as ``fleet serve`` does with ``tls.*``)."""
        self.host = host
        self.port = port or free_port(host)
        self.scheme = "https" if certfile else "http"
        config = uvicorn.Config(
            app,
            host=host,
            port=self.port,
            log_config=None,
            access_log=False,
            lifespan="on",
            ssl_certfile=str(certfile) if certfile else None,
            ssl_keyfile=str(keyfile) if keyfile else None,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        """Start serving; returns once the server accepts requests."""
        self._thread = threading.Thread(
            target=self._server.run, name=f"fleet-http-{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the fleet app did not start on {self.url} (see the log)")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the fleet app did not start on {self.url} in {timeout}s")
            time.sleep(0.01)

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> BackgroundServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
