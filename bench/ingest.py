"""Durable telemetry ingestion rate against the raw paho QoS 1 subscriber rate, in one run.

Starts its own Mosquitto (simulators.broker) and a temporary fleet database, then, per round:

* **raw**: a bare paho QoS 1 subscriber (MQTT 3.1.1, persistent session, automatic PUBACK) that
  only counts; a separate load process publishes N reports (QoS 1, M devices); the rate is
  N / (publish start -> last message received);
* **durable**: the fleet ingester (:class:`fleet.ingest.Ingester`: parse, one transaction per
  batch with ``synchronous=FULL``, acknowledgement after commit); the same load; the rate is
  N / (publish start -> last row committed), and ``lost`` = valid published - rows stored.

    .venv/bin/python bench/ingest.py [--n 20000] [--devices 50] [--rounds 2] [--batch-max 100]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import threading
import time
from contextlib import closing
from multiprocessing.connection import Connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from fleet.ingest import IngestConfig, Ingester, retire_session  # noqa: E402
from fleet.ingest_writer import read_counters  # noqa: E402
from fleet.store import Store, connect, migrate  # noqa: E402
from simulators.broker import MosquittoBroker  # noqa: E402


def load_process(conn: Connection, host: str, port: int, n: int, devices: int, seed: int) -> None:
    """Build the workload, say ready, wait for go, publish; send back (start, end) monotonic."""
    from simulators.telemetry_load import make_workload, publish

    ids = [f"bench-{i:04d}" for i in range(devices)]
    # sequence numbers new to every round, so each round's reports are new rows
    work = make_workload(ids, n, drift_every=500, seed=seed, first_seq=1 + seed * n)
    conn.send(("ready", len(work.expected)))
    conn.recv()
    start = time.monotonic()
    publish(host, port, work.messages, timeout=600)
    conn.send(("done", start, time.monotonic()))


def run_load(
    broker: MosquittoBroker, n: int, devices: int, seed: int
) -> tuple[mp.process.BaseProcess, Connection, int]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(
        target=load_process, args=(child, broker.host, broker.port, n, devices, seed)
    )
    proc.start()
    tag, valid = parent.recv()
    assert tag == "ready"
    return proc, parent, int(valid)


def raw_round(broker: MosquittoBroker, n: int, devices: int, seed: int) -> tuple[float, int]:
    proc, pipe, _ = run_load(broker, n, devices, seed)
    count = 0
    last = 0.0
    done = threading.Event()

    def on_message(_c: mqtt.Client, _u: object, _m: mqtt.MQTTMessage) -> None:
        nonlocal count, last
        count += 1
        last = time.monotonic()
        if count >= n:
            done.set()

    subscribed = threading.Event()
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id="bench-raw",
        protocol=mqtt.MQTTv311,
        clean_session=True,  # only this round's messages
    )
    client.on_message = on_message
    client.on_subscribe = lambda *_: subscribed.set()
    client.connect(broker.host, broker.port)
    client.subscribe("edgefleet/v1/devices/#", qos=1)
    client.loop_start()
    subscribed.wait(10)
    pipe.send("go")
    done.wait(600)
    _, start, _ = pipe.recv()
    proc.join()
    client.disconnect()
    client.loop_stop()
    return last - start, count


def durable_round(
    broker: MosquittoBroker, db_path: Path, n: int, devices: int, seed: int, batch_max: int
) -> tuple[float, int, int, int]:
    """Seconds from publish start to last commit, rows stored, valid published, batches."""
    with closing(connect(db_path)) as db:
        before = sum(read_counters(db).values())
        rows_before = db.execute("SELECT count(*) FROM telemetry_messages").fetchone()[0]
    proc, pipe, valid = run_load(broker, n, devices, seed)
    config = IngestConfig(broker.host, broker.port, "bench-ingest-0", batch_max=batch_max)
    ingester = Ingester(config, Store(db_path))
    ingester.start()
    ingester.wait_connected(10)
    time.sleep(0.3)  # the SUBACK
    pipe.send("go")
    last = time.monotonic()
    with closing(connect(db_path)) as db:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if sum(read_counters(db).values()) - before >= n:
                last = time.monotonic()
                break
            time.sleep(0.005)
        _, start, _ = pipe.recv()
        proc.join()
        ingester.stop()
        # leave no session behind: it would queue the next raw round's load for itself
        retire_session(config)
        rows = db.execute("SELECT count(*) FROM telemetry_messages").fetchone()[0] - rows_before
    return last - start, int(rows), valid, ingester.batches


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="reports per round (default 20000)")
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-max", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        broker = MosquittoBroker(Path(tmp) / "mosquitto")
        broker.start()
        db_path = Path(tmp) / "fleet.db"
        with closing(connect(db_path)) as db:
            migrate(db)
            for i in range(args.devices):
                db.execute(
                    "INSERT INTO devices (id, public_key, profile, enrolled_at, mqtt_username) "
                    "VALUES (?, ?, 'x86-generic', '2030-01-01T00:00:00.000+00:00', ?)",
                    [f"bench-{i:04d}", f"key-{i}", f"bench-{i:04d}"],
                )
            db.conn.commit()
        raw_rates, durable_rates, lost_total, batches = [], [], 0, []
        try:
            for r in range(args.rounds):
                seconds, got = raw_round(broker, args.n, args.devices, seed=r)
                raw_rates.append(got / seconds)
                # new seeds per durable round: each round's reports are new (device, seq) rows
                seconds, rows, valid, nb = durable_round(
                    broker, db_path, args.n, args.devices, 1000 + r, args.batch_max
                )
                durable_rates.append(rows / seconds)
                lost_total += valid - rows
                batches.append(rows / max(nb, 1))
                print(
                    f"round {r + 1}: raw {raw_rates[-1]:8.0f} msg/s ({got} received), "
                    f"durable {durable_rates[-1]:8.0f} msg/s ({rows}/{valid} stored, "
                    f"{nb} batches)",
                    flush=True,
                )
        finally:
            broker.stop()
    raw, durable = statistics.median(raw_rates), statistics.median(durable_rates)
    print()
    print(f"{'N per round':<40}{args.n:>12}")
    print(f"{'devices':<40}{args.devices:>12}")
    print(f"{'raw paho QoS 1 subscriber (msg/s)':<40}{raw:>12.0f}")
    print(f"{'durable ingestion to SQLite (msg/s)':<40}{durable:>12.0f}")
    print(f"{'durable / raw':<40}{durable / raw:>12.2f}")
    print(f"{'mean rows per transaction':<40}{statistics.mean(batches):>12.1f}")
    print(f"{'lost (valid published - stored)':<40}{lost_total:>12}")
    return 0 if lost_total == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
