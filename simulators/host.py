"""A device host: many real agents in one process, fed from their sensor streams.

Each hosted device is a real :class:`agent.main.Agent` with its own state directory, device key,
outbox, MQTT link and update engine, provisioned through the fleet's enrollment API with
:func:`agent.provision.provision` and given the factory model (bundle 1) with
:func:`agent.bundle_install.install_bundle`, as an installer would. What the host shares among
its agents is what a process can share without changing what an agent does:

* one runtime per artifact (:class:`simulators.shared_runtimes.SharedRuntimes`);
* one APScheduler for every agent's heartbeat and drift-window jobs;
* the firmware profile, with its latency budget widened (``latency_budget_scale``: the agents
  share the host's cores, a device has its own);
* no HTTP servers: one feeder thread calls each agent's real
  :meth:`agent.inference.InferenceService.predict` with its stream's rows at its rate (the local
  application's requests, minus the socket).

Faults a host injects into its own devices: ``offline`` (the agent stops cleanly and starts
again later on the same state), a broken accelerator (the real health check fails on new models)
and slow or dropping download links (:class:`simulators.netfaults.FaultyRelay` between the
device and the fleet's repository). A device killed mid-update is a host process killed with
SIGKILL (:mod:`simulators.supervisor`).

Every report an agent writes is counted where it is written: the host adds a trigger to the
agent's outbox table that logs each new row's sequence number (``sim_sent``), in the same
transaction as the row, so a kill cannot lose the count. :meth:`DeviceHost.snapshot` reports
those seqs; the fleet's ``telemetry_messages`` must hold every one of them.

``python -m simulators.host PLAN.json`` runs a host as a process: it enrolls and starts the
plan's devices, answers JSON-line commands on stdin (``offline``, ``snapshot``, ``stop``) and
writes JSON-line events on stdout, at a lower CPU priority (nice 10) than the fleet and broker it
is measured against. :class:`DeviceHost` is the in-process API.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle_install import install_bundle
from agent.config import AgentConfig, TelemetryConfig, load_config, save_config
from agent.errors import AgentError
from agent.inference import InputError, NoModelError
from agent.main import Agent
from agent.outbox import Outbox
from agent.provision import ProvisionError, device_facts, provision
from agent.runtimes import RuntimeLoader
from agent.slots import Slots
from agent.update_store import UpdateStore
from agent.version import agent_version
from firmware_profiles import load_profile
from protocol.profiles import MachineFacts
from simulators.netfaults import FaultyRelay, LinkFault
from simulators.releases import BUNDLES
from simulators.shared_runtimes import BrokenAccelerator, SharedRuntimes, file_sha256
from simulators.streams import Scenario, SensorStream, StreamSpec

log = logging.getLogger(__name__)

FEED_TICK_S = 0.02
# paho's network loop waits on its socket with select(), which cannot watch a descriptor past
# FD_SETSIZE (1024): a client whose socket lands there never connects, silently. Each hosted
# agent holds about 8 descriptors (two SQLite connections with their WAL and shm files, the MQTT
# socket, paho's wake-up socket pair), so a process holds ~120 agents at most; this leaves room.
MAX_AGENTS = 100
ENROLL_ATTEMPTS = 6
HOST_NICE = 10  # a host process's niceness (see main)
SENT_TABLE = """CREATE TABLE IF NOT EXISTS sim_sent (seq INTEGER PRIMARY KEY, topic TEXT)"""
SENT_TRIGGER = """CREATE TRIGGER IF NOT EXISTS sim_sent_log AFTER INSERT ON outbox
BEGIN INSERT OR IGNORE INTO sim_sent (seq, topic) VALUES (NEW.seq, NEW.topic); END"""


@dataclass(frozen=True)
class DeviceSpec:
    """One virtual device: its label, firmware profile, fleet group, stream and faults."""

    name: str  # the simulator's label (the fleet assigns the device id at enrollment)
    profile: str
    group: str
    stream: StreamSpec
    batch_rows: int = 4
    every_s: float = 0.5  # one batch every every_s seconds
    broken_accelerator: bool = False  # new models' outputs are off: the health check fails
    link: LinkFault | None = None  # downloads through a slow or dropping link

    def to_json(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["stream"]["devices"] = sorted(self.stream.devices)
        doc["stream"]["scenario"] = self.stream.scenario.value
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> DeviceSpec:
        stream = dict(doc["stream"])
        stream["features"] = tuple(stream["features"])
        stream["devices"] = frozenset(stream["devices"])
        stream["scenario"] = Scenario(stream["scenario"])
        link = doc.get("link")
        return cls(
            **{**doc, "stream": StreamSpec(**stream), "link": LinkFault(**link) if link else None}
        )


@dataclass(frozen=True)
class HostSettings:
    """What every device of a host shares: where the fleet is, telemetry timing, stream clock."""

    fleet_url: str
    telemetry: TelemetryConfig
    epoch: float = 0.0  # wall clock of stream time 0 (every host of a run uses the same)
    time_scale: float = 1.0  # stream seconds per real second (gradual drift in minutes)
    # a device has its cores to itself, a hosted agent shares them with every other one: the
    # health check's latency budget (the firmware profile's) is widened by this factor
    latency_budget_scale: float = 10.0


@dataclass
class HostedDevice:
    spec: DeviceSpec
    state_dir: Path
    device_id: str
    stream: SensorStream
    agent: Agent | None = None
    predictions: int = 0
    errors: int = 0
    errors_seen: list[str] = field(default_factory=list)
    next_at: float = 0.0
    back_at: float | None = None  # offline until then (monotonic)
    offline_total: int = 0


@dataclass(frozen=True)
class DeviceSnapshot:
    """One device as the host sees it now (JSON-able)."""

    name: str
    device_id: str
    profile: str
    group: str
    running: bool
    version: int | None  # the version the agent serves (or the active slot's, when stopped)
    update_state: str
    update_result: str
    update_reason: str
    predictions: int
    errors: int
    first_errors: list[str]
    sent: list[int]  # seqs of every report written to the outbox
    pending: list[int]  # seqs still in the outbox (not acknowledged by the broker)
    offline_total: int


def raise_open_files_limit() -> int:
    """Lift the soft limit on open files to the hard one (each agent holds a few SQLite files
    and a socket); returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _facts(profile: str) -> dict[str, Any]:
    p = load_profile(profile)
    return device_facts(
        MachineFacts(p.arch, p.cores, p.ram_mb, "edgefleet simulator"),
        agent_version(),
        list(p.runtimes),
    )


def _instrument(config: AgentConfig) -> None:
    """Make the outbox's tables and log every new row's seq in ``sim_sent`` (a trigger)."""
    Outbox(config.paths.db, config.device.id).close()
    with closing(sqlite3.connect(config.paths.db)) as db, db:
        db.execute(SENT_TABLE)
        db.execute(SENT_TRIGGER)


def _seqs(db_path: Path, sql: str) -> list[int]:
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)) as db:
        return [int(seq) for (seq,) in db.execute(sql)]


class HostFull(RuntimeError):
    """A host already holds :data:`MAX_AGENTS` agents; the message says what to do."""


class DeviceHost:
    """Many agents in this process (see the module docstring). Not thread-safe for its
    callers: one thread (a test, the host process's command loop) drives it."""

    def __init__(
        self,
        root: Path,
        settings: HostSettings,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        from apscheduler.executors.pool import ThreadPoolExecutor as JobPool
        from apscheduler.schedulers.background import BackgroundScheduler

        self.root = root
        self.settings = settings
        self.runtimes = SharedRuntimes()
        self.scheduler = BackgroundScheduler(
            timezone=UTC, executors={"default": JobPool(max_workers=8)}
        )
        self.scheduler.start()
        self.devices: dict[str, HostedDevice] = {}
        self._relays: dict[LinkFault, FaultyRelay] = {}
        self._on_event = on_event or (lambda event: None)
        self._lock = threading.Lock()  # the feeder vs start/stop of one device
        self._stop = threading.Event()
        self._feeder = threading.Thread(target=self._feed, name="sim-feeder", daemon=True)
        self._feeder.start()
        self._workers = ThreadPoolExecutor(max_workers=16, thread_name_prefix="sim-host")

    # --- devices --------------------------------------------------------------------------------

    def enroll(self, spec: DeviceSpec, token: str) -> HostedDevice:
        """Provision ``spec`` with the fleet (unless its state directory already is) and install
        the factory model; the device is not started."""
        if len(self.devices) >= MAX_AGENTS:
            raise HostFull(
                f"this host holds {MAX_AGENTS} agents already (paho's select() cannot watch more "
                "sockets in one process); spread the devices over more host processes"
            )
        state = self.root / spec.name
        if (state / "agent.toml").exists():
            config = load_config(state)
        else:
            config = self._provision(state, spec, token)
            config = dataclasses.replace(config, telemetry=self.settings.telemetry)
            save_config(config)
            install_bundle(BUNDLES / "1", Slots(config.paths.slots), load_profile(spec.profile))
            _instrument(config)
        device = HostedDevice(spec, state, config.device.id, SensorStream(spec.stream))
        self.devices[spec.name] = device
        self._on_event({"event": "enrolled", "name": spec.name, "device_id": device.device_id})
        return device

    def _provision(self, state: Path, spec: DeviceSpec, token: str) -> AgentConfig:
        # an installer runs `edge-agent provision` again when the fleet answered 5xx or could
        # not be reached (a busy fleet manager enrolling a whole fleet at once can)
        facts = _facts(spec.profile)
        for attempt in range(ENROLL_ATTEMPTS - 1):
            try:
                return provision(state, self.settings.fleet_url, token, spec.profile, facts)
            except ProvisionError as exc:
                if "answered 5" not in str(exc) and "cannot reach" not in str(exc):
                    raise
                log.warning("%s: enrollment failed, retrying: %s", spec.name, exc)
                time.sleep(0.5 * 2**attempt)
        return provision(state, self.settings.fleet_url, token, spec.profile, facts)

    def start(self, name: str) -> None:
        """Start the device's agent (again, after ``offline``)."""
        device = self.devices[name]
        config = load_config(device.state_dir)
        if device.spec.link is not None:
            relay = self._relay(device.spec.link)
            config = dataclasses.replace(
                config, device=dataclasses.replace(config.device, fleet_url=relay.url)
            )
        profile = load_profile(device.spec.profile)
        budget = profile.latency_budget_ms * self.settings.latency_budget_scale
        agent = Agent(
            config,
            runtime_loader=self._loader(device),
            scheduler=self.scheduler,
            serve_http=False,
            profile=dataclasses.replace(profile, latency_budget_ms=budget),
        )
        agent.start()
        with self._lock:
            device.agent = agent
            device.back_at = None
            device.next_at = time.monotonic()

    def stop(self, name: str) -> None:
        """Stop the device's agent cleanly (what it did not send stays in its outbox)."""
        device = self.devices[name]
        with self._lock:
            agent, device.agent = device.agent, None
        if agent is not None:
            agent.stop()

    def enroll_all(self, specs: list[DeviceSpec], token: str, parallel: int = 4) -> None:
        """:meth:`enroll` every spec, ``parallel`` at a time (the fleet enrolls one at a time)."""
        with ThreadPoolExecutor(parallel, thread_name_prefix="sim-enroll") as pool:
            list(pool.map(lambda spec: self.enroll(spec, token), specs))

    def start_all(self) -> None:
        list(self._workers.map(self.start, [n for n, d in self.devices.items() if d.agent is None]))

    def stop_all(self) -> None:
        list(self._workers.map(self.stop, list(self.devices)))

    def offline(self, name: str, seconds: float) -> None:
        """Take the device offline now (its agent stops) and back after ``seconds``."""
        device = self.devices[name]
        self.stop(name)
        device.offline_total += 1
        device.back_at = time.monotonic() + seconds
        self._on_event({"event": "offline", "name": name, "seconds": seconds})

    def _loader(self, device: HostedDevice) -> RuntimeLoader:
        if not device.spec.broken_accelerator:
            return self.runtimes
        shipped = Slots(device.state_dir / "slots").active_release()
        good = frozenset() if shipped is None else frozenset({file_sha256(shipped.artifact_path)})
        return BrokenAccelerator(self.runtimes, good)

    def _relay(self, fault: LinkFault) -> FaultyRelay:
        relay = self._relays.get(fault)
        if relay is None:
            host, _, port = self.settings.fleet_url.removeprefix("http://").partition(":")
            relay = self._relays[fault] = FaultyRelay(host, int(port.rstrip("/")), fault).start()
        return relay

    # --- traffic --------------------------------------------------------------------------------

    def _feed(self) -> None:
        while not self._stop.wait(FEED_TICK_S):
            now = time.monotonic()
            t_s = max(0.0, (time.time() - self.settings.epoch) * self.settings.time_scale)
            for device in list(self.devices.values()):
                if device.back_at is not None and now >= device.back_at:
                    device.back_at = None
                    self._workers.submit(self._come_back, device.spec.name)
                agent = device.agent
                if agent is None or now < device.next_at:
                    continue
                device.next_at = max(device.next_at + device.spec.every_s, now)
                rows = device.stream.at(round(t_s, 3), device.spec.batch_rows).x
                self._predict(device, agent, rows)

    def _predict(self, device: HostedDevice, agent: Agent, rows: np.ndarray) -> None:
        try:
            agent.service.predict(rows, owned=True)
            device.predictions += 1
        except (NoModelError, InputError, AgentError) as exc:
            device.errors += 1
            if len(device.errors_seen) < 5:
                device.errors_seen.append(str(exc))

    def _come_back(self, name: str) -> None:
        try:
            self.start(name)
            self._on_event({"event": "online", "name": name})
        except Exception as exc:  # noqa: BLE001 - reported; the run's outcome shows it
            log.exception("%s could not start again", name)
            self._on_event({"event": "error", "name": name, "error": str(exc)})

    # --- figures --------------------------------------------------------------------------------

    def snapshot(self, name: str) -> DeviceSnapshot:
        device = self.devices[name]
        agent = device.agent
        version: int | None = None
        update_state = update_result = update_reason = ""
        if agent is not None:
            model = agent.service.current()
            version = None if model is None else model.release.version
            figures = agent.update_status()
            if figures is not None:
                update_state, update_result = figures.state, figures.result
                update_reason = figures.reason
        else:  # read what the agent left on disk
            installed = Slots(device.state_dir / "slots").active_release()
            version = None if installed is None else installed.release.version
            store = UpdateStore(device.state_dir / "agent.db")
            try:
                record = store.load()
            finally:
                store.close()
            if record is not None:
                update_state, update_reason = record.state.value, record.reason
                update_result = f"{record.state.value} {record.model} v{record.version}"
        db = device.state_dir / "agent.db"
        return DeviceSnapshot(
            name=name,
            device_id=device.device_id,
            profile=device.spec.profile,
            group=device.spec.group,
            running=agent is not None,
            version=version,
            update_state=update_state,
            update_result=update_result,
            update_reason=update_reason,
            predictions=device.predictions,
            errors=device.errors,
            first_errors=list(device.errors_seen),
            sent=_seqs(db, "SELECT seq FROM sim_sent ORDER BY seq"),
            pending=_seqs(db, "SELECT seq FROM outbox ORDER BY seq"),
            offline_total=device.offline_total,
        )

    def snapshots(self) -> list[DeviceSnapshot]:
        return [self.snapshot(name) for name in self.devices]

    def close(self) -> None:
        """Stop every agent, the feeder, the scheduler, the relays and the shared runtimes."""
        self._stop.set()
        self._feeder.join(5)
        self.stop_all()
        self._workers.shutdown(wait=True)
        self.scheduler.shutdown(wait=True)
        for relay in self._relays.values():
            relay.stop()
        self.runtimes.close()

    def __enter__(self) -> DeviceHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the host process -----------------------------------------------------------------------


@dataclass(frozen=True)
class HostPlan:
    """What ``python -m simulators.host PLAN.json`` runs (written by the supervisor)."""

    root: str
    fleet_url: str
    token: str
    telemetry: dict[str, Any]
    epoch: float
    time_scale: float
    latency_budget_scale: float
    devices: list[dict[str, Any]]

    def settings(self) -> HostSettings:
        return HostSettings(
            self.fleet_url,
            TelemetryConfig(**self.telemetry),
            self.epoch,
            self.time_scale,
            self.latency_budget_scale,
        )


def _emit(lock: threading.Lock, event: dict[str, Any]) -> None:
    with lock:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """Run a host process (see the module docstring)."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    plan = HostPlan(**json.loads(Path(args[0]).read_text()))
    out_lock = threading.Lock()

    def emit(event: dict[str, Any]) -> None:
        _emit(out_lock, event)

    raise_open_files_limit()
    # below the fleet manager and the broker on the same machine: ten hosts' thousand agents'
    # threads left the fleet's ingestion one thread among them (30 reports/s for 200 sent)
    os.nice(HOST_NICE)
    specs = [DeviceSpec.from_json(d) for d in plan.devices]
    host = DeviceHost(Path(plan.root), plan.settings(), emit)
    try:
        started = time.monotonic()
        host.enroll_all(specs, plan.token)
        enrolled = time.monotonic()
        host.start_all()
        emit(
            {
                "event": "ready",
                "devices": len(specs),
                "enroll_s": enrolled - started,
                "start_s": time.monotonic() - enrolled,
            }
        )
        for line in sys.stdin:
            command = json.loads(line)
            cmd = command.get("cmd")
            if cmd == "offline":
                host.offline(command["name"], float(command["seconds"]))
            elif cmd == "snapshot":
                emit(
                    {
                        "event": "snapshot",
                        "devices": [dataclasses.asdict(s) for s in host.snapshots()],
                    }
                )
            elif cmd == "stop":
                break
    finally:
        host.close()
    emit({"event": "stopped", "devices": [dataclasses.asdict(s) for s in host.snapshots()]})
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    # every agent has stopped and its state is on disk: skip the interpreter's teardown, which
    # with a hundred agents' runtimes and threads behind it took over 30 s on a loaded machine
    os._exit(code)
