"""Reporting benchmark: the outbox's durable puts and the MQTT link's flush rate, with baselines.

* **outbox puts/s**: :meth:`agent.outbox.Outbox.put` (next seq, envelope encoded, row and counter
  written, bound checked, committed with ``synchronous=FULL``) against the floor of any durable
  SQLite queue: a bare ``INSERT`` of the same payload plus ``COMMIT`` on a connection with the
  same pragmas (WAL, ``synchronous=FULL``).
* **link flush msgs/s**: a pre-filled outbox drained through :class:`agent.mqtt_link.MqttLink`
  (QoS 1 publish, PUBACK, row deleted) against a bare paho client publishing the same payloads
  with QoS 1 and the same in-flight window, waiting for every PUBACK, touching no disk.

Rounds of ours and the baseline alternate, so drift in machine load hits both alike; medians are
printed with the ratio ours/baseline. It asserts nothing.

    .venv/bin/python bench/reporting.py [--rounds N] [--puts N] [--messages N]
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable as a plain script from a checkout

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from agent.mqtt_link import LinkConfig, MqttLink  # noqa: E402
from agent.outbox import Outbox  # noqa: E402
from protocol.messages import HeartbeatBody, Latency, ModelRef, StateBody  # noqa: E402
from protocol.topics import TopicKind, heartbeat_topic  # noqa: E402
from simulators.broker import MosquittoBroker  # noqa: E402

DEVICE = "bench-1"
BODY = HeartbeatBody(
    3600.0, 12.5, 48_000_000, 1_500_000_000, 9_000_000_000, 0, 0, 120_000, 2,
    Latency(1.8, 3.1, 4.7), ModelRef("vibration", 3),
)  # fmt: skip
STATE = StateBody(True, "bench", "x86-generic")
WINDOW = 20


def outbox_puts(path: Path, n: int) -> float:
    with Outbox(path, DEVICE) as box:
        start = time.perf_counter()
        for _ in range(n):
            box.put(TopicKind.HEARTBEAT, BODY)
        return n / (time.perf_counter() - start)


def bare_puts(path: Path, n: int, payload: bytes) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS q (seq INTEGER PRIMARY KEY, topic TEXT, payload BLOB)")
    topic = heartbeat_topic(DEVICE)
    start = time.perf_counter()
    for _ in range(n):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO q (topic, payload) VALUES (?, ?)", (topic, payload))
        conn.execute("COMMIT")
    rate = n / (time.perf_counter() - start)
    conn.close()
    return rate


def link_flush(broker: MosquittoBroker, path: Path, n: int) -> float:
    with Outbox(path, DEVICE, max_rows=n + 10) as box:
        for _ in range(n):
            box.put(TopicKind.HEARTBEAT, BODY)
        config = LinkConfig(DEVICE, broker.host, broker.port, inflight_window=WINDOW)
        link = MqttLink(config, box, lambda: STATE)
        start = time.perf_counter()
        link.start()
        while box.depth():
            time.sleep(0.002)
        rate = n / (time.perf_counter() - start)
        link.stop(timeout=2)
    return rate


def bare_flush(broker: MosquittoBroker, n: int, payload: bytes) -> float:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bare-" + uuid.uuid4().hex[:6])
    client.max_inflight_messages_set(WINDOW)
    done = threading.Event()
    acked = 0

    def on_publish(*_: object) -> None:
        nonlocal acked
        acked += 1
        if acked == n:
            done.set()

    client.on_publish = on_publish
    topic = heartbeat_topic(DEVICE)
    start = time.perf_counter()
    client.connect(broker.host, broker.port)
    client.loop_start()
    for _ in range(n):
        client.publish(topic, payload, qos=1)
    done.wait(120)
    rate = n / (time.perf_counter() - start)
    client.disconnect()
    client.loop_stop()
    return rate


def report(name: str, ours: list[float], base: list[float], unit: str) -> None:
    o, b = statistics.median(ours), statistics.median(base)
    print(
        f"{name:<22} ours {o:>9.0f} {unit}   baseline {b:>9.0f} {unit}   ours/baseline {o / b:.2f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--puts", type=int, default=400)
    parser.add_argument("--messages", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with Outbox(work / "probe.db", DEVICE) as box:
            box.put(TopicKind.HEARTBEAT, BODY)
            payload = box.peek(1)[0].payload
        ours_put, bare_put, ours_link, bare_link = [], [], [], []
        with MosquittoBroker(work / "mosquitto") as broker:
            for r in range(args.rounds):
                ours_first = r % 2 == 0  # alternate who goes first
                for ours in (ours_first, not ours_first):
                    if ours:
                        ours_put.append(outbox_puts(work / f"o{r}.db", args.puts))
                    else:
                        bare_put.append(bare_puts(work / f"b{r}.db", args.puts, payload))
                for ours in (ours_first, not ours_first):
                    if ours:
                        ours_link.append(link_flush(broker, work / f"l{r}.db", args.messages))
                    else:
                        bare_link.append(bare_flush(broker, args.messages, payload))
    print(f"payload {len(payload)} bytes, {args.rounds} rounds, medians")
    report("outbox put (durable)", ours_put, bare_put, "puts/s")
    report("link flush (QoS 1)", ours_link, bare_link, "msgs/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
