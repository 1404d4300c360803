"""Spread a simulated fleet over host processes and collect what they report.

:class:`Supervisor` starts K ``python -m simulators.host`` processes (:mod:`simulators.host`;
more than asked if needed, at most :data:`~simulators.host.MAX_AGENTS` agents in each), deals
the devices among them round-robin, and talks to each over JSON lines: commands on stdin
(``offline``, ``snapshot``, ``stop``), events on stdout (``enrolled``, ``ready``, ``offline``,
``online``, ``snapshot``, ``stopped``). A device to be killed mid-update gets a host process of
its own, started with the update engine's pause hook (``EDGEFLEET_TEST_PAUSE_IN``): when the
agent has saved that state and written the marker, the supervisor kills the process with SIGKILL
(the power cut) and starts it again without the hook, on the same state directory, so the agent
resumes or reverts the update as it would after a real power cut. Hosts start a few at a time
(:data:`STARTING_AT_ONCE`), each next one once an earlier one has enrolled and started its
devices, so a large fleet does not enroll all at once.

It does not talk to the fleet (:mod:`simulators.run` does) and runs no agent itself.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from agent.updater import PAUSE_ENV, PAUSE_MARKER_ENV
from simulators.host import MAX_AGENTS, DeviceSpec, HostPlan, HostSettings
from simulators.releases import REPO

log = logging.getLogger(__name__)

Event = dict[str, Any]

# host processes enrolling and starting their agents at once: ten at once (1,000 devices) made
# the fleet answer "database is locked" and left hosts' paho clients starved of CPU on 2 cores
STARTING_AT_ONCE = 2


class HostFailed(RuntimeError):
    """A host process exited or did not answer; the message names it and its log."""


class HostProcess:
    """One ``python -m simulators.host`` process and its event stream."""

    def __init__(
        self,
        name: str,
        plan: HostPlan,
        workdir: Path,
        on_event: Callable[[str, Event], None],
        pause_in: str = "",
    ) -> None:
        self.name = name
        self.plan = plan
        self.workdir = workdir
        self.pause_in = pause_in
        self.marker = workdir / f"{name}.paused"
        self.devices = [d["name"] for d in plan.devices]
        self._on_event = on_event
        self._proc: subprocess.Popen[str] | None = None
        self._replies: queue.Queue[Event] = queue.Queue()
        self._ready = threading.Event()
        self.ready_event: Event = {}
        self.final: list[Event] = []
        self.kills = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start(self) -> None:
        plan_path = self.workdir / f"{self.name}.json"
        plan_path.write_text(json.dumps(dataclasses.asdict(self.plan)))
        env = {k: v for k, v in os.environ.items() if k not in (PAUSE_ENV, PAUSE_MARKER_ENV)}
        if self.pause_in:
            env[PAUSE_ENV], env[PAUSE_MARKER_ENV] = self.pause_in, str(self.marker)
        self._ready.clear()
        with self.log_path.open("ab") as log_file:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "simulators.host", str(plan_path)],
                cwd=REPO,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                text=True,
                bufsize=1,
            )
        assert self._proc.stdout is not None
        threading.Thread(
            target=self._read, args=(self._proc.stdout,), name=f"{self.name}-events", daemon=True
        ).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            try:
                event: Event = json.loads(line)
            except ValueError:
                log.warning("%s wrote a line that is not an event: %r", self.name, line[:200])
                continue
            kind = event.get("event")
            if kind == "ready":
                self.ready_event = event
                self._ready.set()
            elif kind in ("snapshot", "stopped"):
                self._replies.put(event)
            self._on_event(self.name, event)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _tail(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-2000:]

    def wait_ready(self, timeout: float) -> Event:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.1):
            if not self.alive():
                raise HostFailed(f"host {self.name} exited before it was ready: {self._tail()}")
            if time.monotonic() > deadline:
                raise HostFailed(f"host {self.name} not ready in {timeout}s (see {self.log_path})")
        return self.ready_event

    def send(self, command: Event) -> None:
        if self._proc is None or self._proc.stdin is None or not self.alive():
            raise HostFailed(f"host {self.name} is not running: {self._tail()}")
        self._proc.stdin.write(json.dumps(command) + "\n")
        self._proc.stdin.flush()

    def snapshot(self, timeout: float = 60.0) -> list[Event]:
        self.send({"cmd": "snapshot"})
        return self._reply(timeout)

    def _reply(self, timeout: float) -> list[Event]:
        try:
            event = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise HostFailed(
                f"host {self.name} did not answer in {timeout}s: {self._tail()}"
            ) from None
        devices: list[Event] = event["devices"]
        return devices

    def finish(self, timeout: float = 180.0) -> list[Event]:
        """After a ``stop`` command: the final snapshots, once the process has exited."""
        self.final = self._reply(timeout)
        if self._proc is not None:
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:  # its agents have stopped: nothing is lost
                log.warning("host %s did not exit after stopping; killing it", self.name)
                self._proc.kill()
                self._proc.wait(30)
        return self.final

    def kill(self) -> None:
        """The power cut: SIGKILL, nothing flushed."""
        if self._proc is not None and self.alive():
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(30)
        self.kills += 1


@dataclasses.dataclass(frozen=True)
class KillPlan:
    """Kill the host of device ``name`` once its update engine has saved ``state``."""

    name: str
    state: str


class Supervisor:
    """N devices over K host processes (see the module docstring)."""

    def __init__(
        self,
        workdir: Path,
        settings: HostSettings,
        token: str,
        specs: list[DeviceSpec],
        processes: int,
        kills: list[KillPlan] | None = None,
        on_event: Callable[[str, Event], None] | None = None,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self._on_event = on_event or (lambda host, event: None)
        self.device_ids: dict[str, str] = {}
        self.events: list[tuple[float, str, Event]] = []
        self._lock = threading.Lock()
        killed = {k.name: k.state for k in kills or ()}
        plain = [s for s in specs if s.name not in killed]
        processes = max(processes, -(-len(plain) // MAX_AGENTS))  # at most MAX_AGENTS each
        groups = [plain[i :: max(1, processes)] for i in range(max(1, processes))]
        self.hosts: list[HostProcess] = []

        def plan(devices: list[DeviceSpec]) -> HostPlan:
            return HostPlan(
                root=str(workdir / "devices"),
                fleet_url=settings.fleet_url,
                token=token,
                telemetry=dataclasses.asdict(settings.telemetry),
                epoch=settings.epoch,
                time_scale=settings.time_scale,
                latency_budget_scale=settings.latency_budget_scale,
                devices=[d.to_json() for d in devices],
            )

        for i, devices in enumerate(g for g in groups if g):
            self.hosts.append(HostProcess(f"host-{i}", plan(devices), workdir, self._event))
        for spec in specs:
            if spec.name in killed:
                self.hosts.append(
                    HostProcess(
                        f"host-{spec.name}", plan([spec]), workdir, self._event, killed[spec.name]
                    )
                )
        self._host_of = {name: h for h in self.hosts for name in h.devices}
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch_kills, name="sim-kills", daemon=True)

    def _event(self, host: str, event: Event) -> None:
        with self._lock:
            self.events.append((time.time(), host, event))
            if event.get("event") == "enrolled":
                self.device_ids[event["name"]] = event["device_id"]
        self._on_event(host, event)

    def start(self, timeout: float = 300.0, at_once: int = STARTING_AT_ONCE) -> list[Event]:
        """Start every host process (they enroll and start their devices), at most ``at_once``
        enrolling and starting at a time: the next starts when the oldest one is ready. Their
        ``ready`` events; ``timeout`` is for each host from its own start."""
        for host in self.hosts[:at_once]:
            host.start()
        ready = []
        for i, host in enumerate(self.hosts):
            ready.append(host.wait_ready(timeout))
            if i + at_once < len(self.hosts):
                self.hosts[i + at_once].start()
        self._watcher.start()
        return ready

    def offline(self, name: str, seconds: float) -> None:
        self._host_of[name].send({"cmd": "offline", "name": name, "seconds": seconds})

    def snapshots(self) -> list[Event]:
        """Every device as its host sees it now (a killed host being restarted is waited for)."""
        out: list[Event] = []
        for host in self.hosts:
            if not host.alive():
                host.wait_ready(120)
            out.extend(host.snapshot())
        return out

    def _watch_kills(self) -> None:
        while not self._stop.wait(0.05):
            for host in self.hosts:
                if host.pause_in and host.marker.exists():
                    host.marker.unlink()
                    host.kill()
                    self._event(
                        host.name,
                        {"event": "killed", "name": host.devices[0], "state": host.pause_in},
                    )
                    host.pause_in = ""  # the next life runs without the hook
                    host.start()

    def stop(self) -> list[Event]:
        """Stop every host cleanly; every device's final snapshot."""
        self._stop.set()
        if self._watcher.is_alive():
            self._watcher.join(5)
        out: list[Event] = []
        for host in self.hosts:
            if not host.alive():
                host.wait_ready(120)
            host.send({"cmd": "stop"})
        for host in self.hosts:
            out.extend(host.finish())
        return out

    def terminate(self) -> None:
        """Kill whatever still runs (after a failure)."""
        self._stop.set()
        for host in self.hosts:
            host.kill()
