"""``edge-agent run`` as a real process: a real Mosquitto, the committed v1 bundle installed,
predictions over HTTP, birth/heartbeat/drift/offline on the broker, the health endpoint and
``edge-agent status``, and SIGTERM ending in a clean exit 0. Plus the in-process Agent's
shutdown keeping every report when the broker is down."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.bundle_install import install_bundle
from agent.client import AgentClient, AgentClientError
from agent.config import (
    AgentConfig,
    DeviceConfig,
    HttpConfig,
    Listen,
    MqttConfig,
    TelemetryConfig,
    save_config,
)
from agent.main import Agent
from agent.outbox import Outbox
from agent.slots import Slots
from agent.update_states import UpdateRecord, UpdateState
from agent.update_store import UpdateStore
from firmware_profiles import load_profile
from protocol.golden import GoldenSet
from protocol.messages import Envelope, parse_message
from protocol.topics import TopicKind, device_topic
from simulators.broker import MosquittoBroker, free_port

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "models" / "bundles" / "pdm-classifier" / "1"
DEVICE = "dev-run-1"


def write_config(state: Path, broker_port: int, **telemetry: Any) -> AgentConfig:
    config = AgentConfig(
        state_dir=state,
        device=DeviceConfig(DEVICE, "x86_64-gateway", "http://127.0.0.1:9"),
        mqtt=MqttConfig("127.0.0.1", broker_port),
        http=HttpConfig(
            predict_listen=Listen("127.0.0.1", free_port()),
            health_listen=Listen("127.0.0.1", free_port()),
        ),
        telemetry=TelemetryConfig(**telemetry),
    )
    state.mkdir(parents=True, exist_ok=True)
    save_config(config)
    return config


def golden_rows(n: int) -> np.ndarray:
    golden = GoldenSet.from_json((BUNDLE / "golden" / "model.int8.onnx.json").read_bytes())
    return np.resize(golden.inputs, (n, golden.n_features))


class Subscriber:
    """Stands in for the fleet: every device report, parsed."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self.messages: list[tuple[Envelope, bool]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-fleet")
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe("edgefleet/v1/devices/#", qos=1)
        assert subscribed.wait(5)

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic.endswith("/desired"):  # what the fleet sends, not a report
            return
        envelope = parse_message(msg.topic, msg.payload)
        with self.lock:
            self.messages.append((envelope, bool(msg.retain)))

    def of(self, kind: TopicKind) -> list[Envelope]:
        with self.lock:
            return [e for e, _ in self.messages if e.kind == kind]

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; got {self.messages}")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def subscriber(broker: MosquittoBroker) -> Iterator[Subscriber]:
    s = Subscriber(broker)
    yield s
    s.close()


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as r:
        doc: dict[str, Any] = json.loads(r.read())
        return doc


def edge_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_run_serves_reports_and_stops_cleanly(
    tmp_path: Path, broker: MosquittoBroker, subscriber: Subscriber
) -> None:
    state = tmp_path / "state"
    config = write_config(state, broker.port, heartbeat_seconds=0.5, drift_min_rows=10**6)
    install_bundle(BUNDLE, Slots(config.paths.slots), load_profile("x86_64-gateway"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--state-dir", str(state)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        predict_url = f"http://{config.http.predict_listen}"
        health_url = f"http://{config.http.health_listen}"
        client = AgentClient(predict_url, timeout=5)
        deadline = time.monotonic() + 30
        while True:  # until the agent listens
            try:
                first = client.predict(golden_rows(1))
                break
            except AgentClientError:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "the agent did not start serving"
                time.sleep(0.1)
        assert (first.model_name, first.model_version) == ("pdm-classifier", 1)
        batch = client.predict(golden_rows(64))
        assert len(batch.classes) == 64
        with pytest.raises(AgentClientError) as err:
            client.predict([[float("nan")] * 24])
        assert err.value.status == 422
        client.close()

        subscriber.wait_for(
            "the birth", lambda: any(s.body.online for s in subscriber.of(TopicKind.STATE))
        )
        birth = next(s for s in subscriber.of(TopicKind.STATE) if s.body.online)
        assert birth.device == DEVICE
        assert birth.body.model is not None and birth.body.model.slot == "a"
        assert birth.body.profile == "x86_64-gateway"
        subscriber.wait_for(
            "a heartbeat counting the predictions",
            lambda: any(h.body.inferences_total >= 2 for h in subscriber.of(TopicKind.HEARTBEAT)),
        )
        beat = [h for h in subscriber.of(TopicKind.HEARTBEAT) if h.body.inferences_total >= 2][0]
        assert beat.body.model is not None and beat.body.model.version == 1
        assert beat.body.latency_ms is not None and beat.body.mem_rss_bytes > 0

        health = get_json(health_url + "/health")
        assert health["device_id"] == DEVICE and health["broker_connected"] is True
        assert health["model"]["name"] == "pdm-classifier" and health["model"]["slot"] == "a"
        assert health["inference"]["requests"] == 2 and health["inference"]["rows"] == 65
        assert health["inference"]["rejected"] == 1
        assert health["status"] == "ok", health["problems"]
        with urllib.request.urlopen(health_url + "/", timeout=5) as r:
            assert "pdm-classifier v1" in r.read().decode()
        with urllib.request.urlopen(health_url + "/metrics", timeout=5) as r:
            assert "edgefleet_agent_inference_rows_total 65" in r.read().decode()

        status = edge_agent("status", "--state-dir", str(state))
        assert status.returncode == 0, status.stderr
        assert "pdm-classifier v1" in status.stdout and "connected" in status.stdout
        status_json = edge_agent("status", "--state-dir", str(state), "--json")
        assert json.loads(status_json.stdout)["device_id"] == DEVICE

        proc.send_signal(signal.SIGTERM)
        out, err_text = proc.communicate(timeout=30)
        assert proc.returncode == 0, err_text
        assert "SIGTERM received" in err_text and "agent stopped" in err_text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # stopping closed the drift window (65 rows, under min_rows) and flushed it, then went offline
    subscriber.wait_for("the last drift window", lambda: bool(subscriber.of(TopicKind.DRIFT)))
    drift = subscriber.of(TopicKind.DRIFT)[-1]
    assert drift.body.counts.n == 65 and drift.body.counts.model_version == 1
    subscriber.wait_for(
        "the offline state", lambda: not subscriber.of(TopicKind.STATE)[-1].body.online
    )
    with Outbox(config.paths.db, DEVICE) as outbox:
        assert outbox.depth() == 0  # everything was acknowledged before the exit

    gone = edge_agent("status", "--state-dir", str(state))
    assert gone.returncode == 3
    assert "edge-agent is not running" in gone.stderr and "edge-agent run" in gone.stderr


def test_no_model_still_runs_and_says_so(tmp_path: Path, broker: MosquittoBroker) -> None:
    config = write_config(tmp_path / "state", broker.port)
    agent = Agent(config)
    agent.start()
    try:
        with pytest.raises(AgentClientError) as err:
            AgentClient(f"http://{config.http.predict_listen}").predict([[0.0] * 24])
        assert err.value.status == 503 and "edge-agent model install" in err.value.message
        health = get_json(f"http://{config.http.health_listen}/health")
        assert health["model"] is None
        assert any("no model is installed" in p for p in health["problems"])
    finally:
        agent.stop()


def test_stop_with_broker_down_keeps_every_report(tmp_path: Path) -> None:
    down = free_port()  # nothing listens: the link retries, reports wait in the outbox
    config = write_config(
        tmp_path / "state", down, heartbeat_seconds=3600, shutdown_flush_seconds=0.5
    )
    install_bundle(BUNDLE, Slots(config.paths.slots), load_profile("rpi4-aarch64"))
    agent = Agent(config)
    agent.start()
    try:
        model = agent.service.current()
        assert model is not None and model.release.runtime == "litert"
        # above the privacy floor (WindowPolicy.min_report_rows): the cut-short window is sent
        agent.service.predict(golden_rows(25).astype(np.float32))
    finally:
        agent.stop()
    agent.stop()  # a second stop is harmless
    with Outbox(config.paths.db, DEVICE) as outbox:
        rows = outbox.peek(10)
    kinds = [r.topic.rsplit("/", 2)[-2:] for r in rows]
    assert ["telemetry", "heartbeat"] in kinds and ["telemetry", "drift"] in kinds
    drift_row = next(r for r in rows if r.topic.endswith("drift"))
    assert parse_message(drift_row.topic, drift_row.payload).body.counts.n == 25


def test_unreadable_model_is_a_health_problem(tmp_path: Path, broker: MosquittoBroker) -> None:
    config = write_config(tmp_path / "state", broker.port)
    installed = install_bundle(BUNDLE, Slots(config.paths.slots), load_profile("x86_64-gateway"))
    os.truncate(installed.installed.artifact_path, 0)
    agent = Agent(config)
    agent.start()
    try:
        health = get_json(f"http://{config.http.health_listen}/health")
        assert health["model"] is None
        assert any("cannot be loaded" in p and "empty" in p for p in health["problems"])
    finally:
        agent.stop()


_IMPORTS_PROBE = """
import sys, time
from pathlib import Path
from agent.cli import main  # what `edge-agent run` imports, command modules included
from agent.config import load_config
from agent.main import Agent
agent = Agent(load_config(Path(sys.argv[1])))
agent.start()
try:
    deadline = time.monotonic() + 20
    while not agent.link.status().connected and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # the retained desired document arrives right after the connect
    agent.service.predict(__import__("numpy").zeros((1, 24), "float32"))
    heavy = ("onnxruntime", "tuf", "securesystemslib", "cryptography", "scipy", "fastapi")
    print(" ".join(m for m in heavy if m in sys.modules) or "none", agent.updater is None)
finally:
    agent.stop()
"""


def test_a_litert_agent_imports_nothing_heavy(
    tmp_path: Path, broker: MosquittoBroker, subscriber: Subscriber
) -> None:
    """The memory budget: no onnxruntime for a LiteRT artifact, and no TUF or cryptography
    while no update is under way, even with the retained desired document already handled."""
    config = write_config(tmp_path / "state", broker.port)
    install_bundle(BUNDLE, Slots(config.paths.slots), load_profile("rpi4-aarch64"))
    desired = b'{"signed": {"model": "pdm-classifier"}, "signatures": []}'
    store = UpdateStore(config.paths.db)
    store.accept(1, hashlib.sha256(desired).hexdigest(), None)
    store.close()
    topic = device_topic(DEVICE, TopicKind.DESIRED)
    subscriber.client.publish(topic, desired, qos=1, retain=True).wait_for_publish(5)
    probe = subprocess.run(
        [sys.executable, "-c", _IMPORTS_PROBE, str(config.state_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["none", "True"], probe.stdout


def test_health_shows_the_last_update(tmp_path: Path, broker: MosquittoBroker) -> None:
    config = write_config(tmp_path / "state", broker.port)
    store = UpdateStore(config.paths.db)
    now = time.time()
    record = UpdateRecord(
        update_id=1,
        model="pdm-classifier",
        version=2,
        rollback=False,
        serial=7,
        target_path="pdm-classifier/2/model.int8.onnx",
        state=UpdateState.ROLLED_BACK,
        started_at=now - 60,
        entered_at=now,
        reason="trial: p95 latency 3.1x the previous model's",
    )
    store.save(record)
    store.close()
    agent = Agent(config)
    agent.start()
    try:
        health = get_json(f"http://{config.http.health_listen}/health")
    finally:
        agent.stop()
    assert health["update"]["state"] == "rolled_back"
    assert health["update"]["result"] == "rolled_back pdm-classifier v2"
    assert any("last update rolled_back: trial: p95" in p for p in health["problems"])
    assert agent.updater is None  # a finished update needs no engine at start


def test_port_in_use_stops_what_started(tmp_path: Path, broker: MosquittoBroker) -> None:
    config = write_config(tmp_path / "state", broker.port)
    with socket.socket() as taken:
        taken.bind((config.http.health_listen.host, config.http.health_listen.port))
        taken.listen()
        code, _, err = _run_cli("run", "--state-dir", str(config.state_dir))
    assert code == 2
    assert f"cannot listen on {config.http.health_listen} for the health server" in err
    assert "http.health_listen in agent.toml" in err and "Traceback" not in err
    # the outbox it had opened was closed cleanly: a new agent can use it at once
    with Outbox(config.paths.db, DEVICE) as outbox:
        assert outbox.depth() == 0


def _run_cli(*args: str) -> tuple[int, str, str]:
    proc = edge_agent(*args)
    return proc.returncode, proc.stdout, proc.stderr
