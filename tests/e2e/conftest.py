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
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from agent.bundle_install import install_bundle
from agent.client import AgentClient, AgentClientError, Prediction
from agent.config import load_config
from agent.slots import Slots
from agent.update_states import UpdateRecord
from agent.update_store import UpdateStore
from firmware_profiles import load_profile
from fleet.server import free_port
from fleet.settings import ENV_PREFIX
from protocol.golden import GoldenSet
from simulators.releases import (
    BUNDLES,
    MODEL,
    TRIAL,
    collapsed_model,
    golden_for,
    slow_model,
    write_bundle,
)
from simulators.releases import fp32_model as _fp32
from simulators.stack import Stack, start_stack, wait_for

REPO = Path(__file__).resolve().parents[2]
PROFILE = "x86_64-gateway"
__all__ = ["MODEL", "TRIAL", "Stack", "collapsed_model", "slow_model", "wait_for"]  # for kit


def traffic_rows(n: int = 64) -> np.ndarray:
    """Live-looking inputs: the v1 golden inputs (several classes), cycled."""
    golden = GoldenSet.from_json((BUNDLES / "1" / "golden" / "model.int8.onnx.json").read_bytes())
    return np.resize(golden.inputs, (n, golden.n_features))


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
