"""Soak benchmark: a long-ish mixed run ending with reports sent vs stored and working models.

    .venv/bin/python bench/soak.py [--minutes 6] [--devices 40] [--processes 2]
    .venv/bin/python bench/soak.py --quick          # ~1.5 minutes

Real agents in host processes (:mod:`simulators.supervisor`) against their own Mosquitto and
fleet manager (:mod:`simulators.stack`), for ``--minutes`` of steady reporting through, at
fractions of the run's length:

* 0.05: a fifth of the devices go offline (their agents stop; reports pile up in their
  outboxes) for a quarter of the run, one more loses power in the middle of its install;
* 0.15: an update rollout of v2 starts (10% soaking 0.15 of the run -> 50% soaking 0.3 ->
  100%), so its second stage spans both restarts;
* 0.35: the broker stops for ``--down`` seconds and starts again (persistent sessions kept);
* 0.60: the fleet manager stops for ``--down`` seconds and starts again on its data (its
  persistent MQTT session keeps what devices sent meanwhile; the rollout carries on);

then every device must come back and settle, every agent stops cleanly, and it prints how many
reports the agents wrote to their outboxes against how many the fleet stored (must be equal)
and how many devices serve a working model (must be all). The scenario (devices, faults,
rollout) is built here and run with :mod:`simulators.run`'s planning and outcome checks; only
the timeline of broker and fleet restarts is this script's. It asserts nothing; it exits 1
when an outcome was not met.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable as a plain script from a checkout

import httpx  # noqa: E402

from agent.config import TelemetryConfig  # noqa: E402
from simulators.host import HostSettings  # noqa: E402
from simulators.releases import build_release  # noqa: E402
from simulators.run import (  # noqa: E402
    RolloutOutcome,
    RunResult,
    Say,
    _account,
    _on_host_event,
    _settle,
    plan_fleet,
    rollout_body,
)
from simulators.scenario import (  # noqa: E402
    Fault,
    Group,
    ReleaseSpec,
    RolloutSpec,
    ScenarioSpec,
    Stage,
    Timing,
)
from simulators.stack import Stack, running_stack  # noqa: E402
from simulators.supervisor import Supervisor  # noqa: E402


def scenario(devices: int, processes: int, seconds: float) -> ScenarioSpec:
    offline = max(1, devices // 5)
    soak = 0.15 * seconds
    return ScenarioSpec(
        name="soak",
        source="bench/soak.py",
        groups=(Group("plant", profiles=(("x86_64-gateway", 1.0), ("rpi4-aarch64", 1.0))),),
        seed=5,
        devices=devices,
        processes=processes,
        timing=Timing(
            heartbeat_s=2.0,
            drift_window_s=4.0,
            drift_min_rows=20,
            predict_every_s=0.5,
            batch_rows=4,
            time_scale=1.0,
            warmup_s=0.0,
        ),
        releases=(ReleaseSpec(2, "v2"),),
        rollouts=(
            RolloutSpec(
                version=2,
                stages=tuple(
                    Stage(p, soak_s=s, max_wait_s=seconds)
                    for p, s in ((10.0, soak), (50.0, 2 * soak), (100.0, 0.0))
                ),
                expect="completed",
                gates=(
                    ("latency_ratio", 50.0),
                    ("min_drift_n", 100),
                    ("min_latency_samples", 1),
                    ("stuck_timeout_s", seconds),
                ),
                timeout_s=2 * seconds,
            ),
        ),
        faults=(
            Fault("offline", count=offline, at_s=0.05 * seconds, for_s=0.25 * seconds),
            Fault("killed_mid_update", count=1, state="installing"),
        ),
    )


class Timeline:
    """Things done at offsets from the start, each line printed with its time."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.lock = threading.Lock()

    def say(self, line: str) -> None:
        with self.lock:
            print(f"[{time.monotonic() - self.t0:6.1f}s] {line}", flush=True)

    def until(self, offset: float) -> None:
        time.sleep(max(0.0, self.t0 + offset - time.monotonic()))


def follow_rollout(stack: Stack, spec: ScenarioSpec, say: Say, out: RolloutOutcome) -> None:
    """Start the scenario's rollout and poll it to its end, riding out the fleet's restart."""
    r = spec.rollouts[0]
    started = time.monotonic()
    out.rollout_id = stack.start_rollout(rollout_body(spec, 0))
    say(f"rollout v{r.version} started: {out.rollout_id}")
    seen = 0
    while True:
        try:
            doc = stack.rollout(out.rollout_id)
        except httpx.TransportError:  # the fleet is restarting
            time.sleep(1.0)
            continue
        for e in doc["events"][seen:]:
            say(f"rollout stage {e['stage']}: {e['from_state']} -> {e['to_state']} ({e['event']})")
        seen = len(doc["events"])
        state = doc["rollout"]["state"]
        if state in ("completed", "rolled_back") or time.monotonic() - started > r.timeout_s:
            out.state, out.reason, out.stages = state, doc["rollout"]["reason"], doc["stages"]
            break
        time.sleep(1.0)
    out.seconds = time.monotonic() - started


def soak(seconds: float, devices: int, processes: int, down_s: float) -> RunResult:
    spec = scenario(devices, processes, seconds)
    plan = plan_fleet(spec)
    result = RunResult(spec.name, len(plan.devices), faults=list(plan.faults))
    with (
        tempfile.TemporaryDirectory(prefix="edgefleet-soak-") as tmp,
        running_stack(Path(tmp) / "stack") as stack,
    ):
        work = Path(tmp)
        stack.upload(build_release("v1", 1, work / "releases" / "1"))
        stack.upload(build_release("v2", 2, work / "releases" / "2"))
        t = spec.timing
        telemetry = TelemetryConfig(
            heartbeat_seconds=t.heartbeat_s,
            drift_window_seconds=t.drift_window_s,
            drift_min_rows=t.drift_min_rows,
            shutdown_flush_seconds=5.0,
        )
        clock = Timeline()
        say = clock.say
        supervisor = Supervisor(
            work / "hosts",
            HostSettings(stack.url, telemetry, time.time(), t.time_scale, t.latency_budget_scale),
            stack.enrollment_token(uses=devices),
            list(plan.devices),
            processes,
            list(plan.kills),
            _on_host_event(result, say, clock.t0),
        )
        result.processes = len(supervisor.hosts)
        try:
            supervisor.start()
            result.enrolled = len(supervisor.device_ids)
            say(f"{result.enrolled} devices enrolled and running in {result.processes} processes")
            for line in plan.faults:
                say(f"planned: {line}")
            base = time.monotonic() - clock.t0  # the run's offsets count from here
            for o in plan.offline:
                threading.Timer(o.at_s, supervisor.offline, (o.name, o.for_s)).start()
            outcome = RolloutOutcome(2, "completed")
            result.rollouts.append(outcome)
            clock.until(base + 0.15 * seconds)
            rollout = threading.Thread(target=follow_rollout, args=(stack, spec, say, outcome))
            rollout.start()
            clock.until(base + 0.35 * seconds)
            say(f"broker stops for {down_s:g} s")
            stack.broker.stop()
            time.sleep(down_s)
            stack.broker.start()
            say("broker back")
            clock.until(base + 0.60 * seconds)
            say(f"fleet manager stops for {down_s:g} s")
            stack.stop_fleet()
            time.sleep(down_s)
            stack.start_fleet()
            say("fleet manager back")
            clock.until(base + seconds)
            rollout.join(spec.rollouts[0].timeout_s)
            say(f"rollout v2 {outcome.state} after {outcome.seconds:.0f} s ({outcome.reason})")
            _settle(supervisor, say, timeout=120)
            result.snapshots = supervisor.stop()
        except BaseException:
            supervisor.terminate()
            raise
        _account(stack, result, spec, say)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=6.0, help="length of the run")
    parser.add_argument("--quick", action="store_true", help="a 1.5-minute run")
    parser.add_argument("--devices", type=int, default=40)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--down", type=float, default=10.0, help="broker/fleet downtime, s")
    args = parser.parse_args()
    seconds = 90.0 if args.quick else args.minutes * 60
    started = time.monotonic()
    result = soak(seconds, args.devices, args.processes, args.down)
    print(result.summary())
    working = sum(
        1 for d in result.snapshots if d["version"] is not None and d["version"] in (1, 2)
    )
    print(f"\nsoak of {(time.monotonic() - started) / 60:.1f} min, {result.devices} devices:")
    print(
        f"  reports sent {result.sent:,}, stored {result.stored:,} "
        f"({'equal' if result.sent == result.stored else f'{result.lost} LOST'})"
    )
    print(
        f"  devices on a working model: {working}/{result.devices} "
        f"({'all' if working == result.devices else 'NOT ALL'})"
    )
    return 0 if result.ok and working == result.devices else 1


if __name__ == "__main__":
    raise SystemExit(main())
