"""Run a scenario: a fleet of virtual devices against a real broker and fleet manager.

:func:`plan_fleet` turns a :class:`~simulators.scenario.ScenarioSpec` into device specs (names,
profiles by the group's mix, streams, faults picked by the seed) and the timed faults;
:func:`run_scenario` starts the broker and fleet app (:mod:`simulators.stack`), uploads the
releases, starts the host processes (:mod:`simulators.supervisor`), which enroll and start the
agents, puts each device in its fleet group, lets them report for the warmup, runs the rollouts
one after the other through the fleet's HTTP API while the faults happen, waits for the fleet to
settle, stops every agent cleanly and checks the outcomes:

* every rollout ended in its expected state;
* every device serves a model, none of a bad release, and no prediction failed;
* the per-version device counts match ``[expect] versions`` when the scenario gives them;
* no report lost: every sequence number an agent wrote to its outbox is stored by the fleet or
  still in that outbox (:func:`count_reports`: a report the broker had not acknowledged when
  its agent stopped stays on the device's disk and goes out at the next start; it is counted
  as pending, apart from the lost ones).

:class:`RunResult` holds what happened and prints it; its ``failures`` say which outcome was
not met. It does not parse files (:mod:`simulators.scenario`) or parse arguments (the CLI in
:mod:`simulators.__main__`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import httpx

from agent.config import TelemetryConfig
from simulators.host import DeviceSpec, HostSettings
from simulators.local_broker import Broker
from simulators.netfaults import LinkFault
from simulators.releases import MODEL, build_release
from simulators.scenario import ScenarioError, ScenarioSpec
from simulators.stack import FleetClient, FleetRequestError, Stack, running_stack, wait_for
from simulators.streams import StreamSpec
from simulators.supervisor import KillPlan, Supervisor

UPDATING = frozenset(
    {
        "downloading",
        "verifying",
        "installing",
        "health_check",
        "shadow",
        "activating",
        "trial",
        "rolling_back",
    }
)

Say = Callable[[str], None]
WINDOW_HEADROOM = 1.5  # a device's sensor windows a second over the rows it sends a second
# a rollout's status (every device's row) is polled this often; a large fleet's is polled less:
# the fleet builds the whole document under the same GIL as its ingestion and controller
POLL_S = 0.5
POLL_S_LARGE = 2.0
LARGE_FLEET = 200


class Observer(Protocol):
    """What a caller sees of a run as it goes (the demo narrates it and holds at the end)."""

    def fleet_ready(self, stack: Stack) -> None:
        """The broker and fleet app are up and the releases uploaded."""

    def rollout_status(self, version: int, doc: dict[str, Any]) -> None:
        """Each poll of a running rollout's status (``GET /v1/rollouts/{id}``)."""

    def rollouts_done(self, stack: Stack) -> None:
        """Every rollout ended and the fleet settled; the devices still run until this returns."""


@dataclass(frozen=True)
class OfflinePlan:
    name: str
    at_s: float
    for_s: float


@dataclass(frozen=True)
class FleetPlan:
    devices: tuple[DeviceSpec, ...]
    kills: tuple[KillPlan, ...]
    offline: tuple[OfflinePlan, ...]
    faults: tuple[str, ...]  # one line per fault, for the report


@dataclass
class RolloutOutcome:
    version: int
    expected: str
    rollout_id: str = ""
    state: str = "not started"
    reason: str = ""
    stages: list[dict[str, Any]] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # device id -> why it did not commit
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.state == self.expected


@dataclass
class RunResult:
    scenario: str
    devices: int
    enrolled: int = 0
    processes: int = 0
    rollouts: list[RolloutOutcome] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    fault_events: list[str] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)
    sent: int = 0
    stored: int = 0
    pending: int = 0  # not stored, still in the device's outbox when its agent stopped
    lost: int = 0  # neither stored nor in the outbox
    predictions: int = 0
    prediction_errors: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    snapshots: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        lines = [
            f"scenario {self.scenario}: {self.enrolled}/{self.devices} devices enrolled over "
            f"{self.processes} host process(es)",
        ]
        for name, seconds in self.timings.items():
            lines.append(f"  {name}: {seconds:.1f} s")
        for f in self.faults:
            lines.append(f"  fault: {f}")
        for r in self.rollouts:
            mark = "ok" if r.ok else f"EXPECTED {r.expected}"
            lines.append(
                f"  rollout v{r.version} {r.rollout_id}: {r.state} in {r.seconds:.0f} s "
                f"({r.reason}) [{mark}]"
            )
            for s in r.stages:
                lines.append(
                    f"    stage {s['index']} {s['percent']:g}%: {s['devices']} devices, "
                    f"{s['committed']} committed, {s['failed']} failed, "
                    f"{s['rolled_back']} rolled back, {s['pending'] + s['updating']} not done"
                )
            for device, why in r.failed.items():
                lines.append(f"    {device} {why}")
        counts = ", ".join(f"v{v}: {n}" for v, n in sorted(self.versions.items()))
        lines.append(f"  devices per served version: {counts}")
        lines.append(f"  predictions: {self.predictions} served, {self.prediction_errors} failed")
        lines.append(
            f"  reports: {self.sent} sent by agents, {self.stored} stored by the fleet, "
            f"{self.pending} still in device outboxes (sent at the next start), {self.lost} lost"
        )
        if self.failures:
            lines.append("FAILED:")
            lines.extend(f"  - {f}" for f in self.failures)
        else:
            lines.append("every expected outcome met")
        return "\n".join(lines)


# --- planning -------------------------------------------------------------------------------------


def _apportion(total: int, weights: list[float]) -> list[int]:
    """Whole counts summing to ``total`` in proportion to ``weights`` (largest remainder)."""
    whole = sum(weights)
    exact = [total * w / whole for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def plan_fleet(spec: ScenarioSpec, devices: int | None = None) -> FleetPlan:
    """The devices of a run and their faults, deterministic from the scenario and its seed."""
    n = devices or spec.devices
    rng = random.Random(spec.seed)
    t = spec.timing
    members: dict[str, list[int]] = {}
    profile_of: dict[int, str] = {}
    i = 0
    for group, size in zip(spec.groups, _apportion(n, [g.share for g in spec.groups]), strict=True):
        ids = list(range(i, i + size))
        i += size
        members[group.name] = ids
        names = [p for p, _ in group.profiles]
        mix = [
            p
            for p, k in zip(names, _apportion(size, [w for _, w in group.profiles]), strict=True)
            for _ in range(k)
        ]
        rng.shuffle(mix)
        profile_of.update(zip(ids, mix, strict=True))
    faulty: dict[int, str] = {}
    kills: list[KillPlan] = []
    offline: list[OfflinePlan] = []
    lines: list[str] = []
    links: dict[int, LinkFault] = {}
    for fault in spec.faults:
        pool = [d for d in (members[fault.group] if fault.group else range(n)) if d not in faulty]
        if len(pool) < fault.count:
            raise ScenarioError(
                f"{spec.source}: fault {fault.kind} wants {fault.count} devices but only "
                f"{len(pool)} are left{' in ' + fault.group if fault.group else ''}; lower count"
            )
        picked = sorted(rng.sample(pool, fault.count))
        labels = ", ".join(_name(d) for d in picked)
        for d in picked:
            faulty[d] = fault.kind
            if fault.kind == "offline":
                offline.append(OfflinePlan(_name(d), fault.at_s, fault.for_s))
            elif fault.kind == "killed_mid_update":
                kills.append(KillPlan(_name(d), fault.state))
            elif fault.kind == "slow_download":
                links[d] = LinkFault(rate=fault.rate)
            elif fault.kind == "failing_download":
                links[d] = LinkFault(cut_after=fault.cut_after, cuts=fault.cuts)
        detail = {
            "offline": f"offline at +{fault.at_s:g} s for {fault.for_s:g} s",
            "killed_mid_update": f"power cut in {fault.state}, then restarted",
            "slow_download": f"downloads at {fault.rate:g} B/s",
            "failing_download": f"{fault.cuts} downloads dropped after {fault.cut_after} B",
            "health_check_fails": "broken accelerator: new models fail the health check",
        }[fault.kind]
        lines.append(f"{fault.kind} on {labels}: {detail}")
    # each device's sensors make a window a bit more often than it sends them, so batches at
    # its rate read fresh windows even when the feeder's ticks bring one a little early
    rate = WINDOW_HEADROOM * t.batch_rows / (t.predict_every_s * t.time_scale)
    specs = []
    for group in spec.groups:
        ids = members[group.name]
        for d in ids:
            specs.append(
                DeviceSpec(
                    name=_name(d),
                    profile=profile_of[d],
                    group=group.name,
                    stream=_stream(group, spec.seed, d, frozenset(ids), rate),
                    batch_rows=t.batch_rows,
                    every_s=t.predict_every_s,
                    broken_accelerator=faulty.get(d) == "health_check_fails",
                    link=links.get(d),
                )
            )
    return FleetPlan(tuple(specs), tuple(kills), tuple(offline), tuple(lines))


def _name(index: int) -> str:
    return f"edge-{index:04d}"


def _stream(
    group: Any, seed: int, device: int, members: frozenset[int], windows_per_s: float
) -> StreamSpec:
    if group.stream == "gradual":
        spec = StreamSpec.gradual(seed, device, group.features, group.sigma_per_hour, group.at_s)
    elif group.stream == "sudden":
        spec = StreamSpec.sudden(seed, device, group.features, group.shift_sigma, group.at_s)
    elif group.stream == "environment":
        spec = StreamSpec.environment(seed, device, members, group.shift_sigma, group.features)
    else:
        spec = StreamSpec.stable(seed, device)
    return dataclasses.replace(spec, windows_per_s=windows_per_s)


# --- running --------------------------------------------------------------------------------------


def rollout_body(spec: ScenarioSpec, index: int) -> dict[str, Any]:
    """The ``POST /v1/rollouts`` body of the scenario's rollout ``index``."""
    r = spec.rollouts[index]
    target: dict[str, Any] = {"kind": "all", "values": []}
    if r.group:
        target = {"kind": "group", "values": [r.group]}
    elif r.profiles:
        target = {"kind": "profiles", "values": list(r.profiles)}
    return {
        "model": MODEL,
        "version": r.version,
        "target": target,
        "stages": [dataclasses.asdict(s) for s in r.stages],
        "gates": dict(r.gates),
        "policy": r.policy,
    }


def _run_rollout(
    stack: FleetClient,
    spec: ScenarioSpec,
    index: int,
    say: Say,
    observer: Observer | None = None,
    poll_s: float = POLL_S,
) -> RolloutOutcome:
    r = spec.rollouts[index]
    outcome = RolloutOutcome(r.version, r.expect)
    started = time.monotonic()
    outcome.rollout_id = stack.start_rollout(rollout_body(spec, index))
    say(f"rollout v{r.version} started: {outcome.rollout_id}")
    seen = 0
    ends = ("completed", "rolled_back") + (("paused",) if r.expect == "paused" else ())
    late = 0
    while True:
        try:
            doc = stack.rollout(outcome.rollout_id)
        except httpx.TransportError as exc:  # a timeout included
            # a fleet manager serving hundreds of downloads on 2 shared cores answered a status
            # poll after its 30 s timeout at 1,000 devices: the rollout goes on, so does the run
            late += 1
            say(f"rollout v{r.version}: status poll {late} failed ({exc!r}); polling again")
            if time.monotonic() - started > r.timeout_s:
                outcome.state = "unknown"
                outcome.reason = f"the fleet did not answer status polls within {r.timeout_s:g} s"
                break
            time.sleep(2.0)
            continue
        if observer is not None:
            observer.rollout_status(r.version, doc)
        for e in doc["events"][seen:]:
            say(
                f"rollout v{r.version} stage {e['stage']}: {e['from_state']} -> {e['to_state']} "
                f"({e['event']}{': ' + e['reason'] if e['reason'] else ''})"
            )
        seen = len(doc["events"])
        for d in doc["devices"]:
            if d["outcome"] in ("failed", "rolled_back") and d["device_id"] not in outcome.failed:
                outcome.failed[d["device_id"]] = f"{d['outcome']}: {d.get('reason') or ''}"
                say(f"rollout v{r.version}: {d['device_id']} {outcome.failed[d['device_id']]}")
        state = doc["rollout"]["state"]
        if state in ends or time.monotonic() - started > r.timeout_s:
            outcome.state, outcome.reason = state, doc["rollout"]["reason"]
            outcome.stages = list(doc["stages"])
            if state not in ends:
                outcome.reason = f"still {state} after {r.timeout_s:g} s: {outcome.reason}"
            break
        time.sleep(poll_s)
    outcome.seconds = time.monotonic() - started
    return outcome


def run_scenario(
    spec: ScenarioSpec,
    workdir: Path | None = None,
    *,
    devices: int | None = None,
    say: Say = print,
    broker: Broker | None = None,
    port: int = 0,
    observer: Observer | None = None,
    fleet: FleetClient | None = None,
    release_health: dict[str, Any] | None = None,
) -> RunResult:
    """Run ``spec`` with its own broker and fleet app under ``workdir`` (a temp dir if None);
    ``broker`` (a running one, stopped by its owner) and the fleet's ``port`` go to
    :func:`~simulators.stack.start_stack`; ``observer`` sees the run as it goes. With ``fleet``
    (a fleet manager running elsewhere, :func:`~simulators.stack.connect_fleet`) it starts
    neither and runs against that one (no ``observer`` then). ``release_health`` overrides
    health thresholds of every release uploaded (e.g. a benchmark's ``max_latency_ratio``)."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="edgefleet-sim-") as tmp:
            return run_scenario(
                spec,
                Path(tmp),
                devices=devices,
                say=say,
                broker=broker,
                port=port,
                observer=observer,
                fleet=fleet,
                release_health=release_health,
            )
    plan = plan_fleet(spec, devices)
    result = RunResult(spec.name, len(plan.devices), faults=list(plan.faults))
    if fleet is not None:
        if observer is not None or broker is not None:
            raise ValueError("a run against a fleet manager elsewhere takes no observer or broker")
        say(f"fleet at {fleet.url}")
        _upload_releases(spec, fleet, workdir, result, say, release_health)
        _run_fleet(spec, plan, fleet, workdir, result, say)
        return result
    with running_stack(workdir / "stack", broker=broker, port=port) as stack:
        _upload_releases(spec, stack, workdir, result, say, release_health)
        say(f"fleet at {stack.url}, broker at {stack.broker.host}:{stack.broker.port}")
        done: Callable[[], None] | None = None
        if observer is not None:
            observer.fleet_ready(stack)
            done = partial(observer.rollouts_done, stack)
        _run_fleet(spec, plan, stack, workdir, result, say, observer, done)
    return result


def _upload_releases(
    spec: ScenarioSpec,
    fleet: FleetClient,
    workdir: Path,
    result: RunResult,
    say: Say,
    health: dict[str, Any] | None = None,
) -> None:
    clock = time.monotonic()
    for kind, version in [("v1", 1), *((r.kind, r.version) for r in spec.releases)]:
        try:
            fleet.upload(build_release(kind, version, workdir / "releases" / str(version), health))
        except FleetRequestError as exc:
            if " 409" not in str(exc):  # 409: uploaded before (a fleet manager elsewhere)
                raise
            say(f"release v{version} was uploaded before: {exc}")
    result.timings["fleet and releases ready"] = time.monotonic() - clock


def _on_host_event(
    result: RunResult, say: Say, started: float
) -> Callable[[str, dict[str, Any]], None]:
    lock = threading.Lock()

    def on_event(host: str, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind in ("offline", "online", "killed", "error"):
            detail = {k: v for k, v in event.items() if k not in ("event", "name")}
            line = f"+{time.monotonic() - started:5.1f} s {event.get('name')} {kind} {detail or ''}"
            with lock:
                result.fault_events.append(line.strip())
            say(line.strip())

    return on_event


def _run_fleet(
    spec: ScenarioSpec,
    plan: FleetPlan,
    stack: FleetClient,
    workdir: Path,
    result: RunResult,
    say: Say,
    observer: Observer | None = None,
    rollouts_done: Callable[[], None] | None = None,
) -> None:
    t = spec.timing
    telemetry = TelemetryConfig(
        heartbeat_seconds=t.heartbeat_s,
        drift_window_seconds=t.drift_window_s,
        drift_min_rows=t.drift_min_rows,
        # a host stopping its hundred agents at once on a loaded machine: 5 s left 16 of 1,000
        # agents' last reports unacknowledged in their outboxes (pending, not lost)
        shutdown_flush_seconds=15.0,
    )
    settings = HostSettings(stack.url, telemetry, time.time(), t.time_scale, t.latency_budget_scale)
    started = time.monotonic()
    supervisor = Supervisor(
        workdir / "hosts",
        settings,
        stack.enrollment_token(uses=len(plan.devices)),
        list(plan.devices),
        spec.processes,
        list(plan.kills),
        _on_host_event(result, say, started),
    )
    result.processes = len(supervisor.hosts)
    try:
        supervisor.start()
        result.enrolled = len(supervisor.device_ids)
        result.timings["devices enrolled and started"] = time.monotonic() - started
        say(f"{result.enrolled} devices enrolled and running in {len(supervisor.hosts)} processes")
        for d in plan.devices:
            stack.set_group(supervisor.device_ids[d.name], d.group)
        time.sleep(t.warmup_s)
        t0 = time.monotonic()
        timers = [
            threading.Timer(o.at_s, supervisor.offline, (o.name, o.for_s)) for o in plan.offline
        ]
        for timer in timers:
            timer.start()
        for i, r in enumerate(spec.rollouts):
            time.sleep(r.after_s)
            poll_s = POLL_S if len(plan.devices) <= LARGE_FLEET else POLL_S_LARGE
            result.rollouts.append(_run_rollout(stack, spec, i, say, observer, poll_s))
        back = max((o.at_s + o.for_s for o in plan.offline), default=0.0)
        time.sleep(max(0.0, t0 + back + 1.0 - time.monotonic()))
        for timer in timers:
            timer.join()
        _settle(supervisor, say)
        result.timings["rollouts and faults"] = time.monotonic() - t0
        if rollouts_done is not None:
            rollouts_done()
        stopping = time.monotonic()
        result.snapshots = supervisor.stop()
        result.timings["agents stopped"] = time.monotonic() - stopping
    except BaseException:
        supervisor.terminate()
        raise
    _account(stack, result, spec, say)


def _settle(supervisor: Supervisor, say: Say, timeout: float = 60.0) -> None:
    """Wait until every device runs and no update is under way (or ``timeout``)."""

    def settled() -> bool:
        busy = [
            d["name"]
            for d in supervisor.snapshots()
            if not d["running"] or d["update_state"] in UPDATING
        ]
        return not busy

    try:
        wait_for("every device to run with no update under way", settled, timeout, 1.0)
    except AssertionError as exc:
        say(str(exc))


@dataclass(frozen=True)
class ReportCount:
    """Every report the agents wrote, split by where it is: stored by the fleet, still in the
    device's outbox (``pending``, per device), or neither (``lost``, per device)."""

    sent: int
    stored: int
    pending: dict[str, set[int]]
    lost: dict[str, set[int]]


def count_reports(snapshots: list[dict[str, Any]], stored: dict[str, set[int]]) -> ReportCount:
    """Compare the seqs each device logged (``sent``) with the fleet's ``stored`` seqs per
    device id. A seq the fleet lacks that is still in the device's outbox (``pending`` in its
    snapshot taken after the agent stopped) is not lost: the broker had not acknowledged it yet,
    and the agent sends it at its next start."""
    sent = kept = 0
    pending: dict[str, set[int]] = {}
    lost: dict[str, set[int]] = {}
    for d in snapshots:
        device = d["device_id"]
        mine = set(d["sent"])
        have = mine & stored.get(device, set())
        waiting = (mine - have) & set(d["pending"])
        gone = mine - have - waiting
        sent += len(mine)
        kept += len(have)
        if waiting:
            pending[device] = waiting
        if gone:
            lost[device] = gone
    return ReportCount(sent, kept, pending, lost)


def _account(stack: FleetClient, result: RunResult, spec: ScenarioSpec, say: Say) -> None:
    snaps = result.snapshots

    def count() -> ReportCount:
        return count_reports(snaps, stack.stored_seqs([d["device_id"] for d in snaps]))

    with contextlib.suppress(AssertionError):
        wait_for("the fleet to store every report", lambda: not count().lost, 30, 0.5)
    reports = count()
    lost = reports.lost
    result.sent, result.stored = reports.sent, reports.stored
    result.pending = sum(len(v) for v in reports.pending.values())
    result.lost = sum(len(v) for v in lost.values())
    if result.pending:
        say(
            f"{result.pending} report(s) of {len(reports.pending)} device(s) were still in their "
            "outboxes when the agents stopped (not acknowledged by the broker in the agents' "
            "shutdown flush): kept on the devices, sent at their next start"
        )
    result.predictions = sum(d["predictions"] for d in snaps)
    result.prediction_errors = sum(d["errors"] for d in snaps)
    result.versions = dict(Counter(str(d["version"]) for d in snaps))
    for r in result.rollouts:
        if not r.ok:
            result.failures.append(
                f"rollout v{r.version} ended {r.state} ({r.reason}), expected {r.expected}"
            )
    bad = spec.bad_versions()
    for d in snaps:
        if d["version"] is None or d["version"] in bad:
            result.failures.append(
                f"{d['name']} ({d['device_id']}) serves {d['version']}, not a working model "
                f"(update: {d['update_state']} {d['update_reason']})"
            )
        if d["errors"]:
            result.failures.append(
                f"{d['name']} failed {d['errors']} predictions: {d['first_errors']}"
            )
    if spec.expect.versions and result.devices != spec.devices:
        say(f"devices per version not checked: the scenario's counts are for {spec.devices}")
    elif spec.expect.versions:
        want = {str(v): n for v, n in spec.expect.versions}
        got = {v: result.versions.get(v, 0) for v in want}
        if got != want:
            result.failures.append(f"devices per version {result.versions}, expected {want}")
    if result.lost:
        worst = ", ".join(
            f"{device} seq {', '.join(map(str, sorted(seqs)[:5]))}"
            for device, seqs in sorted(lost.items(), key=lambda kv: -len(kv[1]))[:3]
        )
        result.failures.append(
            f"{result.lost} report(s) of {len(lost)} device(s) sent but neither stored by the "
            f"fleet nor still in their outbox (e.g. {worst})"
        )
    if result.enrolled != result.devices:
        result.failures.append(f"only {result.enrolled} of {result.devices} devices enrolled")
