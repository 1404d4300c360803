"""Fixtures for the end-to-end tests: the whole stack as it runs in the field, on loopback.

A real Mosquitto, the real fleet app (``create_app`` on uvicorn, wall-clock time, keys made by
``fleet.keys.init_key_dir``, MQTT ingestion of device reports pointed at the broker), releases
uploaded through ``POST /v1/models``, and devices that are real ``edge-agent`` processes:
provisioned with ``edge-agent provision`` against the fleet, v1 installed "at the factory",
then ``edge-agent run`` in a temp state directory. Tests drive the fleet over HTTP and watch the
device through its predict API, its state directory and the fleet's update history.
``Stack.stop_fleet()`` / ``Stack.start_fleet()`` stop the whole fleet side and start a new
app on the same data dir and port (a fleet manager restart; broker and agents run on).

Test modules cannot import this file (pytest's importlib mode): everything a test uses comes
through the ``stack`` / ``fresh_stack`` fixtures and the objects they return.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from fastapi import FastAPI
from onnx import helper, numpy_helper

from agent.bundle_install import install_bundle
from agent.client import AgentClient, AgentClientError, Prediction
from agent.config import load_config
from agent.runtimes import load_runtime
from agent.slots import Slots
from agent.update_states import UpdateRecord
from agent.update_store import UpdateStore
from firmware_profiles import load_profile
from fleet.app import create_app
from fleet.bundle_upload import pack
from fleet.keys import ONLINE_ROLES, ROOT, init_key_dir
from fleet.server import BackgroundServer, free_port
from fleet.settings import ENV_PREFIX, FleetSettings, load_settings
from fleet.tokens import Role
from fleet.tuf_repo import TufRepository
from protocol.golden import GoldenSet
from simulators.broker import MosquittoBroker

REPO = Path(__file__).resolve().parents[2]
BUNDLES = REPO / "models" / "bundles" / "pdm-classifier"
MODEL = "pdm-classifier"
PROFILE = "x86_64-gateway"
# a short trial so a whole update takes seconds; latency under a loaded 2-core box is noisy
TRIAL = {"trial_seconds": 1.5, "trial_min_requests": 5, "max_latency_ratio": 100.0}


def _now() -> datetime:
    return datetime.now(UTC)


def wait_for(
    what: str, check: Callable[[], Any], timeout: float = 30.0, every: float = 0.05
) -> Any:
    """Poll ``check`` until it returns something truthy (which is returned), or fail."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


# --- bundles ------------------------------------------------------------------------------------


def write_bundle(
    dest: Path,
    version: int,
    *,
    base: int = 2,
    only: str | None = None,
    replace: dict[str, bytes] | None = None,
    health: dict[str, Any] | None = None,
) -> Path:
    """A copy of committed bundle ``base`` as ``version``: the short trial thresholds, files in
    ``replace`` swapped in (hashes recomputed), and only the artifact ``only`` if given."""
    shutil.copytree(BUNDLES / str(base), dest)
    for name, data in (replace or {}).items():
        (dest / name).write_bytes(data)
    doc = json.loads((dest / "bundle.json").read_text())
    doc["version"] = version
    doc["health"] = {**doc["health"], **TRIAL, **(health or {})}
    if only is not None:
        kept = [a for a in doc["artifacts"] if a["file"] == only]
        for a in doc["artifacts"]:
            if a["file"] != only:
                (dest / a["file"]).unlink()
                doc["files"].pop(a["file"])
                if all(k["golden"] != a["golden"] for k in kept):
                    doc["files"].pop(a["golden"], None)
                    (dest / a["golden"]).unlink(missing_ok=True)
        doc["artifacts"] = kept
    for name in doc["files"]:
        data = (dest / name).read_bytes()
        doc["files"][name] = {"length": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (dest / "bundle.json").write_text(json.dumps(doc, indent=2, sort_keys=True))
    return dest


def _fp32(base: int = 2) -> bytes:
    return (BUNDLES / str(base) / "model.fp32.onnx").read_bytes()


def collapsed_model(data: bytes) -> bytes:
    """The fp32 model with class 0's output bias raised: it predicts "normal" for nearly all
    inputs (a retrained model whose outputs shifted: passes its own golden set, fails trial)."""
    model = onnx.load_from_string(data)
    for init in model.graph.initializer:
        if init.name == "dense_2.bias":
            bias = numpy_helper.to_array(init).copy()
            bias[0] += 40.0
            init.CopyFrom(numpy_helper.from_array(bias, init.name))
    return model.SerializeToString()


def slow_model(data: bytes, size: int = 1024) -> bytes:
    """The fp32 model plus a branch that costs two (size x size) @ (size x size) matmuls per row and
    adds exactly zero to the output: same outputs (the golden set passes anywhere), single-row
    latency far over the x86_64-gateway profile's 5 ms budget (the device's health check fails).
    The branch depends on the input, so no constant folding can remove it."""
    model = onnx.load_from_string(data)
    graph = model.graph
    out = graph.output[0].name
    inp = graph.input[0].name
    raw = out + "_raw"
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == out:
                node.output[i] = raw
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([0], np.int64), "slow_start"),
            numpy_helper.from_array(np.array([1], np.int64), "slow_end"),
            numpy_helper.from_array(np.array([1], np.int64), "slow_axis"),
            numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "slow_shape3"),
            numpy_helper.from_array(np.array([1, size, size], np.int64), "slow_expand"),
            numpy_helper.from_array(np.array([2], np.int64), "slow_axis2"),
            numpy_helper.from_array(np.array(0.0, np.float32), "slow_zero"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("Slice", [inp, "slow_start", "slow_end", "slow_axis"], ["slow_x"]),
            helper.make_node("Tanh", ["slow_x"], ["slow_t"]),
            helper.make_node("Reshape", ["slow_t", "slow_shape3"], ["slow_r"]),
            helper.make_node("Expand", ["slow_r", "slow_expand"], ["slow_m"]),
            helper.make_node("MatMul", ["slow_m", "slow_m"], ["slow_mm"]),
            helper.make_node("MatMul", ["slow_mm", "slow_m"], ["slow_mm2"]),
            helper.make_node("ReduceSum", ["slow_mm2", "slow_axis2"], ["slow_rows"], keepdims=0),
            helper.make_node("ReduceSum", ["slow_rows", "slow_axis"], ["slow_sum"], keepdims=1),
            helper.make_node("Mul", ["slow_sum", "slow_zero"], ["slow_nil"]),
            helper.make_node("Add", [raw, "slow_nil"], [out]),
        ]
    )
    onnx.checker.check_model(model)
    return model.SerializeToString()


def golden_for(model: bytes, base: int, where: Path, rows: int | None = None) -> bytes:
    """A golden set for ``model`` on (the first ``rows`` of) the inputs of bundle ``base``'s
    fp32 golden set."""
    old = GoldenSet.from_json(
        (BUNDLES / str(base) / "golden" / "model.fp32.onnx.json").read_bytes()
    )
    inputs = old.inputs[:rows]
    path = where / "model.onnx"
    path.write_bytes(model)
    runtime = load_runtime(path, "onnxruntime", 1)
    try:
        return GoldenSet(inputs, runtime.predict(inputs), 1e-4, 1.0).to_json()
    finally:
        runtime.close()


def traffic_rows(n: int = 64) -> np.ndarray:
    """Live-looking inputs: the v1 golden inputs (several classes), cycled."""
    golden = GoldenSet.from_json((BUNDLES / "1" / "golden" / "model.int8.onnx.json").read_bytes())
    return np.resize(golden.inputs, (n, golden.n_features))


# --- the fleet ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Stack:
    """The broker and the fleet app on loopback, with keys and an operator's token."""

    broker: MosquittoBroker
    settings: FleetSettings
    url: str
    http: httpx.Client
    admin: dict[str, str]
    operator: dict[str, str]
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

    def upload(self, bundle: Path) -> None:
        r = self.http.post(
            "/v1/models",
            content=pack(bundle),
            headers={**self.operator, "Content-Type": "application/gzip"},
            timeout=120,
        )
        assert r.status_code == 201, r.text

    def assign(self, device: str, version: int, rollback: bool = False) -> dict[str, Any]:
        r = self.http.post(
            f"/v1/devices/{device}/assignment",
            json={"model": MODEL, "version": version, "rollback": rollback},
            headers=self.operator,
        )
        assert r.status_code == 201, r.text
        doc: dict[str, Any] = r.json()
        return doc

    def updates(self, device: str) -> dict[str, Any]:
        r = self.http.get(f"/v1/devices/{device}/updates", headers=self.operator)
        assert r.status_code == 200, r.text
        doc: dict[str, Any] = r.json()
        return doc

    def wait_final(self, device: str, version: int, timeout: float = 60.0) -> dict[str, Any]:
        """The fleet's newest ingested transition of ``version`` once it ends an update."""

        def final() -> dict[str, Any] | None:
            for t in self.updates(device)["history"]:
                if t["version"] == version:
                    done = t["to_state"] in ("committed", "rolled_back", "failed")
                    return t if done else None
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
            done = [t for t in fresh if t["to_state"] in ("committed", "rolled_back", "failed")]
            return done[-1] if done else None

        got: dict[str, Any] = wait_for(f"a new end of update on {device}", ended, timeout, 0.2)
        return got

    def enrollment_token(self) -> str:
        r = self.http.post("/v1/enrollment-tokens", json={"uses": 1}, headers=self.admin)
        assert r.status_code == 201, r.text
        return str(r.json()["secret"])

    def tuf_repo(self) -> TufRepository:
        from fleet.keys import load_online_keys

        return TufRepository(self.settings.tuf_dir, load_online_keys(self.settings.keys_dir))


def _mint(settings: FleetSettings, role: Role) -> dict[str, str]:
    from contextlib import closing

    from fleet.audit import Actor
    from fleet.store import connect, migrate
    from fleet.tokens import TokenService

    with closing(connect(settings.db_path)) as db:
        migrate(db)
        issued = TokenService(db).create(f"e2e-{role}", role, Actor.cli("pytest"), _now())
    return {"Authorization": f"Bearer {issued.secret}"}


def start_stack(tmp: Path, stack: ExitStack) -> Stack:
    """Start a broker and a fleet app with keys, three releases' worth of uploads still to do."""
    broker = stack.enter_context(MosquittoBroker(tmp / "mosquitto"))
    port = free_port()
    settings = load_settings(
        data_dir=tmp / "fleet",
        port=port,
        public_base_url=f"http://127.0.0.1:{port}",
        broker={"host": broker.host, "port": broker.port},
        mqtt={"host": broker.host, "port": broker.port, "client_id": f"fleet-e2e-{port}"},
        desired={"publish_timeout": "5s", "retry_every": "2s"},
        ingest={"enabled": True, "shared": False, "batch_wait_ms": 0},
        log_json=False,
    )
    signers = init_key_dir(settings.keys_dir)
    repo = TufRepository(settings.tuf_dir, {r: signers[r] for r in ONLINE_ROLES})
    repo.init(signers[ROOT], _now())
    root_key = settings.keys_dir / "root.pem"
    assert root_key.exists(), sorted(settings.keys_dir.iterdir())
    admin, operator = _mint(settings, Role.ADMIN), _mint(settings, Role.OPERATOR)
    url = f"http://127.0.0.1:{port}"
    http = stack.enter_context(httpx.Client(base_url=url, timeout=30))
    s = Stack(broker, settings, url, http, admin, operator, root_key, tmp)
    s.start_fleet()
    stack.callback(s.stop_fleet)
    return s


def upload_releases(stack: Stack, tmp: Path) -> dict[str, int]:
    """v1 and v2 (the committed bundles, short trial), v3 (a retrained model whose outputs
    collapsed to one class: fails trial), v4 (v2 plus a slow branch: fails the device's latency
    budget at health_check). Returns the versions by purpose."""
    stack.upload(write_bundle(tmp / "b1", 1, base=1))
    stack.upload(write_bundle(tmp / "b2", 2))
    collapsed = collapsed_model(_fp32())
    stack.upload(
        write_bundle(
            tmp / "b3",
            3,
            only="model.fp32.onnx",
            replace={
                "model.fp32.onnx": collapsed,
                "golden/model.fp32.onnx.json": golden_for(collapsed, 2, tmp),
            },
        )
    )
    slow = slow_model(_fp32())
    # 8 golden rows: the server's replay stays short, the device still times 32 single rows
    stack.upload(
        write_bundle(
            tmp / "b4",
            4,
            only="model.fp32.onnx",
            replace={
                "model.fp32.onnx": slow,
                "golden/model.fp32.onnx.json": golden_for(slow, 2, tmp, rows=8),
            },
        )
    )
    return {"v1": 1, "good": 2, "trial_fails": 3, "too_slow": 4}


@pytest.fixture(autouse=True, scope="session")
def _no_ambient_settings() -> Iterator[None]:
    """A developer's EDGEFLEET_* variables must not leak into the fleet or the agents (session
    scope: the module-scoped stacks are built before any function-scoped fixture runs)."""
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith(ENV_PREFIX):
                mp.delenv(name)
        yield


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One broker + fleet app per test module, with releases v1..v4 uploaded."""
    tmp = tmp_path_factory.mktemp("stack")
    with ExitStack() as es:
        s = start_stack(tmp, es)
        upload_releases(s, tmp / "bundles")
        yield s


@pytest.fixture
def fresh_stack(tmp_path: Path) -> Iterator[Stack]:
    """A broker + fleet app of the test's own (for tests that rotate keys or age metadata),
    with v1 and v2 uploaded."""
    with ExitStack() as es:
        s = start_stack(tmp_path / "stack", es)
        s.upload(write_bundle(tmp_path / "b1", 1, base=1))
        s.upload(write_bundle(tmp_path / "b2", 2))
        yield s


# --- devices --------------------------------------------------------------------------------------


def edge_agent(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
    )


class Traffic:
    """A local application sending predictions to the agent for as long as the test runs."""

    def __init__(self, url: str, rows: Any) -> None:
        self.rows = rows
        self.client = AgentClient(url, timeout=10)
        self.versions: list[int] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        i = 0
        while not self.stop.wait(0.01):
            batch = self.rows[i % len(self.rows) : i % len(self.rows) + 1 + i % 4]
            i += 1
            try:
                self.versions.append(self.client.predict(batch).model_version)
            except Exception as exc:  # noqa: BLE001 - the test asserts there were none
                self.errors.append(repr(exc))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(15)
        self.client.close()


@dataclasses.dataclass
class Device:
    """A provisioned device's state directory and its ``edge-agent run`` process."""

    id: str
    state: Path
    predict_url: str
    health_url: str
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def start(self, env: dict[str, str] | None = None) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.log_path = self.state / f"run-{time.monotonic_ns()}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--state-dir", str(self.state)],
                cwd=REPO,
                env={**os.environ, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """The power cut."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def predict(self, rows: Any, timeout: float = 10.0) -> Prediction:
        client = AgentClient(self.predict_url, timeout=timeout)
        try:
            return client.predict(rows)
        finally:
            client.close()

    def wait_serving(self, timeout: float = 30.0) -> Prediction:
        def ok() -> Prediction | None:
            assert self.alive(), f"edge-agent run exited: {self.log()}"
            try:
                return self.predict(traffic_rows(1), timeout=2)
            except (AgentClientError, OSError):
                return None

        got: Prediction = wait_for(f"{self.id} to serve", ok, timeout, 0.1)
        return got

    def record(self) -> UpdateRecord | None:
        store = UpdateStore(self.state / "agent.db")
        try:
            return store.load()
        finally:
            store.close()

    def active_version(self) -> int | None:
        installed = Slots(self.state / "slots").active_release()
        return None if installed is None else installed.release.version


@contextmanager
def device_factory(tmp: Path) -> Iterator[Callable[..., Device]]:
    """``make(stack)``: a new device enrolled with ``edge-agent provision`` (x86_64-gateway),
    v1 installed at the factory, ``edge-agent run`` started and serving (unless
    ``start=False``). Every device made is stopped on exit."""
    made: list[Device] = []

    def make(stack: Stack, start: bool = True) -> Device:
        state = tmp / f"device-{len(made)}"
        predict, health = free_port(), free_port()
        done = edge_agent(
            "provision",
            "--fleet",
            stack.url,
            "--token",
            stack.enrollment_token(),
            "--profile",
            PROFILE,
            "--state-dir",
            str(state),
            "--predict-listen",
            f"127.0.0.1:{predict}",
            "--health-listen",
            f"127.0.0.1:{health}",
        )
        assert done.returncode == 0, done.stderr
        device_id = load_config(state).device.id
        install_bundle(BUNDLES / "1", Slots(state / "slots"), load_profile(PROFILE))
        device = Device(
            device_id, state, f"http://127.0.0.1:{predict}", f"http://127.0.0.1:{health}"
        )
        made.append(device)
        if start:
            device.start()
            assert device.wait_serving().model_version == 1
        return device

    try:
        yield make
    finally:
        for device in made:
            device.stop()


@pytest.fixture
def devices(tmp_path: Path) -> Iterator[Callable[..., Device]]:
    """See :func:`device_factory`; the test's devices."""
    with device_factory(tmp_path / "devices") as make:
        yield make


@pytest.fixture(scope="session")
def kit() -> ModuleType:
    """This module, for its helpers (``kit.wait_for``, ``kit.traffic_rows``, ``kit.MODEL``, ...):
    test modules cannot import a conftest under importlib mode."""
    return sys.modules[__name__]
