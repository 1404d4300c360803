"""The MQTT link's own thread against a real Mosquitto: it sleeps while idle, keeps the
connection alive on paho's keepalive, and stop shuts it out of the outbox.

The reporting behaviour (order, outages, restarts, refreshes) is in ``test_reporting.py``.
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.mqtt_link import STOP_GRACE_S, LinkConfig, MqttLink, check_interval
from agent.outbox import Outbox
from protocol.messages import HeartbeatBody, StateBody
from protocol.topics import TopicKind
from simulators.broker import MosquittoBroker
from simulators.embedded_broker import EmbeddedBroker
from simulators.local_broker import Broker

DEVICE = "dev-link"
STATE = StateBody(online=True, agent_version="test", profile="x86-generic")

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def start_link(broker: Broker, outbox: Outbox, keepalive: int = 30) -> MqttLink:
    link = MqttLink(
        LinkConfig(DEVICE, broker.host, broker.port, keepalive=keepalive), outbox, lambda: STATE
    )
    link.start()
    deadline = time.monotonic() + 10
    while not link.status().connected:
        assert time.monotonic() < deadline, link.status()
        time.sleep(0.02)
    return link


def link_thread() -> threading.Thread:
    [thread] = [t for t in threading.enumerate() if t.name == "mqtt-link"]
    return thread


def wake_ups(thread: threading.Thread) -> int:
    """The thread's voluntary context switches: each is a sleep it woke from."""
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("vol"))


def beat(outbox: Outbox, n: int) -> int:
    return outbox.put(TopicKind.HEARTBEAT, HeartbeatBody(n, 1.0, 1, 2, 3, 0, 0, n, 0))


def test_check_interval_pings_within_the_brokers_grace() -> None:
    # paho pings once `keepalive` s passed without a packet; checking every quarter keeps the
    # ping within 1.25 keepalives, under Mosquitto's 1.5
    assert check_interval(60) == 15 and check_interval(2) == 0.5
    assert check_interval(0) == check_interval(10_000) == 60  # no keepalive: the safety net


@linux_only
def test_an_idle_link_sleeps(broker: MosquittoBroker, tmp_path: Path) -> None:
    """Connected, nothing to send: one thread, and it is not woken every second (paho's
    loop_start thread and a polling flusher each woke once a second or more)."""
    outbox = Outbox(tmp_path / "agent.db", DEVICE)
    link = start_link(broker, outbox, keepalive=60)
    try:
        time.sleep(1)  # the birth's ack and the block reservation are done
        thread = link_thread()
        before = wake_ups(thread)
        time.sleep(4)
        woken = wake_ups(thread) - before
        assert [t.name for t in threading.enumerate() if t.name.startswith(("mqtt", "paho"))] == [
            "mqtt-link"
        ]
    finally:
        link.stop(timeout=2)
        outbox.close()
    assert woken <= 2, woken  # a late ack at most; woken every second it would be 4


@pytest.fixture(params=["mosquitto", "embedded"])
def strict_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    """Mosquitto, and the embedded broker: Mosquitto 2.0.11 let a client with a 2 s keepalive
    stay silent for 4 s; the embedded one drops it after 1.5 keepalives exactly."""
    broker: Broker
    if request.param == "mosquitto":
        broker = MosquittoBroker(tmp_path / "mosquitto")
    else:
        broker = EmbeddedBroker()
    broker.start()
    yield broker
    broker.stop()


def test_keepalive_holds_an_idle_connection(
    strict_broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 2 s keepalive and nothing to send for 3.5 keepalives: the link pings in time, so the
    broker (which drops a client silent for 1.5 keepalives) keeps the connection."""
    caplog.set_level(logging.INFO, logger="agent.mqtt_link")
    outbox = Outbox(tmp_path / "agent.db", DEVICE)
    link = start_link(strict_broker, outbox, keepalive=2)
    try:
        time.sleep(7)
        status = link.status()
        seq = beat(outbox, 1)
        link.notify()
        deadline = time.monotonic() + 5
        while outbox.depth():  # still acknowledged on the same connection
            assert time.monotonic() < deadline, link.status()
            time.sleep(0.02)
    finally:
        link.stop(timeout=2)
        outbox.close()
    assert status.connected and status.connects_total == 1, status
    assert link.status().connects_total == 1 and seq > 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not warnings, warnings


def test_stop_waits_for_a_worker_stuck_in_the_outbox_then_shuts_it_out(
    broker: MosquittoBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The link thread is stuck acknowledging a report (another connection holds the database's
    write lock) beyond stop's timeout and grace: stop still returns only once the thread can no
    longer touch the outbox, so closing the outbox right after is safe (no "Cannot operate on
    a closed database" from the thread later)."""
    caplog.set_level(logging.INFO, logger="agent.mqtt_link")
    db = tmp_path / "agent.db"
    outbox = Outbox(db, DEVICE)
    link = start_link(broker, outbox)
    pid = broker.pid
    assert pid is not None
    blocker = sqlite3.connect(db, timeout=0, isolation_level=None, check_same_thread=False)
    os.kill(pid, signal.SIGSTOP)  # a hung broker: the report is sent, its ack held back
    try:
        beat(outbox, 1)
        link.notify()
        deadline = time.monotonic() + 5
        while link.status().published_total < 1:
            assert time.monotonic() < deadline, link.status()
            time.sleep(0.01)
        blocker.execute("BEGIN IMMEDIATE")  # the ack's DELETE now waits (busy timeout 10 s)
    finally:
        os.kill(pid, signal.SIGCONT)
    stuck_for = 0.5 + STOP_GRACE_S + 1.0
    release = threading.Timer(stuck_for, blocker.rollback)
    release.start()
    started = time.monotonic()
    try:
        link.stop(timeout=0.5)
        stopped_after = time.monotonic() - started
        outbox.close()
        link_thread_after = [t for t in threading.enumerate() if t.name == "mqtt-link"]
        for thread in link_thread_after:
            thread.join(5)
    finally:
        release.join()
        blocker.close()
    assert stopped_after >= stuck_for - 0.5  # it waited for the call under way
    assert all(not t.is_alive() for t in link_thread_after)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("did not end" in w for w in warned), warned
