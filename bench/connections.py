"""Connections benchmark: how many devices stay connected and heartbeating on this machine.

    .venv/bin/python bench/connections.py [--max 10000] [--steps 1000 2500 5000 7500 10000]
        [--per-process 500] [--heartbeat 10] [--hold 40]
    .venv/bin/python bench/connections.py --idle 200 [--idle-seconds 30]

Starts its own Mosquitto and fleet manager (:func:`simulators.stack.running_stack`, MQTT
ingestion on), then adds devices in steps. Each device is a real :class:`agent.main.Agent`
(its own SQLite outbox and update store, its own MQTT link and its thread; the real heartbeat
job on a scheduler shared by the agents of its process, as :mod:`simulators.host` does)
**without a model** and **without enrollment**: the device row is written into the fleet's
database directly and the agent is not provisioned, so a step is not bounded by enrollment
(HTTP, keys) or inference, only by holding connections and reporting. Device state directories
live in ``/dev/shm``: on a real fleet every device fsyncs its own disk, here one disk would be
shared by thousands. Devices are spread over processes of ``--per-process`` agents (the link
polls its socket with ``poll``, so a process is not bound to 1,024 descriptors; most of a
process's ~100 MiB is its interpreter and imports, so fewer, larger processes use less memory
per device).

After each step it holds for ``--hold`` seconds and prints: devices connected (the links'
own status), devices whose heartbeat the fleet stored during the hold, the ingestion lag
(fleet ``received_at`` - device ``ts``: p50/p99/max, first and second half of the hold),
CPU of the fleet process (this one), the broker and the device processes (and the devices' per
device, in ms per second), RSS and threads per device. It stops at ``--max`` or at the first
step where a device could not start or connect, a device's heartbeat was not stored, the lag
grows (second half's p99 over the first's by more than a heartbeat), or memory runs short. At
the end every agent stops cleanly and every report an agent wrote to its outbox (counted by a
trigger, as :mod:`simulators.host` does) must be stored by the fleet or still be in its
outbox (pending: not acknowledged when the agent stopped, sent at its next start): lost = sent -
stored - pending. It asserts nothing.

``--idle N`` only profiles N idle agents in one process against a broker (no fleet): per thread
kind (by Python thread name), threads, CPU (``/proc/self/task/*/schedstat``) and wake-ups
(voluntary context switches: each is a sleep the thread woke from) per agent per second.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sqlite3
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from datetime import UTC
from multiprocessing.connection import Connection
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable as a plain script from a checkout

import psutil  # noqa: E402

from protocol.topics import TopicKind  # noqa: E402
from simulators.stack import OUTBOX_KINDS, Stack, running_stack  # noqa: E402

PROFILE = "x86_64-gateway"
HEARTBEAT = TopicKind.HEARTBEAT.value
ANSWER_S = 120.0  # a device process slower than this to answer is starved: the step failed
OPEN_FILES = 200_000  # the broker holds a socket per device; each agent a socket and SQLite files


def raise_open_files(limit: int = OPEN_FILES) -> int:
    """Raise this process's open-file limit (soft, and hard when allowed) so the broker started
    from it inherits it; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, limit)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):  # not allowed to raise the hard limit: up to it
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- a device process -----------------------------------------------------------------------------


def device_process(
    conn: Connection, root: str, ids: list[str], host: str, port: int, heartbeat_s: float
) -> None:
    """Start an agent per id, answer ``status`` and ``stop`` on ``conn``."""
    import logging

    from apscheduler.executors.pool import ThreadPoolExecutor as JobPool
    from apscheduler.schedulers.background import BackgroundScheduler

    from agent.config import AgentConfig, DeviceConfig, MqttConfig, TelemetryConfig
    from agent.main import Agent
    from simulators.host import _instrument as instrument
    from simulators.host import raise_open_files_limit

    logging.basicConfig(level=logging.CRITICAL)
    raise_open_files_limit()
    scheduler = BackgroundScheduler(timezone=UTC, executors={"default": JobPool(max_workers=8)})
    scheduler.start()
    telemetry = TelemetryConfig(
        heartbeat_seconds=heartbeat_s, drift_window_seconds=3600.0, shutdown_flush_seconds=10.0
    )
    agents: dict[str, Agent] = {}
    failures: list[str] = []
    lock = threading.Lock()

    def start(device: str) -> None:
        state = Path(root) / device
        (state / "slots").mkdir(parents=True, exist_ok=True)
        config = AgentConfig(
            state_dir=state,
            device=DeviceConfig(device, PROFILE, "http://127.0.0.1:9/"),
            mqtt=MqttConfig(host, port, keepalive=60),
            telemetry=telemetry,
        )
        try:
            instrument(config)  # every outbox row's seq logged by a trigger, as hosts do
            agent = Agent(config, scheduler=scheduler, serve_http=False)
            agent.start()
            with lock:
                agents[device] = agent
        except Exception as exc:  # noqa: BLE001 - counted and reported
            with lock:
                failures.append(f"{type(exc).__name__}: {exc}")

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(start, ids))
    me = psutil.Process()
    conn.send({"started": len(agents), "failures": len(failures), "first": failures[:3]})
    while True:
        cmd = conn.recv()
        if cmd == "status":
            links = [a.link.status() for a in agents.values() if a.link]
            conn.send(
                {
                    "connected": sum(1 for s in links if s.connected),
                    "errors": sorted({str(s.last_error) for s in links if not s.connected})[:3],
                    "rss": me.memory_info().rss,
                    "threads": me.num_threads(),
                }
            )
        elif isinstance(cmd, tuple) and cmd[0] == "profile":
            conn.send(profile_threads(float(cmd[1])))
        elif cmd == "stop":
            with ThreadPoolExecutor(32) as pool:
                list(pool.map(lambda agent: agent.stop(), agents.values()))
            scheduler.shutdown(wait=True)
            sent: dict[str, list[int]] = {}
            pending: dict[str, list[int]] = {}
            for device in agents:
                db_path = Path(root) / device / "agent.db"
                with closing(sqlite3.connect(db_path)) as db:
                    sent[device] = [s for (s,) in db.execute("SELECT seq FROM sim_sent")]
                    pending[device] = [s for (s,) in db.execute("SELECT seq FROM outbox")]
            conn.send({"sent": sent, "pending": pending})
            return


def _thread_kind(name: str) -> str:
    """A thread's kind from its Python name: paho's network thread is named after the client."""
    if name.startswith("paho-mqtt-client-"):
        return "paho-network"
    return name.rstrip("0123456789_-") or name


def _task_counters(tid: int) -> tuple[float, int]:
    """(CPU seconds, voluntary context switches) of one thread of this process."""
    try:
        # schedstat's first field: time on a CPU in ns (stat's utime/stime count 10 ms ticks)
        cpu = int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[0]) / 1e9
        status = Path(f"/proc/self/task/{tid}/status").read_text()
    except OSError:  # the thread ended
        return 0.0, 0
    switches = next(
        int(line.split()[1]) for line in status.splitlines() if line.startswith("voluntary_")
    )
    return cpu, switches


def profile_threads(seconds: float) -> dict[str, tuple[int, float, float]]:
    """Per thread kind of this process over ``seconds``: (threads, CPU s, wake-ups), a wake-up
    being a voluntary context switch (the thread slept, on a lock, a queue, select or a timer)."""
    threads = {t.native_id: _thread_kind(t.name) for t in threading.enumerate() if t.native_id}
    before = {tid: _task_counters(tid) for tid in threads}
    time.sleep(seconds)
    out: dict[str, tuple[int, float, float]] = {}
    for tid, kind in threads.items():
        cpu, switches = _task_counters(tid)
        n, c, w = out.get(kind, (0, 0.0, 0.0))
        out[kind] = (n + 1, c + cpu - before[tid][0], w + switches - before[tid][1])
    return out


class Unresponsive(RuntimeError):
    """A device process did not answer: the machine cannot run this many devices."""


# --- the driver -----------------------------------------------------------------------------------


class Devices:
    """The device processes so far."""

    def __init__(self, root: Path, stack: Stack, heartbeat_s: float) -> None:
        self.root = root
        self.stack = stack
        self.heartbeat_s = heartbeat_s
        self.procs: list[tuple[mp.process.BaseProcess, Connection]] = []
        self.count = 0
        self.unanswered = 0  # device processes killed at the end for not answering
        self.errors: list[str] = []
        self.ctx = mp.get_context("spawn")

    def register(self, ids: list[str]) -> None:
        """The device rows, as enrollment would have written them."""
        now = "2030-01-01T00:00:00.000+00:00"
        with closing(sqlite3.connect(self.stack.settings.db_path, timeout=60)) as db, db:
            db.executemany(
                "INSERT INTO devices (id, public_key, profile, enrolled_at, mqtt_username) "
                "VALUES (?, ?, ?, ?, ?)",
                [(i, f"bench-key-{i}", PROFILE, now, i) for i in ids],
            )

    def add(self, n: int, per_process: int) -> tuple[int, int, list[str]]:
        """Start ``n`` more devices; (started, failed, first failures)."""
        ids = [f"dev-bench-{i:05d}" for i in range(self.count, self.count + n)]
        self.count += n
        self.register(ids)
        new = []
        broker = self.stack.broker
        for k in range(0, n, per_process):
            parent, child = self.ctx.Pipe()
            proc = self.ctx.Process(
                target=device_process,
                args=(
                    child,
                    str(self.root),
                    ids[k : k + per_process],
                    broker.host,
                    broker.port,
                    self.heartbeat_s,
                ),
            )
            proc.start()
            child.close()  # a device process that dies is an EOFError here, not a hang
            new.append((proc, parent))
        self.procs += new
        started = failed = 0
        first: list[str] = []
        for _, conn in new:
            if not conn.poll(600):
                failed += per_process
                first.append("a device process did not start its agents in 600 s")
                continue
            reply = conn.recv()
            started += reply["started"]
            failed += reply["failures"]
            first += reply["first"]
        return started, failed, first

    def status(self) -> tuple[int, int, int]:
        """(connected, RSS bytes, threads) over the device processes; ``errors`` keeps the
        first connection errors of devices not connected."""
        connected = rss = threads = 0
        self.errors = []
        for _, conn in self.procs:
            conn.send("status")
        for _, conn in self.procs:
            if not conn.poll(ANSWER_S):
                raise Unresponsive(f"a device process did not answer a status in {ANSWER_S} s")
            reply = conn.recv()
            self.errors += reply["errors"]
            connected += reply["connected"]
            rss += reply["rss"]
            threads += reply["threads"]
        return connected, rss, threads

    def stop(self) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
        """Every device's sent seqs and the seqs still in its outbox after its clean stop."""
        for _, conn in self.procs:
            conn.send("stop")
        sent: dict[str, list[int]] = {}
        pending: dict[str, list[int]] = {}
        for proc, conn in self.procs:
            if not conn.poll(ANSWER_S):  # starved: its reports cannot be counted
                proc.kill()
                self.unanswered += 1
                continue
            reply = conn.recv()
            sent.update(reply["sent"])
            pending.update(reply["pending"])
            proc.join(60)
        return sent, pending

    def pids(self) -> list[int]:
        return [p.pid for p, _ in self.procs if p.pid is not None]


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _lags(db_path: Path, since: float, until: float) -> list[float]:
    """Ingestion lag of the heartbeats devices sent in [since, until): received - sent, s."""
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=60)) as db:
        rows = db.execute(
            "SELECT (julianday(received_at) - 2440587.5) * 86400.0 - ts FROM telemetry_messages "
            "WHERE kind = ? AND ts >= ? AND ts < ?",
            [HEARTBEAT, since, until],
        ).fetchall()
    return [r[0] for r in rows]


def _heard(db_path: Path, since: float) -> int:
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=60)) as db:
        row = db.execute(
            "SELECT COUNT(DISTINCT device_id) FROM telemetry_messages WHERE kind = ? AND ts >= ?",
            [HEARTBEAT, since],
        ).fetchone()
    return int(row[0])


def _q(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run(args: argparse.Namespace) -> None:
    limit = raise_open_files(OPEN_FILES)
    print(
        f"open files limit {limit:,} (broker inherits it); kernel.pid_max "
        f"{Path('/proc/sys/kernel/pid_max').read_text().strip()} (every thread of every process "
        f"counts; an idle agent holds one: its MQTT link's); {psutil.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.1f} GiB"
    )
    print(
        "each device: a real agent.main.Agent without a model, its device row written directly "
        f"(no enrollment), heartbeat every {args.heartbeat:g} s, state in /dev/shm"
    )
    steps = sorted(s for s in args.steps if s <= args.max)
    with (
        tempfile.TemporaryDirectory(prefix="edgefleet-bench-conn-") as tmp,
        tempfile.TemporaryDirectory(prefix="edgefleet-conn-", dir="/dev/shm") as shm,
        running_stack(Path(tmp) / "stack") as stack,
    ):
        broker_pids = [p.pid for p in psutil.Process().children() if p.name() == "mosquitto"]
        for pid in broker_pids:
            soft = psutil.Process(pid).rlimit(psutil.RLIMIT_NOFILE)[0]
            print(f"mosquitto (pid {pid}): open files limit {soft:,}, max_connections unlimited")
        devices = Devices(Path(shm), stack, args.heartbeat)
        db_path = stack.settings.db_path
        held = 0
        print(
            "\ndevices  connected  heartbeating  lag p50/p99/max s (1st half | 2nd half)  "
            "CPU % of a core: fleet / broker / devices  device ms/s  RSS/device  threads/device"
        )
        try:
            for target in steps:
                try:
                    if not step(devices, target, args, db_path, broker_pids):
                        break
                except Unresponsive as exc:
                    print(f"stopped at {target:,}: {exc} (the machine is saturated)")
                    break
                held = target
        finally:
            stopping = time.monotonic()
            sent, pending = devices.stop()
            stopped_s = time.monotonic() - stopping
        report(stack, devices, sent, pending, stopped_s, held, args)


def step(
    devices: Devices, target: int, args: argparse.Namespace, db_path: Path, broker_pids: list[int]
) -> bool:
    """Add devices up to ``target``, hold, print a row; False when the machine did not keep up."""
    started, failed, first = devices.add(target - devices.count, args.per_process)
    deadline = time.monotonic() + 120
    while True:
        connected, rss, threads = devices.status()
        if connected >= started or time.monotonic() > deadline:
            break
        time.sleep(1)
    me = psutil.Process()
    cpu0 = (me.cpu_times(), _cpu(broker_pids), _cpu(devices.pids()))
    t0 = time.time()
    time.sleep(args.hold)
    t1 = time.time()
    cpu1 = (me.cpu_times(), _cpu(broker_pids), _cpu(devices.pids()))
    connected, rss, threads = devices.status()
    time.sleep(min(args.heartbeat, 10))  # let the hold's last heartbeats land
    mid = (t0 + t1) / 2
    first_half = _lags(db_path, t0, mid)
    second_half = _lags(db_path, mid, t1)
    heard = _heard(db_path, t1 - args.heartbeat - 1)
    span = t1 - t0
    fleet_cpu = (cpu1[0].user + cpu1[0].system - cpu0[0].user - cpu0[0].system) / span
    print(
        f"{target:>7,}  {connected:>9,}  {heard:>12,}  "
        f"{_q(first_half, 0.5):.2f}/{_q(first_half, 0.99):.2f}/"
        f"{max(first_half, default=float('nan')):.2f} | "
        f"{_q(second_half, 0.5):.2f}/{_q(second_half, 0.99):.2f}/"
        f"{max(second_half, default=float('nan')):.2f}  "
        f"{100 * fleet_cpu:>5.0f} / {100 * (cpu1[1] - cpu0[1]) / span:.0f} / "
        f"{100 * (cpu1[2] - cpu0[2]) / span:.0f}  "
        f"{1000 * (cpu1[2] - cpu0[2]) / span / devices.count:.3f}  "
        f"{rss / devices.count / 2**20:.2f} MiB  {threads / devices.count:.2f}",
        flush=True,
    )
    reasons = []
    if failed:
        reasons.append(f"{failed} device(s) could not start: {first[:2]}")
    if connected < target:
        reasons.append(f"only {connected:,} of {target:,} connected ({devices.errors[:3]})")
    if heard < target:
        reasons.append(f"only {heard:,} of {target:,} heartbeats stored in the last beat")
    if _q(second_half, 0.99) > _q(first_half, 0.99) + args.heartbeat:
        reasons.append("ingestion lag grows")
    available = psutil.virtual_memory().available
    if available < 2 * 2**30:
        reasons.append(f"memory short: {available / 2**30:.1f} GiB available")
    if reasons:
        print(f"stopped at {target:,}: " + "; ".join(reasons))
        return False
    return True


def report(
    stack: Stack,
    devices: Devices,
    sent: dict[str, list[int]],
    pending: dict[str, list[int]],
    stopped_s: float,
    held: int,
    args: argparse.Namespace,
) -> None:
    # a report still in its device's outbox (the broker had not acknowledged it when the agent
    # stopped) is pending, not lost: it goes out at the next start
    held_back = {d: set(s) for d, s in pending.items()}
    want = {d: set(s) - held_back.get(d, set()) for d, s in sent.items()}
    in_outboxes = sum(len(s) for s in held_back.values())

    def missing() -> int:
        stored = stack.stored_seqs()
        return sum(len(s - stored.get(d, set())) for d, s in want.items())

    deadline = time.monotonic() + 120
    while (lost := missing()) and time.monotonic() < deadline:
        time.sleep(2)
    total = sum(len(s) for s in sent.values())
    stored_total = total - in_outboxes - lost
    print(
        f"\nheld: {held:,} devices connected and heartbeating every {args.heartbeat:g} s with "
        f"the fleet's ingestion keeping up"
    )
    print(
        f"reports (kinds {', '.join(OUTBOX_KINDS)}): {total:,} sent, {stored_total:,} stored "
        f"and acknowledged, {in_outboxes:,} pending (left in outboxes after a clean stop of "
        f"{stopped_s:.0f} s; some may be stored already), {lost:,} lost"
        + (
            f"; {devices.unanswered} device process(es) did not answer and were killed "
            "(their reports are not counted)"
            if devices.unanswered
            else ""
        )
    )


def idle(args: argparse.Namespace) -> None:
    """Idle agents: ``--idle N`` agents in one process against a broker only, heartbeat every
    ``--heartbeat`` s and nothing else; per thread kind, CPU and wake-ups per agent."""
    from simulators.broker import MosquittoBroker

    raise_open_files(OPEN_FILES)
    n = args.idle
    with (
        tempfile.TemporaryDirectory(prefix="edgefleet-bench-idle-") as tmp,
        tempfile.TemporaryDirectory(prefix="edgefleet-idle-", dir="/dev/shm") as shm,
        MosquittoBroker(Path(tmp) / "broker") as broker,
    ):
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        ids = [f"dev-idle-{i:05d}" for i in range(n)]
        proc = ctx.Process(
            target=device_process,
            args=(child, shm, ids, broker.host, broker.port, args.heartbeat),
        )
        proc.start()
        child.close()  # a device process that dies is an EOFError here, not a hang
        try:
            reply = parent.recv()
            deadline = time.monotonic() + 60
            while True:
                parent.send("status")
                status = parent.recv()
                if status["connected"] >= reply["started"] or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            time.sleep(args.heartbeat + 2)  # past the first heartbeats and the settling
            whole = psutil.Process(proc.pid)
            cpu0 = sum(whole.cpu_times()[:2])
            parent.send(("profile", args.idle_seconds))
            kinds = parent.recv()
            cpu = sum(whole.cpu_times()[:2]) - cpu0
        finally:
            parent.send("stop")
            if parent.poll(120):
                parent.recv()
            proc.join(30)
    span = args.idle_seconds
    print(
        f"{n} idle agents in one process ({status['connected']} connected), heartbeat every "
        f"{args.heartbeat:g} s, measured over {span:g} s; per agent:"
    )
    print(f"{'thread':<24} {'threads':>8} {'CPU ms/s':>9} {'wake-ups/s':>11}")
    total_cpu = total_wake = 0.0
    for kind, (threads, cpu_s, wakes) in sorted(kinds.items(), key=lambda kv: -kv[1][2]):
        total_cpu += cpu_s
        total_wake += wakes
        print(
            f"{kind:<24} {threads / n:>8.2f} {1000 * cpu_s / span / n:>9.3f} "
            f"{wakes / span / n:>11.2f}"
        )
    print(
        f"{'all threads':<24} {sum(k[0] for k in kinds.values()) / n:>8.2f} "
        f"{1000 * total_cpu / span / n:>9.3f} {total_wake / span / n:>11.2f}"
    )
    print(
        f"the whole device process: {1000 * cpu / span / n:.3f} ms CPU per agent per second "
        f"({100 * cpu / span:.1f}% of a core for {n})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max", type=int, default=10_000)
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 2500, 5000, 7500, 10_000])
    parser.add_argument("--per-process", type=int, default=500, help="devices per process")
    parser.add_argument("--heartbeat", type=float, default=10.0)
    parser.add_argument("--hold", type=float, default=40.0, help="seconds held at each step")
    parser.add_argument(
        "--idle",
        type=int,
        default=0,
        metavar="N",
        help="only profile N idle agents in one process (CPU and wake-ups per thread kind)",
    )
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if args.idle:
        idle(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
