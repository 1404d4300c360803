"""Rollout benchmark: N simulated devices through a 4-stage rollout with zero soak.

    .venv/bin/python bench/rollout.py [--devices 100 1000] [--processes K]

Each fleet size is one :func:`simulators.run.run_scenario` (its own Mosquitto and fleet manager,
real agents in host processes spread by :mod:`simulators.supervisor`; the scenario is built
here, not read from a file): v2 goes to every device in 1% -> 10% -> 50% -> 100% stages with
``soak_s = 0``. Printed per size:

* wall time from the rollout's creation to its last device committed, and to the rollout's
  ``completed`` (the controller's next tick after that);
* per stage: when its devices were assigned, when its last device committed, when it was
  promoted, from the fleet's own records (``rollout_events``, ``rollout_devices`` and the
  devices' ``update_events``);
* per stage, the seconds a committed device spent in each phase of its update (median, p90,
  max): the desired document's delivery, then the agent's own timings (TUF refresh,
  download, verification, install, health check, activation, trial);
* the fleet process's CPU over the rollout (this process: the fleet app, its ingestion and
  scheduler, and the run's polling of the rollout every 0.5 s, every 2 s past 200 devices;
  the devices run in their host processes, at nice 10, measured apart), in CPU seconds and %
  of one core;
* predictions served per device per second (the feeding rate the trial depends on);
* the rate in devices per minute beside AWS IoT Jobs' default rollout cap of 1,000/minute
  (``maximumPerMinute``);
* reports the agents wrote against reports the fleet stored; those still in a device's outbox
  when its agent stopped are printed apart (pending, sent at the next start), not as lost.

* the fleet's scheduler runs that APScheduler skipped (the previous run of that job still
  going) or started late, per job: the fleet runs in this process, and a starved rollout
  controller would make the stages slower than the fleet is.

Devices go 100 to a host process (``--processes`` overrides; paho's select() cannot watch the
sockets of many more in one process), and the supervisor starts the host processes two at a time
(each enrolls 4 devices at a time): all ten at once made the fleet's enrollment answer "database
is locked" on a 2-core machine.

A stage cannot pass sooner than the controller's next tick (every 5 s) after its gates have data
(the latency gate waits for a heartbeat from a device on each release): that floor is printed.
It asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sqlite3
import sys
import tempfile
import threading
import time
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable as a plain script from a checkout

import psutil  # noqa: E402

import fleet.rollouts  # noqa: E402
from fleet.rollouts import CONTROLLER_EVERY  # noqa: E402
from simulators.run import RunResult, run_scenario  # noqa: E402
from simulators.scenario import (  # noqa: E402
    Group,
    ReleaseSpec,
    RolloutSpec,
    ScenarioSpec,
    Stage,
    Timing,
)

AWS_IOT_JOBS_MAX_PER_MINUTE = 1000
STAGES = (1.0, 10.0, 50.0, 100.0)
# The trial's latency gate compares the new model's p95 over its first few requests with the
# previous model's over many. A hosted agent shares its process's GIL with a hundred others
# downloading, verifying and loading models at the same moment: at 300 devices single
# predictions of 0.14-0.17 ms waited 20-62 ms in trial (147-437x, past the simulator releases'
# 100x) and rolled the rollout back; at 1,000, 560-620 ms were seen (~4,000x). The bench
# measures the rollout, as it widens the health check's latency budget
# (``latency_budget_scale``), so its releases allow 10,000x (the fleet's latency gate on the
# devices' heartbeats still runs).
RELEASE_HEALTH = {"max_latency_ratio": 10_000.0}
# What a real fleet runs, not a shortcut: each device classifies a batch of 8 sensor windows once
# a second, and v2 keeps the committed bundle's own trial (models/bundles/pdm-classifier/2:
# 30 s and at least 20 live requests on the new model before it commits). The simulator's
# releases shorten the trial to 1.5 s / 5 requests so tests run in seconds; a rollout figure
# measured that way would leave out the half-minute each device really spends in trial.
PREDICT_EVERY_S = 1.0
BATCH_ROWS = 8
TRIAL_SECONDS = 30.0
TRIAL_MIN_REQUESTS = 20


def scenario(
    devices: int, processes: int, heartbeat_s: float, every_s: float = PREDICT_EVERY_S
) -> ScenarioSpec:
    """Every device on v1 takes v2 in four zero-soak stages; gates only wait for their data."""
    gates = {
        "min_latency_samples": 1,
        "latency_ratio": 50.0,
        "min_drift_n": 50,
        "stuck_timeout_s": 600,
        # 1% of the fleet may roll back on its own (the trial's output check is now bounded by
        # its sample size, see agent/trial.py; this is the margin for whatever else a loaded
        # 2-core machine throws at a thousand trials)
        "max_trial_failures": max(1, devices // 100),
    }
    return ScenarioSpec(
        name=f"bench-rollout-{devices}",
        source="bench/rollout.py",
        groups=(Group("fleet"),),
        devices=devices,
        processes=processes,
        timing=Timing(
            heartbeat_s=heartbeat_s,
            drift_window_s=heartbeat_s,
            drift_min_rows=20,
            predict_every_s=every_s,
            batch_rows=BATCH_ROWS,
            time_scale=1.0,
            warmup_s=heartbeat_s,
            # a device's health check and trial measure its latency on a machine shared with a
            # thousand others at nice 10 (p95 60-140 ms against the default 50 ms budget at
            # 1,000 devices; 560-620 ms for 22 of 400 updating at once): the bench measures the
            # rollout, so their budget is 5 s
            latency_budget_scale=1000.0,
        ),
        releases=(ReleaseSpec(2, "v2"),),
        rollouts=(
            RolloutSpec(
                version=2,
                stages=tuple(Stage(p, soak_s=0.0, max_wait_s=900.0) for p in STAGES),
                expect="completed",
                gates=tuple(sorted(gates.items())),
                timeout_s=1800.0,
            ),
        ),
    )


class CpuSampler:
    """(wall time, this process's CPU seconds, the host processes' CPU seconds) every 0.5 s."""

    def __init__(self) -> None:
        self.me = psutil.Process()
        self.samples: list[tuple[float, float, float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)
        self._hosts: dict[int, psutil.Process] = {}
        self._hosts_cpu: dict[int, float] = {}

    def _sample(self) -> None:
        for child in self.me.children(recursive=False):
            if child.pid not in self._hosts and "simulators.host" in " ".join(child.cmdline()):
                self._hosts[child.pid] = child
        rss = 0
        for pid, proc in list(self._hosts.items()):
            try:
                t = proc.cpu_times()
                self._hosts_cpu[pid] = t.user + t.system
                rss += proc.memory_info().rss
            except psutil.Error:  # exited: keep its last reading
                pass
        t = self.me.cpu_times()
        self.samples.append((time.time(), t.user + t.system, sum(self._hosts_cpu.values()), rss))

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self._sample()
            except psutil.Error:
                continue

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def between(self, start: float, end: float) -> tuple[float, float]:
        """CPU seconds of (this process, the hosts) from the last sample at or before ``start``
        to the first at or after ``end``."""
        before = [s for s in self.samples if s[0] <= start] or self.samples[:1]
        after = [s for s in self.samples if s[0] >= end] or self.samples[-1:]
        a, b = before[-1], after[0]
        return b[1] - a[1], b[2] - a[2]

    def peak_rss(self) -> int:
        return max((s[3] for s in self.samples), default=0)


class SchedulerOverruns(logging.Handler):
    """Counts APScheduler's warnings that a job's run was skipped (its previous run still going)
    or missed its time, by job name."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.skipped: dict[str, int] = {}
        self.missed: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        job = message.split('"')[1].split(" (")[0] if '"' in message else "?"
        if "maximum number of running instances" in message:
            self.skipped[job] = self.skipped.get(job, 0) + 1
        elif "was missed by" in message:
            self.missed[job] = self.missed.get(job, 0) + 1

    def __enter__(self) -> SchedulerOverruns:
        logging.getLogger("apscheduler").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("apscheduler").removeHandler(self)

    def summary(self) -> str:
        if not self.skipped and not self.missed:
            return "no run skipped or late"
        parts = [f"{job} skipped {n}x" for job, n in sorted(self.skipped.items())]
        parts += [f"{job} late {n}x" for job, n in sorted(self.missed.items())]
        return ", ".join(parts)


class TickTimer:
    """Wall time of each rollout controller tick (``fleet.rollouts.controller_tick``, which the
    scheduler's job looks up at each run): a tick longer than the 5 s interval is what makes
    APScheduler skip the next one."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._inner = fleet.rollouts.controller_tick

    def __enter__(self) -> TickTimer:
        inner = self._inner

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds.append(time.perf_counter() - t0)

        fleet.rollouts.controller_tick = timed
        return self

    def __exit__(self, *exc: object) -> None:
        fleet.rollouts.controller_tick = self._inner

    def summary(self) -> str:
        if not self.seconds:
            return "no tick"
        ticks = sorted(self.seconds)
        return (
            f"{len(ticks)} ticks, median {ticks[len(ticks) // 2]:.2f} s, max {ticks[-1]:.2f} s, "
            f"{sum(t > CONTROLLER_EVERY.total_seconds() for t in ticks)} longer than the interval"
        )


@dataclass(frozen=True)
class StageTimes:
    index: int
    percent: float
    devices: int
    assigned: float  # seconds from the rollout's creation
    last_committed: float
    promoted: float


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def stage_times(db_path: Path, rollout_id: str) -> tuple[float, list[StageTimes], float, float]:
    """From the fleet's database: creation time (epoch), per-stage times, the last commit and
    the ``completed`` event (seconds from creation)."""
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        created = _epoch(
            db.execute("SELECT created_at FROM rollouts WHERE id = ?", [rollout_id]).fetchone()[0]
        )
        events = db.execute(
            "SELECT ts, event, to_state, stage FROM rollout_events "
            "WHERE rollout_id = ? ORDER BY id",
            [rollout_id],
        ).fetchall()
        rows = db.execute(
            "SELECT d.stage, COUNT(*), MIN(d.assigned_at), MAX(u.ts) FROM rollout_devices d "
            "LEFT JOIN (SELECT device_id, MAX(ts) AS ts FROM update_events "
            "  WHERE to_state = 'committed' AND release_version = 2 GROUP BY device_id) u "
            "ON u.device_id = d.device_id WHERE d.rollout_id = ? GROUP BY d.stage ORDER BY d.stage",
            [rollout_id],
        ).fetchall()
    ends: dict[int, float] = {}
    completed = float("nan")
    for ts, event, to_state, stage in events:
        if to_state == "completed":
            completed = _epoch(ts) - created
        if event == "promote":  # stored with the stage it starts
            ends[stage - 1] = _epoch(ts) - created
        elif event == "complete":
            ends[stage] = _epoch(ts) - created
    out = []
    last = 0.0
    for stage, count, assigned, committed in rows:
        done = (committed - created) if committed is not None else float("nan")
        last = max(last, done)
        out.append(
            StageTimes(
                stage,
                STAGES[stage],
                count,
                (_epoch(assigned) - created) if assigned else float("nan"),
                done,
                ends.get(stage, float("nan")),
            )
        )
    return created, out, last, completed


PHASES = (
    "delivery",
    "idle",
    "downloading",
    "verifying",
    "installing",
    "health_check",
    "shadow",
    "activating",
    "trial",
)


def phase_times(db_path: Path, rollout_id: str) -> dict[int, dict[str, list[float]]]:
    """Per stage, per phase, each committed device's seconds in it: ``delivery`` from the
    fleet's assignment to the agent's update starting (the desired document published, sent
    over MQTT, handed to the update engine), then the agent's own ``elapsed_s`` of its committed
    report (``idle``: TUF refresh and document checks; then each state of the update)."""
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        rows = db.execute(
            "SELECT d.stage, d.assigned_at, u.ts, u.elapsed_s FROM rollout_devices d "
            "JOIN update_events u ON u.device_id = d.device_id "
            "WHERE d.rollout_id = ? AND u.to_state = 'committed' AND u.release_version = 2",
            [rollout_id],
        ).fetchall()
    out: dict[int, dict[str, list[float]]] = {}
    for stage, assigned, ts, elapsed_json in rows:
        elapsed: dict[str, float] = json.loads(elapsed_json)
        phases = out.setdefault(stage, {p: [] for p in PHASES})
        if assigned:
            began = ts - sum(elapsed.values())  # the agent's clock is this machine's
            phases["delivery"].append(began - _epoch(assigned))
        for name, seconds in elapsed.items():
            phases.setdefault(name, []).append(seconds)
    return out


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def bench(
    devices: int,
    processes: int,
    heartbeat_s: float,
    every_s: float = PREDICT_EVERY_S,
    trial_s: float = TRIAL_SECONDS,
    trial_requests: int = TRIAL_MIN_REQUESTS,
) -> None:
    spec = scenario(devices, processes, heartbeat_s, every_s)
    health = {
        **RELEASE_HEALTH,
        "trial_seconds": trial_s,
        "trial_min_requests": trial_requests,
    }
    print(
        f"\n=== {devices} devices over {processes} host process(es), 4 stages "
        f"{' -> '.join(f'{p:g}%' for p in STAGES)}, zero soak, heartbeat {heartbeat_s:g} s, "
        f"a batch of {BATCH_ROWS} rows every {every_s:g} s, trial {trial_s:g} s and "
        f"{trial_requests} requests ==="
    )
    log: list[str] = []

    def say(line: str) -> None:  # the run's narration goes to stderr as it happens
        log.append(line)
        print(f"  [{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    with (
        tempfile.TemporaryDirectory(prefix="edgefleet-bench-rollout-") as tmp,
        CpuSampler() as cpu,
        SchedulerOverruns() as overruns,
        TickTimer() as ticks,
    ):
        result: RunResult = run_scenario(spec, Path(tmp), say=say, release_health=health)
        outcome = result.rollouts[0] if result.rollouts else None
        if outcome is None or not outcome.rollout_id:
            print("\n".join(log[-20:]))
            print(result.summary())
            return
        db_path = Path(tmp) / "stack" / "fleet" / "fleet.db"
        created, stages, last, completed = stage_times(db_path, outcome.rollout_id)
        phases = phase_times(db_path, outcome.rollout_id)
        with closing(sqlite3.connect(db_path)) as db:
            reverted = db.execute(
                "SELECT device_id, to_state, reason FROM update_events "
                "WHERE to_state IN ('rolling_back', 'failed') AND release_version = 2"
            ).fetchall()
            # what ingestion dropped (malformed, unknown device...) is counted, never silent
            rejected = db.execute(
                "SELECT name, value FROM ingest_counters WHERE name LIKE 'rejected:%' AND value > 0"
            ).fetchall()
        window = completed if math.isfinite(completed) else last
        fleet_cpu, hosts_cpu = cpu.between(created, created + window)
        peak = cpu.peak_rss()
    if not result.ok:  # what the run said about the rollout, to see why
        print("\n".join(f"  | {line}" for line in log if "rollout" in line))
    for name, seconds in result.timings.items():
        print(f"  {name}: {seconds:.1f} s")
    print(f"  rollout {outcome.rollout_id}: {outcome.state} ({outcome.reason})")
    print("  stage  share  devices  assigned   last committed  promoted/completed  (s from start)")
    for s in stages:
        print(
            f"  {s.index:>5}  {s.percent:>4g}%  {s.devices:>7}  {s.assigned:>8.1f}  "
            f"{s.last_committed:>15.1f}  {s.promoted:>18.1f}"
        )
    print("  seconds a committed device spent in each phase, median / p90 (max) per stage:")
    for stage, by_phase in sorted(phases.items()):
        cells = [
            f"{name} {_quantile(v, 0.5):.1f}/{_quantile(v, 0.9):.1f} ({max(v):.1f})"
            for name, v in by_phase.items()
            if v
        ]
        print(f"    stage {stage}: " + ", ".join(cells))
    for device, state, reason in reverted[:5]:
        print(f"  not committed: {device} {state}: {reason}")
    if len(reverted) > 5:
        print(f"  ... {len(reverted)} in all")
    per_stage = [s.promoted - (stages[i - 1].promoted if i else 0.0) for i, s in enumerate(stages)]
    print("  per-stage wall time: " + ", ".join(f"{t:.1f} s" for t in per_stage))
    print(f"  wall time to 100% committed: {last:.1f} s (rollout completed at {completed:.1f} s)")
    rate = devices / last * 60 if last > 0 else float("nan")
    print(
        f"  rate: {rate:,.0f} devices/min to committed; AWS IoT Jobs caps a rollout at "
        f"{AWS_IOT_JOBS_MAX_PER_MINUTE:,}/min (ratio {rate / AWS_IOT_JOBS_MAX_PER_MINUTE:.2f})"
    )
    print(
        f"  floor: 4 stages x the controller tick ({CONTROLLER_EVERY.total_seconds():g} s) = "
        f"{4 * CONTROLLER_EVERY.total_seconds():g} s, plus a heartbeat ({heartbeat_s:g} s) a stage "
        "for the latency gate"
    )
    print(
        f"  fleet process CPU over the rollout ({window:.1f} s): {fleet_cpu:.1f} CPU s = "
        f"{100 * fleet_cpu / window:.0f}% of one core; device hosts: {hosts_cpu:.1f} CPU s = "
        f"{100 * hosts_cpu / window:.0f}% of one core ({psutil.cpu_count()} cores here); "
        f"host RSS peak {peak / 2**20:,.0f} MiB = {peak / devices / 2**20:.1f} MiB a device"
    )
    print(f"  fleet scheduler over the run: {overruns.summary()}")
    print(f"  rollout controller: {ticks.summary()}")
    fed = result.timings.get("rollouts and faults", 0.0) + spec.timing.warmup_s
    if fed > 0:
        print(
            f"  predictions: {result.predictions:,} served, {result.prediction_errors} failed; "
            f"~{result.predictions / devices / fed:.2f} batches/s a device from the warmup to "
            f"the end (intended {1 / every_s:g}; devices enrolled first served longer)"
        )
    dropped = ", ".join(f"{name} {n}" for name, n in rejected) or "none"
    print(f"  reports the fleet's ingestion dropped (counted): {dropped}")
    print(
        f"  reports: {result.sent} sent, {result.stored} stored, {result.pending} still in "
        f"device outboxes at stop (not lost), {result.lost} lost; "
        f"devices per version {result.versions}; "
        f"{'every expected outcome met' if result.ok else 'FAILED: ' + '; '.join(result.failures)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[100, 1000])
    parser.add_argument(
        "--processes", type=int, default=0, help="host processes (default: 1 per 100 devices)"
    )
    parser.add_argument("--heartbeat", type=float, default=10.0, help="heartbeat seconds")
    parser.add_argument(
        "--every", type=float, default=PREDICT_EVERY_S, help="seconds between a device's batches"
    )
    parser.add_argument(
        "--trial-seconds", type=float, default=TRIAL_SECONDS, help="v2's trial soak"
    )
    parser.add_argument(
        "--trial-requests", type=int, default=TRIAL_MIN_REQUESTS, help="v2's trial requests"
    )
    args = parser.parse_args()
    for n in args.devices:
        bench(
            n,
            args.processes or max(1, -(-n // 100)),
            args.heartbeat,
            args.every,
            args.trial_seconds,
            args.trial_requests,
        )


if __name__ == "__main__":
    main()
