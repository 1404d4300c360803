"""Simulator benchmark: what each hosted agent costs, and how a fleet spreads over processes.

For each fleet size N, starts a broker and the fleet app (:mod:`simulators.stack`) and host
processes (``python -m simulators.host`` through :class:`simulators.supervisor.Supervisor`, at
most :data:`simulators.host.MAX_AGENTS` agents each), then prints: enrollment and start time
per agent, the hosts' resident memory and threads once every agent has reported (per agent,
against a host of one agent measured in the same run), their CPU while the agents serve their
streams and report, and whether every report of the run was stored by the fleet.

Run: ``.venv/bin/python -m bench.simulator [--devices 100 500 1000] [--seconds 20]``.
Figures depend on the machine and its load (the fleet app and broker share it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as a file: bench/ is on sys.path first
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import psutil

from agent.config import TelemetryConfig
from simulators.host import DeviceSpec, HostSettings
from simulators.releases import build_release
from simulators.stack import running_stack, wait_for
from simulators.streams import StreamSpec
from simulators.supervisor import Supervisor

PROFILES = ("x86_64-gateway", "rpi4-aarch64", "rpi3-armv7l")


def _specs(n: int, every_s: float) -> list[DeviceSpec]:
    return [
        DeviceSpec(f"edge-{i:05d}", PROFILES[i % 3], "bench", StreamSpec.stable(1, i), 4, every_s)
        for i in range(n)
    ]


def measure(n: int, seconds: float, every_s: float) -> dict[str, float]:
    telemetry = TelemetryConfig(
        heartbeat_seconds=10.0, drift_window_seconds=30.0, drift_min_rows=100
    )
    with (
        tempfile.TemporaryDirectory(prefix="bench-sim-") as tmp,
        running_stack(Path(tmp) / "stack") as stack,
    ):
        stack.upload(build_release("v1", 1, Path(tmp) / "b1"))
        settings = HostSettings(stack.url, telemetry, time.time(), 60.0)
        sup = Supervisor(
            Path(tmp) / "hosts", settings, stack.enrollment_token(uses=n), _specs(n, every_s), 1
        )
        started = time.monotonic()
        ready = sup.start(timeout=1800)
        total = time.monotonic() - started
        procs = [psutil.Process(h._proc.pid) for h in sup.hosts]  # type: ignore[union-attr]
        wait_for("every agent to report", lambda: len(stack.stored_seqs()) >= n, 30 + n * 0.5, 1.0)
        reported = time.monotonic() - started
        for proc in procs:
            proc.cpu_percent(None)
        time.sleep(seconds)
        cpu = sum(proc.cpu_percent(None) for proc in procs)
        rss = sum(proc.memory_info().rss for proc in procs)
        threads = sum(proc.num_threads() for proc in procs)
        snaps = sup.stop()
        stored = wait_for(
            "the fleet to store every report",
            lambda: (
                (s := stack.stored_seqs())
                and all(set(d["sent"]) <= s.get(d["device_id"], set()) for d in snaps)
                and s
            ),
            120,
            1.0,
        )
        sent = sum(len(d["sent"]) for d in snaps)
        kept = sum(len(set(d["sent"]) & stored.get(d["device_id"], set())) for d in snaps)
        return {
            "n": n,
            "processes": len(procs),
            "enroll_s": max(r["enroll_s"] for r in ready),
            "start_s": max(r["start_s"] for r in ready),
            "ready_s": total,
            "reported_s": reported,
            "rss_mb": rss / 2**20,
            "threads": threads,
            "cpu_pct": cpu,
            "predictions": sum(d["predictions"] for d in snaps),
            "sent": sent,
            "stored": kept,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--seconds", type=float, default=20.0, help="steady-state measurement")
    parser.add_argument("--every", type=float, default=1.0, help="seconds between batches")
    args = parser.parse_args()
    base = measure(1, min(args.seconds, 5.0), args.every)
    print(
        f"one agent: host RSS {base['rss_mb']:.0f} MiB, {base['threads']:.0f} threads, "
        f"ready in {base['ready_s']:.1f} s"
    )
    for n in args.devices:
        m = measure(n, args.seconds, args.every)
        k = m["processes"]
        per_agent_mb = (m["rss_mb"] - k * base["rss_mb"]) / (n - k)
        per_agent_threads = (m["threads"] - k * base["threads"]) / (n - k)
        print(
            f"{n} agents in {k:.0f} process(es): enroll {m['enroll_s'] * k / n * 1e3:.0f} "
            f"ms/agent, start {m['start_s'] * k / n * 1e3:.1f} ms/agent (in parallel: ready in "
            f"{m['ready_s']:.0f} s, every agent "
            f"reported after {m['reported_s']:.0f} s); RSS "
            f"{m['rss_mb']:.0f} MiB = {per_agent_mb:.2f} MiB/agent over {k:.0f} one-agent hosts; "
            f"{m['threads']:.0f} threads ({per_agent_threads:.1f}/agent); CPU {m['cpu_pct']:.0f}% "
            f"of one core at one 4-row batch per agent every {args.every:g} s "
            f"({n / args.every:.0f} predictions/s); reports {m['sent']:.0f} sent, "
            f"{m['stored']:.0f} stored"
        )


if __name__ == "__main__":
    main()
