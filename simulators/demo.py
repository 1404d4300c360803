"""The fleet demo behind ``./scripts/demo``: a whole fleet on one machine, narrated.

It runs the ``demo`` scenario (``simulators/scenarios/demo.toml``) with
:func:`simulators.run.run_scenario`: a broker (:func:`simulators.local_broker.start_broker`:
Mosquitto when installed, else the embedded one), the real fleet manager and its dashboard on
loopback, ~50 simulated devices over the four firmware profiles, a staged rollout of v2 that
passes, then a bad v3 that the gates stop and roll back. As it goes it prints a short story
(:class:`Narrator`, the run's :class:`~simulators.run.Observer`): the dashboard's URL and a token
to sign in with, enrollment, each stage with its device counts, the gates' decisions and why,
the rollback. Then it keeps the fleet, the devices and the dashboard up until Ctrl-C (or stops
at once with ``--no-wait``).

Ctrl-C is clean at any point. The command's process only supervises: the run itself is a worker
process in a session of its own (so the terminal's Ctrl-C reaches the supervisor alone, not the
broker or the device hosts in the middle of their work). On Ctrl-C the supervisor sends the
worker one SIGINT, and the worker stops the devices, the fleet and the broker in order; a second
Ctrl-C, or a worker that takes longer than :data:`STOP_TIMEOUT_S`, kills the worker's whole
process group. The supervisor owns the run's temp directory and removes it. The worker also
stops (and removes the directory) when the supervisor goes away (its stdin closes). Nothing is
left running either way.

It does not define what the fleet does (the scenario file does) or check outcomes beyond the
run's own (:class:`simulators.run.RunResult`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simulators.__main__ import find_scenario
from simulators.scenario import ScenarioError, ScenarioSpec, load_scenario

if TYPE_CHECKING:
    from simulators.local_broker import Broker
    from simulators.run import RunResult
    from simulators.stack import Stack

REPO = Path(__file__).resolve().parents[1]

STOP_TIMEOUT_S = 90.0
PROGRESS_EVERY_S = 4.0
WORKER = "--worker"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="./scripts/demo",
        description="Run a simulated fleet on this machine: the fleet manager and its dashboard, "
        "an MQTT broker and ~50 devices; roll out a good v2, then a bad v3 that the gates stop "
        "and roll back. Ctrl-C stops everything.",
    )
    parser.add_argument("--devices", type=int, help="fleet size (default: the scenario's, 50)")
    parser.add_argument(
        "--no-wait", action="store_true", help="stop at the end instead of waiting for Ctrl-C"
    )
    parser.add_argument(
        "--port", type=int, default=0, help="the fleet manager's port (default: a free one)"
    )
    parser.add_argument(
        "--broker",
        choices=("auto", "mosquitto", "embedded"),
        default="auto",
        help="the MQTT broker: Mosquitto when installed, else the embedded pure-Python one "
        "(auto, the default), or either one",
    )
    parser.add_argument(
        "--scenario",
        default="demo",
        help="a scenario file, or a name in simulators/scenarios/ (default: demo)",
    )
    parser.add_argument(WORKER, type=Path, help=argparse.SUPPRESS)  # the worker's directory
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        spec = load_scenario(find_scenario(args.scenario))
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.devices is not None and args.devices < 1:
        print("error: --devices must be at least 1", file=sys.stderr)
        return 2
    if not 0 <= args.port <= 65535:
        print("error: --port must be within 1..65535 (or 0 for a free one)", file=sys.stderr)
        return 2
    if args.port and args.worker is None and not _port_free(args.port):
        print(
            f"error: port {args.port} is in use on 127.0.0.1; pick another with --port "
            "(or leave it out for a free one)",
            file=sys.stderr,
        )
        return 2
    if args.worker is not None:
        return _work(args, spec, args.worker)
    return _supervise(argv if argv is not None else sys.argv[1:])


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# --- the supervisor: the command's own process -----------------------------------------------


def _supervise(argv: list[str]) -> int:
    """Run the worker in a session of its own, in a temp directory the supervisor removes
    (whatever way the worker ends); turn Ctrl-C into the worker's clean stop."""
    with tempfile.TemporaryDirectory(prefix="edgefleet-demo-", ignore_cleanup_errors=True) as tmp:
        worker = subprocess.Popen(
            [sys.executable, "-m", "simulators.demo", WORKER, tmp, *argv],
            cwd=REPO,
            stdin=subprocess.PIPE,
            start_new_session=True,
        )
        return _wait(worker)


def _wait(worker: subprocess.Popen[bytes]) -> int:
    try:
        return worker.wait()
    except KeyboardInterrupt:
        print("\nCtrl-C: stopping the devices, the fleet and the broker...", flush=True)
        with contextlib.suppress(ProcessLookupError):
            worker.send_signal(signal.SIGINT)
        try:
            return worker.wait(STOP_TIMEOUT_S)
        except KeyboardInterrupt:
            print("\nCtrl-C again: killing the demo's processes.", flush=True)
        except subprocess.TimeoutExpired:
            print(f"the demo did not stop in {STOP_TIMEOUT_S:g} s: killing it.", flush=True)
        return 130
    finally:
        # whatever the worker started is in its process group: leave nothing behind
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


# --- the worker: the run --------------------------------------------------------------------


def _start_broker(choice: str, data_dir: Path) -> Broker:
    """The broker ``--broker`` names, started."""
    from simulators.broker import MosquittoBroker
    from simulators.embedded_broker import EmbeddedBroker
    from simulators.local_broker import start_broker

    if choice == "auto":
        return start_broker(data_dir)
    broker = EmbeddedBroker() if choice == "embedded" else MosquittoBroker(data_dir)
    broker.start()
    return broker


def _work(args: argparse.Namespace, spec: ScenarioSpec, workdir: Path) -> int:
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    # SIGINT is how the supervisor stops the run: not ignored, whatever the worker inherited
    # (a shell's background job starts with SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    orphaned = _stop_with_supervisor()
    try:
        return _run(args, spec, workdir)
    finally:
        if orphaned.is_set():  # nobody else is left to remove it
            shutil.rmtree(workdir, ignore_errors=True)


def _run(args: argparse.Namespace, spec: ScenarioSpec, workdir: Path) -> int:
    from simulators.broker import BrokerError
    from simulators.embedded_broker import EmbeddedBroker
    from simulators.run import run_scenario

    narrator = Narrator(spec, args.devices, wait=not args.no_wait)
    try:
        narrator.intro()
        try:
            broker = _start_broker(args.broker, workdir / "broker")
        except BrokerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        try:
            kind = "embedded" if isinstance(broker, EmbeddedBroker) else "Mosquitto"
            narrator.say(f"MQTT broker ({kind}) on {broker.host}:{broker.port}")
            result = run_scenario(
                spec,
                workdir,
                devices=args.devices,
                say=narrator.say_run,
                broker=broker,
                port=args.port,
                observer=narrator,
            )
        finally:
            broker.stop()
    except KeyboardInterrupt:
        print("demo interrupted: everything it started is stopped.", flush=True)
        return 130
    print(_ending(result), flush=True)
    if narrator.stopped_by_user:
        print("demo stopped: everything it started is stopped.", flush=True)
    return 0 if result.ok else 1


def _ending(result: RunResult) -> str:
    """The run's outcome in a few lines (the narration told the rollouts)."""
    versions = ", ".join(f"{n} on v{v}" for v, n in sorted(result.versions.items()))
    lines = [
        f"the end: {result.enrolled} devices, {versions}; {result.predictions} predictions "
        f"served ({result.prediction_errors} failed); {result.sent} reports sent by the agents, "
        f"{result.stored} stored by the fleet ({result.lost} lost)",
    ]
    if result.failures:
        lines += ["NOT AS EXPECTED:", *(f"  - {f}" for f in result.failures)]
    else:
        lines.append("every expected outcome met")
    return "\n".join(lines)


def _stop_with_supervisor() -> threading.Event:
    """SIGINT this worker when its supervisor goes away (stdin closes), so the run stops cleanly
    even if the supervisor was killed; the event is set when that happened."""
    gone = threading.Event()

    def watch() -> None:
        # the raw descriptor: a buffered stdin's lock would stall the interpreter's exit
        with contextlib.suppress(OSError):
            while os.read(0, 1024):
                pass
        gone.set()
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, name="demo-supervisor-watch", daemon=True).start()
    return gone


class Narrator:
    """The story of the run, printed as it happens, and the hold at the end
    (a :class:`simulators.run.Observer`)."""

    def __init__(self, spec: ScenarioSpec, devices: int | None, *, wait: bool) -> None:
        self.spec = spec
        self.devices = devices or spec.devices
        self.wait = wait
        self.started = time.monotonic()
        self.stopped_by_user = False
        self.stack: Stack | None = None
        self.dashboard = ""
        self.token = ""
        self._events: dict[str, int] = {}  # rollout id -> events told
        self._stage: dict[str, int] = {}  # rollout id -> the stage told
        self._counts: dict[tuple[str, int], tuple[int, ...]] = {}
        self._explained: set[str] = set()  # rollouts whose first failing device was explained
        self._last_progress = 0.0
        self._last: dict[int, dict[str, Any]] = {}  # version -> its rollout's last status

    def say(self, line: str) -> None:
        print(f"[{time.monotonic() - self.started:5.0f}s] {line}", flush=True)

    def say_run(self, line: str) -> None:
        """A line of :func:`~simulators.run.run_scenario`'s, unless the narration tells it
        better (rollout events and devices' outcomes: :meth:`rollout_status`)."""
        if not _TOLD.match(line):
            self.say(line)

    def intro(self) -> None:
        from simulators.run import plan_fleet

        plan = plan_fleet(self.spec, self.devices)
        profiles = Counter(d.profile for d in plan.devices)
        mix = ", ".join(f"{n} {p}" for p, n in sorted(profiles.items()))
        resized = f" (run here with {self.devices})" if self.devices != self.spec.devices else ""
        print(f"edgefleet demo: {self.spec.description}{resized}", flush=True)
        self.say(f"the fleet: {len(plan.devices)} simulated devices ({mix})")
        for r in self.spec.rollouts:
            stages = " -> ".join(f"{s.percent:g}%" for s in r.stages)
            self.say(f"the plan: roll out v{r.version} in stages {stages}; expected: {r.expect}")

    # --- Observer -------------------------------------------------------------------------------

    def fleet_ready(self, stack: Stack) -> None:
        self.stack = stack
        self.dashboard = f"{stack.url}/dashboard"
        self.token = stack.operator["Authorization"].removeprefix("Bearer ")
        self.say(f"fleet manager up: dashboard at {self.dashboard}")
        self.say(f"  sign in to the dashboard with this operator token: {self.token}")
        kinds = ", ".join(f"v{r.version} ({r.kind})" for r in self.spec.releases)
        self.say(f"releases signed and uploaded: v1 (the factory model), {kinds}")

    def rollout_status(self, version: int, doc: dict[str, Any]) -> None:
        rollout, stages, events = doc["rollout"], doc["stages"], doc["events"]
        rid, current, state = rollout["id"], int(rollout["stage"]), rollout["state"]
        self._last[version] = doc
        for e in events[self._events.get(rid, 0) :]:
            self._event(version, e)
        self._events[rid] = len(events)
        if state == "running" and self._stage.get(rid) != current and current < len(stages):
            self._stage[rid] = current
            s = stages[current]
            self.say(
                f"v{version} stage {current + 1}/{len(stages)} ({s['percent']:g}% of the target): "
                f"{s['devices']} more device(s) told to install v{version}"
            )
        if state == "running":
            self._progress(version, rid, stages[: current + 1])
        elif state == "rolling_back":
            self._rolling_back(version, rid, doc["devices"])
        if rid not in self._explained:
            bad = [d for d in doc["devices"] if d["outcome"] in ("failed", "rolled_back")]
            if bad:
                self._explained.add(rid)
                self._explain(version, bad[0]["device_id"], len(bad))

    def _event(self, version: int, e: dict[str, Any]) -> None:
        kind, reason = e["event"], e["reason"]  # the fleet's reasons name the stage
        if kind == "create":
            return
        if kind == "promote":
            self.say(f"v{version} {reason}: on to the next stage")
        elif kind == "complete":
            self.say(f"v{version} COMPLETED: {reason}")
        elif kind.startswith("gate_failed"):
            then = "rolling it back" if kind.endswith("rollback") else "pausing it"
            self.say(f"v{version} STOPPED by its gates, {then}: {reason}")
        elif kind == "rollback_done":
            self.say(f"v{version} ROLLED BACK: {reason}")
        else:
            self.say(f"v{version}: {e['from_state']} -> {e['to_state']} ({kind}: {reason})")

    def _progress(self, version: int, rid: str, stages: list[dict[str, Any]]) -> None:
        now = time.monotonic()
        for s in stages:
            key = (rid, int(s["index"]))
            names = ("committed", "updating", "pending", "failed", "rolled_back")
            counts = tuple(int(s[k]) for k in names)
            if not s["devices"] or counts == self._counts.get(key):
                continue
            committed, updating, pending, failed, reverted = counts
            settled = updating == 0 and pending == 0
            if not settled and now - self._last_progress < PROGRESS_EVERY_S:
                continue
            self._counts[key] = counts
            self._last_progress = now
            self.say(
                f"  v{version} stage {s['index'] + 1}: {committed}/{s['devices']} on v{version}"
                + (f", {updating} updating" if updating else "")
                + (f", {pending} waiting" if pending else "")
                + (f", {failed} failed" if failed else "")
                + (f", {reverted} rolled back" if reverted else "")
            )

    def _rolling_back(self, version: int, rid: str, devices: list[dict[str, Any]]) -> None:
        assigned = [d for d in devices if d.get("assigned_at") is not None] or devices
        back = sum(1 for d in assigned if d["outcome"] in ("rolled_back", "failed"))
        key = (rid, -1)
        if (back,) == self._counts.get(key):
            return
        if back < len(assigned) and time.monotonic() - self._last_progress < PROGRESS_EVERY_S:
            return
        self._counts[key] = (back,)
        self._last_progress = time.monotonic()
        self.say(f"  v{version} rolling back: {back}/{len(assigned)} device(s) off v{version}")

    def _explain(self, version: int, device: str, count: int) -> None:
        """Why the first device that did not take ``version`` gave it up, from its own
        update reports."""
        if self.stack is None:
            return
        history = self.stack.updates(device)["history"]
        why = next((t["reason"] for t in history if t["version"] == version and t["reason"]), "")
        self.say(f"  {count} device(s) gave v{version} up; {device} reported: {why or 'no reason'}")

    def rollouts_done(self, stack: Stack) -> None:
        for version, doc in self._last.items():
            r, stages = doc["rollout"], doc["stages"]
            total = Counter[str]()
            for s in stages:
                total.update({k: int(s[k]) for k in ("committed", "rolled_back")})
            self.say(
                f"rollout v{version}: {r['state']} at stage {int(r['stage']) + 1}/{len(stages)}; "
                f"{total['committed']} device(s) committed it, {total['rolled_back']} rolled back"
            )
        online = sum(1 for d in stack.devices() if d.get("online"))
        self.say(f"{online} devices online and reporting")
        if not self.wait:
            return
        print(
            f"\nThe fleet is up. Dashboard: {self.dashboard}\n"
            f"  sign in with the operator token {self.token}\n"
            "  (Rollouts shows both rollouts, their stages and the gates' reasons; Devices and\n"
            "  Drift show the fleet's live reports)\n"
            "Press Ctrl-C to stop the devices, the fleet manager and the broker.",
            flush=True,
        )
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:  # the supervisor has said what happens now
            self.stopped_by_user = True


# run_scenario's lines that the narration tells in its own words
_TOLD = re.compile(r"^(rollout v\d+ stage \d+: |rollout v\d+: dev-|fleet at )")


if __name__ == "__main__":
    raise SystemExit(main())
