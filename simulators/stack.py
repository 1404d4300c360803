"""The fleet side of a simulated run, on loopback: a Mosquitto broker and the real fleet app.

:func:`start_stack` starts a :class:`~simulators.broker.MosquittoBroker` and the fleet app
(``create_app`` on uvicorn in a thread, keys made by ``fleet.keys.init_key_dir``, a TUF
repository, MQTT ingestion pointed at the broker) in a directory of its own, and mints an admin
and an operator token. :class:`FleetClient` (also for a fleet manager running elsewhere:
:func:`connect_fleet`) drives it over HTTP the way an operator does (upload a bundle, enrollment
tokens, groups, assignments, rollouts and their controls) and asks it which reports it stored
(:meth:`FleetClient.stored_seqs`), which is how a run checks that no report was lost;
:class:`Stack`, the one started here, reads that from the fleet's SQLite file instead;
``Stack.stop_fleet()`` / ``Stack.start_fleet()`` restart the fleet side on the same data dir and
port.

The end-to-end tests (``tests/e2e/conftest.py``) and the simulator (:mod:`simulators.run`) both
use it. It runs no devices (:mod:`simulators.host`).
"""

from __future__ import annotations

import dataclasses
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, closing, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from fleet.app import create_app
from fleet.bundle_upload import pack
from fleet.keys import ONLINE_ROLES, ROOT, init_key_dir
from fleet.server import BackgroundServer, free_port
from fleet.settings import FleetSettings, load_settings
from fleet.tokens import Role
from fleet.tuf_repo import TufRepository
from protocol.topics import TopicKind
from simulators.broker import MosquittoBroker
from simulators.local_broker import Broker
from simulators.releases import MODEL

ROLLOUT_ENDS = ("completed", "rolled_back")
UPDATE_ENDS = ("committed", "rolled_back", "failed")
# reports numbered by the agent's outbox, one seq each (state births/wills use reserved blocks)
OUTBOX_KINDS = tuple(k.value for k in (TopicKind.HEARTBEAT, TopicKind.DRIFT, TopicKind.UPDATE))


class WaitTimeout(AssertionError):
    """A wait ran out of time (an AssertionError, so a test waiting on it fails like an assert)."""


class FleetRequestError(RuntimeError):
    """The fleet answered a request with an unexpected status; the message has its answer."""


def wait_for(
    what: str, check: Callable[[], Any], timeout: float = 30.0, every: float = 0.05
) -> Any:
    """Poll ``check`` until it returns something truthy (which is returned), or raise
    :class:`WaitTimeout`."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def _now() -> datetime:
    return datetime.now(UTC)


def _json(r: httpx.Response, status: int) -> Any:
    if r.status_code != status:
        raise FleetRequestError(
            f"{r.request.method} {r.request.url.path} answered {r.status_code}: {r.text[:500]}"
        )
    return r.json()


@dataclasses.dataclass
class FleetClient:
    """A fleet manager driven over HTTP with an admin's and an operator's token."""

    url: str
    http: httpx.Client
    admin: dict[str, str]
    operator: dict[str, str]

    # --- operator requests ----------------------------------------------------------------------

    def upload(self, bundle: Path) -> None:
        r = self.http.post(
            "/v1/models",
            content=pack(bundle),
            headers={**self.operator, "Content-Type": "application/gzip"},
            timeout=120,
        )
        _json(r, 201)

    def enrollment_token(self, uses: int = 1) -> str:
        r = self.http.post("/v1/enrollment-tokens", json={"uses": uses}, headers=self.admin)
        return str(_json(r, 201)["secret"])

    def set_group(self, device: str, group: str) -> None:
        r = self.http.patch(f"/v1/devices/{device}", json={"group": group}, headers=self.operator)
        _json(r, 200)

    def assign(self, device: str, version: int, rollback: bool = False) -> dict[str, Any]:
        r = self.http.post(
            f"/v1/devices/{device}/assignment",
            json={"model": MODEL, "version": version, "rollback": rollback},
            headers=self.operator,
        )
        doc: dict[str, Any] = _json(r, 201)
        return doc

    def start_rollout(self, body: dict[str, Any]) -> str:
        """``POST /v1/rollouts`` with ``body`` (see :mod:`fleet.routes.rollouts`); its id."""
        r = self.http.post("/v1/rollouts", json=body, headers=self.operator)
        return str(_json(r, 201)["id"])

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        """The rollout's status: ``rollout``, ``stages``, ``devices``, ``events``."""
        r = self.http.get(f"/v1/rollouts/{rollout_id}", headers=self.operator)
        doc: dict[str, Any] = _json(r, 200)
        return doc

    def control(self, rollout_id: str, action: str, reason: str = "") -> dict[str, Any]:
        """pause / resume / promote / abort."""
        r = self.http.post(
            f"/v1/rollouts/{rollout_id}/{action}", json={"reason": reason}, headers=self.operator
        )
        doc: dict[str, Any] = _json(r, 200)
        return doc

    def wait_rollout_end(self, rollout_id: str, timeout: float = 120.0) -> dict[str, Any]:
        """The rollout's status once it is completed or rolled back (or paused, which waits
        for an operator)."""

        def ended() -> dict[str, Any] | None:
            doc = self.rollout(rollout_id)
            return doc if doc["rollout"]["state"] in (*ROLLOUT_ENDS, "paused") else None

        try:
            got: dict[str, Any] = wait_for(f"rollout {rollout_id} to end", ended, timeout, 0.5)
        except WaitTimeout:
            state = self.rollout(rollout_id)["rollout"]
            raise WaitTimeout(
                f"rollout {rollout_id} did not end in {timeout}s: {state['state']} at stage "
                f"{state['stage']} ({state['reason']})"
            ) from None
        return got

    def devices(self) -> list[dict[str, Any]]:
        """Every device the fleet knows (all pages)."""
        out: list[dict[str, Any]] = []
        while True:
            r = self.http.get(
                "/v1/devices", params={"limit": 500, "offset": len(out)}, headers=self.operator
            )
            doc = _json(r, 200)
            items = doc["items"] if isinstance(doc, dict) else doc
            out.extend(items)
            if not items or (isinstance(doc, dict) and len(out) >= int(doc.get("total", 0))):
                return out

    def updates(self, device: str) -> dict[str, Any]:
        r = self.http.get(f"/v1/devices/{device}/updates", headers=self.operator)
        doc: dict[str, Any] = _json(r, 200)
        return doc

    def wait_final(self, device: str, version: int, timeout: float = 60.0) -> dict[str, Any]:
        """The fleet's newest ingested transition of ``version`` once it ends an update."""

        def final() -> dict[str, Any] | None:
            for t in self.updates(device)["history"]:
                if t["version"] == version:
                    return t if t["to_state"] in UPDATE_ENDS else None
            return None

        got: dict[str, Any] = wait_for(
            f"the fleet to see {device}'s v{version} end", final, timeout, 0.2
        )
        return got

    def seen(self, device: str) -> int:
        """How many update transitions of ``device`` the fleet has stored so far."""
        return int(self.updates(device)["total"])

    def wait_new_end(self, device: str, seen: int, timeout: float = 60.0) -> dict[str, Any]:
        """The first transition after the ``seen`` first ones that ends an update (newest
        first in the history, so the oldest such one is searched from the end)."""

        def ended() -> dict[str, Any] | None:
            doc = self.updates(device)
            fresh = doc["history"][: max(0, int(doc["total"]) - seen)]
            done = [t for t in fresh if t["to_state"] in UPDATE_ENDS]
            return done[-1] if done else None

        got: dict[str, Any] = wait_for(f"a new end of update on {device}", ended, timeout, 0.2)
        return got

    def stored_seqs(self, devices: Iterable[str]) -> dict[str, set[int]]:
        """Per device, the sequence numbers of the outbox-numbered reports (heartbeats, drift
        windows, update transitions) of the last day the fleet has stored, asked over HTTP
        (up to 10,000 of each kind per device)."""
        out: dict[str, set[int]] = {}
        q = {"limit": 10_000}
        for device in devices:
            seqs = out.setdefault(device, set())
            base = f"/v1/devices/{device}"
            beats = _json(self.http.get(f"{base}/heartbeats", params=q, headers=self.operator), 200)
            seqs.update(int(p["seq"]) for p in beats["points"])
            drift = _json(self.http.get(f"{base}/drift", params=q, headers=self.operator), 200)
            seqs.update(int(w["seq"]) for w in drift)
            history = _json(self.http.get(f"{base}/updates", params=q, headers=self.operator), 200)
            seqs.update(int(t["seq"]) for t in history["history"])
        return out

    def close(self) -> None:
        self.http.close()


def connect_fleet(url: str, admin_token: str, operator_token: str) -> FleetClient:
    """A client of the running fleet manager at ``url`` with an admin's and an operator's API
    token (``fleet tokens create``)."""
    return FleetClient(
        url.rstrip("/"),
        httpx.Client(base_url=url, timeout=30),
        {"Authorization": f"Bearer {admin_token}"},
        {"Authorization": f"Bearer {operator_token}"},
    )


@dataclasses.dataclass
class Stack(FleetClient):
    """The broker and the fleet app on loopback, with keys and an operator's token."""

    broker: Broker
    settings: FleetSettings
    root_key: Path
    tmp: Path
    server: BackgroundServer | None = None
    app: FastAPI | None = None

    def start_fleet(self) -> None:
        """Start the fleet app (a new one: what a restarted fleet manager is) on the stack's data
        dir and port, so the agents' fleet URL and the ingestion's persistent MQTT session (same
        client id) carry over."""
        assert self.server is None, "the fleet is already running"
        self.app = create_app(self.settings)
        self.server = BackgroundServer(self.app, port=self.settings.port)
        self.server.start()

    def stop_fleet(self) -> None:
        """Stop the whole fleet side: uvicorn shut down, its lifespan run to the end (scheduler,
        MQTT ingestion and desired-state publisher stopped). The data dir stays. Checks that it
        really stopped: nothing listens on the port, the ingestion thread is gone, the
        scheduler is shut down."""
        if self.server is None:
            return
        self.server.stop(timeout=30)
        self.server = None
        with socket.socket() as probe:
            probe.settimeout(1)
            assert probe.connect_ex(("127.0.0.1", self.settings.port)) != 0, "still listening"
        ingest = f"ingest-{self.settings.mqtt.client_id}"
        alive = [t.name for t in threading.enumerate() if t.name.startswith(ingest)]
        assert not alive, f"the fleet's MQTT ingestion still runs: {alive}"
        scheduler = getattr(self.app.state, "scheduler", None) if self.app else None
        assert scheduler is None or not scheduler.running, "the fleet's scheduler still runs"

    def tuf_repo(self) -> TufRepository:
        from fleet.keys import load_online_keys

        return TufRepository(self.settings.tuf_dir, load_online_keys(self.settings.keys_dir))

    def stored_seqs(self, devices: Iterable[str] | None = None) -> dict[str, set[int]]:
        """:meth:`FleetClient.stored_seqs` read from the fleet's database: every report of
        ``devices`` (every device if None)."""
        wanted = None if devices is None else set(devices)
        out: dict[str, set[int]] = {d: set() for d in wanted or ()}
        uri = f"file:{self.settings.db_path}?mode=ro"
        with closing(sqlite3.connect(uri, uri=True, timeout=30)) as db:
            rows = db.execute(
                "SELECT device_id, seq FROM telemetry_messages "
                f"WHERE kind IN ({', '.join('?' * len(OUTBOX_KINDS))})",
                OUTBOX_KINDS,
            )
            for device, seq in rows:
                if wanted is None or device in wanted:
                    out.setdefault(device, set()).add(int(seq))
        return out


def _mint(settings: FleetSettings, role: Role) -> dict[str, str]:
    from fleet.audit import Actor
    from fleet.store import connect, migrate
    from fleet.tokens import TokenService

    with closing(connect(settings.db_path)) as db:
        migrate(db)
        issued = TokenService(db).create(f"sim-{role}", role, Actor.cli("simulator"), _now())
    return {"Authorization": f"Bearer {issued.secret}"}


def start_stack(
    tmp: Path, stack: ExitStack, *, broker: Broker | None = None, port: int = 0, **overrides: Any
) -> Stack:
    """Start a broker and a fleet app with keys under ``tmp``, stopped when ``stack`` closes;
    ``overrides`` go to :func:`fleet.settings.load_settings` over the loopback defaults.

    ``broker``: a running broker to use instead (its owner stops it; the demo's comes from
    :func:`simulators.local_broker.start_broker`); ``port``: the fleet's (a free one if 0)."""
    if broker is None:
        broker = stack.enter_context(MosquittoBroker(tmp / "mosquitto"))
    port = port or free_port()
    options: dict[str, Any] = {
        "data_dir": tmp / "fleet",
        "port": port,
        "public_base_url": f"http://127.0.0.1:{port}",
        "broker": {"host": broker.host, "port": broker.port},
        "mqtt": {"host": broker.host, "port": broker.port, "client_id": f"fleet-sim-{port}"},
        "desired": {"publish_timeout": "5s", "retry_every": "2s"},
        "ingest": {"enabled": True, "shared": False, "batch_wait_ms": 0},
        "log_json": False,
        **overrides,
    }
    settings = load_settings(**options)
    signers = init_key_dir(settings.keys_dir)
    repo = TufRepository(settings.tuf_dir, {r: signers[r] for r in ONLINE_ROLES})
    repo.init(signers[ROOT], _now())
    root_key = settings.keys_dir / "root.pem"
    assert root_key.exists(), sorted(settings.keys_dir.iterdir())
    admin, operator = _mint(settings, Role.ADMIN), _mint(settings, Role.OPERATOR)
    url = f"http://127.0.0.1:{port}"
    http = stack.enter_context(httpx.Client(base_url=url, timeout=30))
    s = Stack(url, http, admin, operator, broker, settings, root_key, tmp)
    s.start_fleet()
    stack.callback(s.stop_fleet)
    return s


@contextmanager
def running_stack(
    tmp: Path, *, broker: Broker | None = None, port: int = 0, **overrides: Any
) -> Iterator[Stack]:
    """``with running_stack(tmp) as stack:`` a broker and fleet app, stopped on exit (see
    :func:`start_stack` for the arguments)."""
    with ExitStack() as es:
        yield start_stack(tmp, es, broker=broker, port=port, **overrides)
