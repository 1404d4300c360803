"""A TCP relay between devices and the fleet manager that makes their downloads slow or fail.

:class:`FaultyRelay` listens on a loopback port and forwards every connection to the fleet's
HTTP port; a device whose ``fleet_url`` points at the relay fetches its TUF metadata and model
files through it. ``rate`` limits the bytes per second sent back to the device (a slow link);
``cut_after`` closes a connection once it carried that many bytes back, for the first ``cuts``
connections that get that far (a link that drops mid-download: the agent's fetcher retries and
resumes with HTTP Range). The relay only moves bytes: HTTP, auth and TLS pass through untouched.

It does not touch MQTT (a device offline is simulated by stopping its agent).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

CHUNK = 1024


@dataclass(frozen=True)
class LinkFault:
    rate: float = 0.0  # bytes per second back to the device; 0 = unlimited
    cut_after: int = 0  # close a connection after this many bytes back; 0 = never
    cuts: int = 0  # how many connections are cut (then the link is healthy)


class FaultyRelay:
    """``with FaultyRelay("127.0.0.1", fleet_port, fault) as relay: relay.url``."""

    def __init__(self, host: str, port: int, fault: LinkFault) -> None:
        self.target = (host, port)
        self.fault = fault
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._lock = threading.Lock()
        self._cuts_left = fault.cuts
        self.cut_total = 0
        self.bytes_total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name=f"relay-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultyRelay:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):  # wakes the accept() (close alone does not)
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        self._thread.join(5)

    def __enter__(self) -> FaultyRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=30)
        except OSError:
            client.close()
            return
        up = threading.Thread(target=self._pipe_up, args=(client, upstream), daemon=True)
        up.start()
        sent = 0
        started = time.monotonic()
        try:
            while True:
                data = upstream.recv(CHUNK)
                if not data:
                    break
                if self.fault.cut_after and sent + len(data) > self.fault.cut_after:
                    with self._lock:
                        cut = self._cuts_left > 0
                        if cut:
                            self._cuts_left -= 1
                            self.cut_total += 1
                    if cut:
                        client.sendall(data[: max(0, self.fault.cut_after - sent)])
                        log.info("relay %d: cut a connection after %d bytes", self.port, sent)
                        break
                client.sendall(data)
                sent += len(data)
                with self._lock:
                    self.bytes_total += len(data)
                if self.fault.rate:
                    ahead = sent / self.fault.rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    @staticmethod
    def _pipe_up(client: socket.socket, upstream: socket.socket) -> None:
        try:
            while data := client.recv(65536):
                upstream.sendall(data)
        except OSError:
            pass
