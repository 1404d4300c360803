"""The fleet demo (``./scripts/demo``, i.e. ``python -m simulators.demo`` after set-up), run as a
subprocess the way a user runs it, on a shortened demo scenario: the story it prints (v2
completed, v3 stopped by its gates and rolled back, why the canary gave it up), the dashboard
reachable at the printed URL with the printed token while it runs and at the end, and Ctrl-C
(SIGINT to the command's process group, as a terminal sends it) at the end and mid-run (on the
embedded broker): a clean exit with no traceback, none of its processes (worker, device hosts,
broker) left running and its temp directory gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from fleet.dashboard.session import COOKIE

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "simulators" / "scenarios" / "demo.toml"
# shorter soaks and warm-up, faster reports: the same story in well under a minute on a quiet box
SHORT = {
    "soak_s": "2",
    "warmup_s": "1.0",
    "after_s": "0.5",
    "predict_every_s": "0.1",
    "heartbeat_s": "1.0",
    "drift_window_s": "2.0",
}


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    text = DEMO.read_text()
    for key, value in SHORT.items():
        text, n = re.subn(rf"\b{key} = [0-9.]+", f"{key} = {value}", text)
        assert n, f"demo.toml has no {key}"
    path = tmp_path_factory.mktemp("demo") / "demo-short.toml"
    path.write_text(text)
    return path


class Demo:
    """The demo command as a subprocess, its output collected line by line."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.tmp = tmp / "tmp"  # the demo's TMPDIR
        self.tmp.mkdir()
        # a session of its own, like a terminal's foreground job: killpg is the terminal's Ctrl-C
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "simulators.demo", *args],
            cwd=REPO,
            env={**os.environ, "TMPDIR": str(self.tmp)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    @property
    def text(self) -> str:
        with self._changed:
            return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 180.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = re.search(pattern, "".join(self.lines))
                if found:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"no {pattern!r} in the demo's output:\n{self.text}")
                self._changed.wait(min(left, 0.5))

    def processes(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def ctrl_c(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)

    def finish(self, timeout: float = 120.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL the command and everything it started (the worker has a session of its own)."""
        with contextlib.suppress(psutil.NoSuchProcess):
            for p in self.processes():
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def leftovers(self) -> list[Path]:
        """The demo's temp directories still there."""
        return list(self.tmp.glob("edgefleet-demo-*"))


@pytest.fixture
def run_demo() -> Iterator[list[Demo]]:
    """The demos a test starts, killed with all they started if the test left them running."""
    started: list[Demo] = []
    yield started
    for demo in started:  # a failed test leaves nothing behind either
        if demo.proc.poll() is None:
            demo.kill()


def _gone(processes: list[psutil.Process], timeout: float = 10.0) -> list[psutil.Process]:
    """Those of ``processes`` still running after ``timeout`` (killed orphans are reaped by
    init a moment later)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def test_the_demo_tells_the_story_keeps_the_dashboard_up_and_stops_on_ctrl_c(
    short_demo: Path, run_demo: list[Demo], tmp_path: Path
) -> None:
    demo = Demo(tmp_path, "--devices", "10", "--scenario", str(short_demo))
    run_demo.append(demo)
    url = demo.wait_for(r"dashboard at (http://\S+/dashboard)").group(1)
    token = demo.wait_for(r"operator token: (\S+)").group(1)
    demo.wait_for(r"10 devices enrolled")
    page = httpx.get(url, headers={"Accept": "text/html", "Cookie": f"{COOKIE}={token}"})
    assert page.status_code == 200 and "dev-" in page.text, page.text[:500]  # the devices
    assert httpx.get(url, headers={"Accept": "text/html"}).status_code == 303  # no session
    processes = demo.processes()
    assert len(processes) >= 4, processes  # worker, two device hosts, mosquitto

    demo.wait_for(r"Press Ctrl-C", 240)
    out = demo.text
    assert "Traceback" not in out
    assert re.search(r"the fleet: 10 simulated devices \(.*jetson-aarch64.*rpi3-armv7l", out)
    assert re.search(r"v2 stage 3/3 \(100% of the target\)", out), out
    assert "v2 COMPLETED" in out
    assert re.search(r"gave v3 up; dev-\w+ reported: trial: predicted classes drift", out), out
    assert re.search(r"v3 STOPPED by its gates, rolling it back: .*trial gate failed", out), out
    assert "v3 ROLLED BACK" in out
    assert out.index("v2 COMPLETED") < out.index("v3 STOPPED") < out.index("v3 ROLLED BACK")
    rollouts = httpx.get(  # the dashboard stays up at the end, showing what happened
        url + "/rollouts", headers={"Accept": "text/html", "Cookie": f"{COOKIE}={token}"}
    )
    assert rollouts.status_code == 200 and "rolled" in rollouts.text.lower(), rollouts.text[:500]

    demo.ctrl_c()
    code = demo.finish(120)
    out = demo.text
    assert code == 0, out
    assert "Traceback" not in out
    assert "demo stopped: everything it started is stopped" in out
    # the count of what was sent and stored, once every device has stopped
    served = demo.wait_for(r"the end: 10 devices, (.*?);").group(1)
    assert "on v2" in served and "v3" not in served, served
    assert re.search(r"(\d+) reports sent by the agents, \1 stored by the fleet \(0 lost\)", out)
    assert "every expected outcome met" in out
    assert not _gone(processes), out
    assert not demo.leftovers()


def test_ctrl_c_mid_run_stops_everything_cleanly(
    short_demo: Path, run_demo: list[Demo], tmp_path: Path
) -> None:
    # on the embedded broker, the one a machine without Mosquitto gets
    demo = Demo(
        tmp_path,
        "--devices",
        "6",
        "--scenario",
        str(short_demo),
        "--broker",
        "embedded",
        "--no-wait",
    )
    run_demo.append(demo)
    demo.wait_for(r"v2 stage 1/3")
    processes = demo.processes()
    assert len(processes) >= 3, processes  # worker, device hosts
    assert "MQTT broker (embedded)" in demo.text

    demo.ctrl_c()
    code = demo.finish(120)
    out = demo.text
    assert code == 130, out
    assert "Traceback" not in out
    assert "demo interrupted: everything it started is stopped" in out
    assert not _gone(processes), out
    assert not demo.leftovers()
