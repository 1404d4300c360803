"""Reporting over MQTT against a real Mosquitto: outbox -> link -> broker -> a fleet subscriber.

The subscriber stands in for the fleet's ingester: an MQTT 3.1.1 persistent session (the only
kind Mosquitto 2.0.11 restores after a broker restart), every payload through
``parse_message``, and the fleet's view is the distinct ``(device, seq)``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.mqtt_link import STATE_BLOCK, LinkConfig, MqttLink
from agent.outbox import Outbox
from agent.reporter import PeriodicJob, Reporter, start_periodic
from protocol.drift import DriftSummary, count_rows, summarize
from protocol.messages import (
    ActiveModel,
    Envelope,
    HeartbeatBody,
    ModelRef,
    StateBody,
    UpdateBody,
    parse_message,
)
from protocol.reference import build_reference_profile
from protocol.topics import TopicKind, desired_topic
from simulators.broker import MosquittoBroker

DEVICE = "dev-7"
AGENT = Path(__file__).with_name("reporting_agent.py")
STATE = StateBody(online=True, agent_version="test", profile="x86-generic")
NEW_MODEL = StateBody(True, "test", "x86-generic", ActiveModel("vibration", 4, "b", "litert"))


@dataclass(frozen=True)
class Received:
    env: Envelope
    retained: bool


class FleetView:
    """A persistent-session subscriber to all device topics that parses what it receives."""

    def __init__(self, broker: MosquittoBroker, persistent: bool = True) -> None:
        self.got: list[Received] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id="fleet-" + uuid.uuid4().hex[:8],
            protocol=mqtt.MQTTv311,
            clean_session=not persistent,
        )
        self.client.reconnect_delay_set(1, 1)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.subscribe("edgefleet/v1/devices/#", qos=1)
        self.client.loop_start()
        assert subscribed.wait(5)

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        env = parse_message(msg.topic, msg.payload)  # a rejection fails the test (loudly)
        with self.lock:
            self.got.append(Received(env, bool(msg.retain)))

    def of(self, kind: TopicKind) -> list[Received]:
        with self.lock:
            return [r for r in self.got if r.env.kind == kind]

    def seqs(self, kind: TopicKind = TopicKind.HEARTBEAT) -> list[int]:
        """Sequence numbers in arrival order (duplicates included)."""
        return [r.env.seq for r in self.of(kind)]

    def wait_for(
        self,
        what: Callable[[], bool],
        timeout: float = 15.0,
        message: Callable[[], object] = lambda: "",
    ) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out with {len(self.got)} messages; {message()}")
            time.sleep(0.02)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def fleet(broker: MosquittoBroker) -> Iterator[FleetView]:
    view = FleetView(broker)
    yield view
    view.close()


def first_arrivals(seqs: list[int]) -> list[int]:
    seen: set[int] = set()
    out = []
    for s in seqs:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


class InProcessAgent:
    def __init__(self, db: Path, broker: MosquittoBroker, max_rows: int = 100_000) -> None:
        self.outbox = Outbox(db, DEVICE, max_rows=max_rows)
        self.current = STATE
        self.link = MqttLink(
            LinkConfig(DEVICE, broker.host, broker.port), self.outbox, lambda: self.current
        )
        self.reporter = Reporter(self.outbox, self.link)
        self.link.start()

    def beat(self, n: int) -> int:
        return self.reporter.report_heartbeat(HeartbeatBody(n, 1.0, 1, 2, 3, 0, 0, n, 0))

    def wait_connected(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.link.status().connected:
            assert time.monotonic() < deadline, self.link.status()
            time.sleep(0.02)

    def close(self) -> None:
        self.link.stop(timeout=3.0)
        self.outbox.close()


def drift_summary() -> DriftSummary:
    rng = np.random.default_rng(3)
    train = rng.normal(size=(1000, 2))
    reference = build_reference_profile(
        train, (train[:, 0] > 0).astype(int), ["a", "b"], ["x", "y"]
    )
    live = rng.normal(size=(200, 2))
    counts = count_rows(
        reference,
        live,
        (live[:, 0] > 0).astype(int),
        start=0.0,
        end=60.0,
        model_name="vibration",
        model_version=3,
        reference_sha256="cd" * 32,
    )
    return summarize(counts, reference)


def test_reports_arrive_with_the_envelope_after_the_retained_birth(
    broker: MosquittoBroker, fleet: FleetView, tmp_path: Path
) -> None:
    agent = InProcessAgent(tmp_path / "agent.db", broker)
    try:
        agent.wait_connected()
        before = time.time()
        hb = agent.beat(1)
        summary = drift_summary()
        drift = agent.reporter.report_drift(summary)
        update = agent.reporter.report_update(
            UpdateBody(ModelRef("vibration", 4), False, "idle", "downloading")
        )
        fleet.wait_for(lambda: len(fleet.of(TopicKind.UPDATE)) == 1)
        fleet.wait_for(lambda: agent.outbox.depth() == 0)  # acked rows are deleted
        agent.current = NEW_MODEL  # e.g. an update committed: the retained state follows
        agent.link.refresh_state()
        fleet.wait_for(lambda: len(fleet.of(TopicKind.STATE)) == 2)
    finally:
        agent.close()
    (birth, refreshed, offline) = [r.env for r in fleet.of(TopicKind.STATE)]
    assert birth.body == STATE and birth.device == DEVICE
    assert refreshed.body == NEW_MODEL
    assert offline.body.online is False  # type: ignore[attr-defined]
    # the birth takes the first seq of the connection's block, a refresh the next, and the will
    # (= the clean offline state) the last, so it outranks them all
    assert (refreshed.seq, offline.seq) == (birth.seq + 1, birth.seq + STATE_BLOCK - 1)
    (beat,) = [r.env for r in fleet.of(TopicKind.HEARTBEAT)]
    assert (beat.device, beat.seq) == (DEVICE, hb)
    assert before <= beat.ts <= time.time()
    assert beat.body == HeartbeatBody(1, 1.0, 1, 2, 3, 0, 0, 1, 0)
    (window,) = [r.env for r in fleet.of(TopicKind.DRIFT)]
    assert (window.seq, window.body) == (drift, summary)
    assert fleet.of(TopicKind.UPDATE)[0].env.seq == update > drift > hb > birth.seq
    assert offline.seq < hb or offline.seq > update  # state seqs come from their own block


def test_subscriptions_are_renewed_on_every_connect(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    agent = InProcessAgent(tmp_path / "agent.db", broker)
    got: list[bytes] = []
    agent.link.subscribe(desired_topic(DEVICE), lambda _topic, payload: got.append(payload))
    fleet_side = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="desired-publisher")

    def publish(payload: bytes) -> None:
        fleet_side.connect(broker.host, broker.port)
        fleet_side.loop_start()
        fleet_side.publish(desired_topic(DEVICE), payload, qos=1, retain=True).wait_for_publish(5)
        fleet_side.disconnect()
        fleet_side.loop_stop()

    def wait_for(payload: bytes, times: int = 1) -> None:
        deadline = time.monotonic() + 10
        while got.count(payload) < times:
            assert time.monotonic() < deadline, got
            time.sleep(0.02)

    try:
        agent.wait_connected()
        publish(b"release-1")
        wait_for(b"release-1")
        # a restarted broker forgets MQTT 5 sessions: only a renewed subscription gets release 2
        broker.restart()
        wait_for(b"release-1", times=2)  # retained: delivered again on the renewed subscription
        publish(b"release-2")
        wait_for(b"release-2")
    finally:
        agent.close()
    assert got == [b"release-1", b"release-1", b"release-2"]
    assert agent.link.status().connects_total == 2


def test_periodic_jobs_run_on_schedule_and_survive_a_failing_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runs: list[float] = []

    def flaky() -> None:
        runs.append(time.monotonic())
        if len(runs) == 1:
            raise RuntimeError("sensor read failed")

    scheduler = start_periodic([PeriodicJob("flaky", 0.1, flaky, at_start=True)])
    try:
        deadline = time.monotonic() + 5
        while len(runs) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        scheduler.shutdown(wait=True)
    assert len(runs) >= 3  # the first run raised; the schedule went on
    assert "periodic job 'flaky' failed" in caplog.text
    with pytest.raises(ValueError, match="every_s > 0"):
        start_periodic([PeriodicJob("never", 0, flaky)])


def test_broker_outage_loses_nothing_and_flushes_in_order(
    broker: MosquittoBroker, fleet: FleetView, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    agent = InProcessAgent(tmp_path / "agent.db", broker)
    made: list[int] = []
    stop = threading.Event()

    def report() -> None:  # ~300 reports/s, so some are in flight when the broker goes
        while not stop.is_set():
            made.append(agent.beat(len(made)))
            time.sleep(0.002)

    reporting = threading.Thread(target=report)
    try:
        agent.wait_connected()
        reporting.start()
        time.sleep(0.3)
        with caplog.at_level(logging.INFO, logger="agent.mqtt_link"):
            broker.stop()
            time.sleep(1.5)
            during_outage = agent.link.status()
            queued = agent.outbox.depth()
            broker.start()
            agent.wait_connected()
            time.sleep(0.3)
        stop.set()
        reporting.join()
        fleet.wait_for(lambda: set(made) <= set(fleet.seqs()))
        status = agent.link.status()
    finally:
        stop.set()
        agent.close()
    assert not during_outage.connected and during_outage.last_error is not None
    assert queued > 100  # reports went on during the outage, into the outbox
    assert status.connects_total == 2 and status.last_error is None
    # the fleet's view: every seq made, exactly the set made, first arrivals in seq order
    # (a report in flight when the broker went is sent again: harmless duplicates)
    assert sorted(set(fleet.seqs())) == made
    assert first_arrivals(fleet.seqs()) == made
    # one clear line for the outage, not one per retry
    warnings = [
        r for r in caplog.records if r.name == "agent.mqtt_link" and r.levelno >= logging.WARNING
    ]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "lost the connection to the MQTT broker" in warnings[0].getMessage()
    assert "reports stay queued in the outbox" in warnings[0].getMessage()
    births = [r.env.seq for r in fleet.of(TopicKind.STATE) if r.env.body.online]  # type: ignore[attr-defined]
    assert len(births) == 2 and births[0] < births[1]


def test_unreachable_broker_at_start_then_bound_evicts_oldest_and_counts(
    broker: MosquittoBroker, fleet: FleetView, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker.stop()
    caplog.set_level(logging.INFO, logger="agent.mqtt_link")
    agent = InProcessAgent(tmp_path / "agent.db", broker, max_rows=20)
    try:
        made = [agent.beat(i) for i in range(30)]  # nothing reachable: must not raise
        assert agent.outbox.depth() == 20 and agent.outbox.evicted_total() == 10
        time.sleep(1.5)  # the first attempt and a retry fail
        assert not agent.link.status().connected
        assert "cannot reach the MQTT broker" in str(agent.link.status().last_error)
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "cannot reach the MQTT broker" in warnings[0], warnings
        broker.start()
        agent.wait_connected()
        fleet.wait_for(lambda: set(made[10:]) <= set(fleet.seqs()))
        later = agent.beat(99)
        fleet.wait_for(lambda: later in fleet.seqs())
    finally:
        agent.close()
    assert first_arrivals(fleet.seqs()) == [*made[10:], later]  # the 10 oldest were evicted
    last = [r.env for r in fleet.of(TopicKind.HEARTBEAT) if r.env.seq == later][0]
    assert last.body.outbox_evicted_total == 10  # type: ignore[attr-defined]


def spawn_agent(
    broker: MosquittoBroker, db: Path, refresh_on_stdin: bool = False
) -> subprocess.Popen[bytes]:
    with db.with_suffix(".log").open("ab") as log:  # the agents' logs, for a failure's reader
        return subprocess.Popen(
            [
                sys.executable,
                str(AGENT),
                *("--db", str(db), "--device", DEVICE),
                *("--host", broker.host, "--port", str(broker.port), "--interval", "0.01"),
                *(["--refresh-on-stdin"] if refresh_on_stdin else []),
            ],
            stdin=subprocess.PIPE if refresh_on_stdin else None,
            stdout=subprocess.PIPE,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def running(proc: subprocess.Popen[bytes]) -> int:
    """Wait until the spawned agent has made its first report; return its seq."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip().isdigit(), line
    return int(line)


def stopped(proc: subprocess.Popen[bytes], sig: signal.Signals, first: int) -> list[int]:
    """Send ``sig``; all seqs the agent printed (each was durably in its outbox)."""
    assert proc.stdout is not None
    proc.send_signal(sig)
    proc.wait(10)
    return [first, *(int(x) for x in proc.stdout.read().split())]


def wait_for_retained_birth(broker: MosquittoBroker, timeout: float = 10.0) -> Envelope:
    """Subscribe until the broker hands over a retained state for DEVICE; return it."""
    deadline = time.monotonic() + timeout
    while True:
        probe = FleetView(broker, persistent=False)
        try:
            probe.wait_for(lambda p=probe: any(r.retained for r in p.of(TopicKind.STATE)), 0.3)
            return [r.env for r in probe.of(TopicKind.STATE) if r.retained][0]
        except AssertionError:
            assert time.monotonic() < deadline, "the agent never published its birth"
        finally:
            probe.close()


def test_sigkill_and_restart_lose_nothing_and_seqs_keep_growing(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    """Agent 1 is killed while connected (its Last Will fires), agent 2 is killed while the
    broker is down and its reports are queued, agent 3 sends them and stops cleanly."""
    db = tmp_path / "agent.db"
    fleet = FleetView(broker)
    procs = [spawn_agent(broker, db)]
    try:
        seq = running(procs[0])
        # a subscriber arriving late sees the retained birth
        retained = wait_for_retained_birth(broker)
        time.sleep(0.5)
        first = stopped(procs[0], signal.SIGKILL, seq)
        fleet.wait_for(lambda: len(fleet.of(TopicKind.STATE)) == 2)  # birth, Last Will
        procs.append(spawn_agent(broker, db))
        seq = running(procs[1])
        time.sleep(0.3)
        broker.stop()
        time.sleep(0.7)
        second = stopped(procs[1], signal.SIGKILL, seq)  # with reports queued, unacknowledged
        broker.start()
        procs.append(spawn_agent(broker, db))
        seq = running(procs[2])
        time.sleep(0.5)
        third = stopped(procs[2], signal.SIGTERM, seq)  # clean: flush, offline, disconnect
        assert procs[2].returncode == 0
        made = set(first + second + third)
        fleet.wait_for(
            lambda: made <= set(fleet.seqs()), message=lambda: sorted(made - set(fleet.seqs()))
        )
        fleet.wait_for(lambda: not fleet.of(TopicKind.STATE)[-1].env.body.online)  # type: ignore[attr-defined]
        fleet.close()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert min(len(first), len(second), len(third)) > 20
    assert max(first) < min(second) and max(second) < min(third)  # seqs keep growing
    seqs = fleet.seqs()
    assert set(first + second + third) <= set(seqs)  # every report put was delivered
    assert first_arrivals(seqs) == sorted(set(seqs))  # in order, across kills and outage
    by_seq: dict[int, Envelope] = {}
    for r in fleet.of(TopicKind.HEARTBEAT):  # a redelivery is the same report, never a reuse
        assert by_seq.setdefault(r.env.seq, r.env) == r.env
    assert Outbox(db, DEVICE).depth() == 0  # all acknowledged, so all deleted
    states = [r.env for r in fleet.of(TopicKind.STATE)]
    assert retained == states[0] and retained.body.online  # type: ignore[attr-defined]
    will = states[1]  # agent 1's Last Will, with the last seq of its connection's block
    assert not will.body.online and will.seq == states[0].seq + STATE_BLOCK - 1  # type: ignore[attr-defined]
    # the fleet's current state is the state with the highest seq: offline, after agent 3
    assert max(states, key=lambda e: e.seq) == states[-1]
    assert [e.seq for e in states] == sorted(e.seq for e in states)


def model_version(env: Envelope) -> int | None:
    model = env.body.model  # type: ignore[attr-defined]
    return None if model is None else int(model.version)


def test_refreshes_beyond_the_block_reconnect_cleanly_and_the_will_still_outranks_them(
    broker: MosquittoBroker, fleet: FleetView, tmp_path: Path
) -> None:
    """20 refreshes on one agent (about three blocks' worth) while it reports every 10 ms, then
    SIGKILL: every refreshed state arrives, state seqs only grow, no will fires on the planned
    reconnects, and the Last Will of the last connection outranks every state before it."""
    db = tmp_path / "agent.db"
    proc = spawn_agent(broker, db, refresh_on_stdin=True)
    assert proc.stdin is not None
    try:
        seq = running(proc)
        wait_for_retained_birth(broker)
        for version in range(1, 21):  # each refresh once the previous one has arrived
            proc.stdin.write(b"refresh\n")
            proc.stdin.flush()
            fleet.wait_for(
                lambda v=version: any(model_version(r.env) == v for r in fleet.of(TopicKind.STATE)),
                message=lambda: [
                    (r.env.seq, model_version(r.env)) for r in fleet.of(TopicKind.STATE)
                ],
            )
        retained = wait_for_retained_birth(broker)
        time.sleep(0.3)  # heartbeats go on over the last connection
        made = stopped(proc, signal.SIGKILL, seq)
        fleet.wait_for(lambda: not fleet.of(TopicKind.STATE)[-1].env.body.online)  # type: ignore[attr-defined]
        # the last reports may have been in the outbox only, never sent, when it was killed
        left = {row.seq for row in Outbox(db, DEVICE).peek(10_000)}
        sent = set(made) - left
        fleet.wait_for(
            lambda: sent <= set(fleet.seqs()), message=lambda: sorted(sent - set(fleet.seqs()))
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert retained.body.online and model_version(retained) == 20  # type: ignore[attr-defined]
    # each state once (a QoS 1 redelivery keeps its seq), in the order of strictly growing seqs
    states = list({r.env.seq: r.env for r in fleet.of(TopicKind.STATE)}.values())
    assert [e.seq for e in states] == sorted({e.seq for e in states})
    *online, will = states
    assert all(e.body.online for e in online) and not will.body.online  # type: ignore[attr-defined]
    # the birth, then each refresh; refreshes 7 and 14 found their block used up, so they are
    # the births of new connections (a clean DISCONNECT each: no will in between)
    assert [model_version(e) for e in online] == [None, *range(1, 21)]
    births = [online[0], online[7], online[14]]
    for birth, block in zip(births, (online[:7], online[7:14], online[14:]), strict=True):
        assert [e.seq for e in block] == list(range(birth.seq, birth.seq + len(block)))
    assert births[0].seq + STATE_BLOCK <= births[1].seq  # a new block above the previous will
    assert births[1].seq + STATE_BLOCK <= births[2].seq
    # the Last Will (SIGKILL) has the last seq of the last connection's block: above them all
    assert will.seq == births[2].seq + STATE_BLOCK - 1 > max(e.seq for e in online)
    # no report lost across the planned reconnects: all arrived, first arrivals in seq order
    delivered = set(fleet.seqs())
    assert len(made) > 50 and sent <= delivered
    unsent = set(made) - delivered  # still in the killed agent's outbox: only a tail, no gap
    assert unsent <= left and min(unsent, default=max(made) + 1) > max(delivered)
    assert first_arrivals(fleet.seqs()) == sorted(set(fleet.seqs()))
    log = db.with_suffix(".log").read_text()
    assert log.count("MQTT reconnecting: the 8 state seqs of this connection are used up") == 2
    # the agent's own warnings (APScheduler may warn that a 10 ms heartbeat run was skipped
    # while the previous one waited for its fsync on a loaded machine)
    warned = [line for line in log.splitlines() if line.startswith(("WARNING:agent", "ERROR"))]
    assert "lost the connection" not in log and not warned, log


def test_a_burst_of_refreshes_ends_in_the_current_state_and_a_clean_stop(
    broker: MosquittoBroker, fleet: FleetView, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Refreshes asked for faster than they are published: the ones asked for during the
    planned reconnect are folded into the new birth; the last state is the current one."""
    caplog.set_level(logging.INFO, logger="agent.mqtt_link")
    agent = InProcessAgent(tmp_path / "agent.db", broker)
    try:
        agent.wait_connected()
        made = []
        for version in range(1, 21):
            agent.current = dataclasses.replace(
                NEW_MODEL, model=ActiveModel("v", version, "a", "onnxruntime")
            )
            agent.link.refresh_state()
            made.append(agent.beat(version))
        fleet.wait_for(lambda: any(model_version(r.env) == 20 for r in fleet.of(TopicKind.STATE)))
        fleet.wait_for(lambda: set(made) <= set(fleet.seqs()))
        status = agent.link.status()
    finally:
        agent.close()
    fleet.wait_for(lambda: not fleet.of(TopicKind.STATE)[-1].env.body.online)  # type: ignore[attr-defined]
    states = list({r.env.seq: r.env for r in fleet.of(TopicKind.STATE)}.values())
    assert [e.seq for e in states] == sorted({e.seq for e in states})
    *online, offline = states
    assert all(e.body.online for e in online)  # type: ignore[attr-defined]  # no will fired
    versions = [model_version(e) or 0 for e in online]
    assert versions == sorted(versions) and versions[-1] == 20  # never an older state later
    assert not offline.body.online and offline.seq > online[-1].seq  # type: ignore[attr-defined]
    assert status.connects_total >= 2 and status.connected
    assert first_arrivals(fleet.seqs()) == made
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not warnings, warnings
