"""The device host's parts: runtimes shared per artifact, the broken accelerator failing the
real health check, the faulty download relay, and a host of real agents against a real broker
and fleet app (enrolled, serving their streams in-process, every report stored)."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from agent.bundle_install import install_bundle
from agent.config import TelemetryConfig
from agent.health_check import run_health_check
from agent.runtimes import load_runtime
from agent.slots import Slots
from firmware_profiles import load_profile
from protocol.golden import GoldenSet
from simulators.host import MAX_AGENTS, DeviceHost, DeviceSpec, HostSettings
from simulators.netfaults import FaultyRelay, LinkFault
from simulators.releases import BUNDLES, build_release
from simulators.shared_runtimes import BrokenAccelerator, SharedRuntimes, file_sha256
from simulators.stack import running_stack, wait_for
from simulators.streams import StreamSpec
from simulators.supervisor import KillPlan, Supervisor


def _installed(tmp: Path, bundle: int, profile: str) -> Slots:
    slots = Slots(tmp / "slots")
    install_bundle(BUNDLES / str(bundle), slots, load_profile(profile))
    return slots


def test_one_runtime_per_artifact_shared_across_threads(tmp_path: Path) -> None:
    shared = SharedRuntimes()
    installs = [_installed(tmp_path / f"d{i}", 1, "rpi3-armv7l") for i in range(3)]
    paths = [s.active_release().artifact_path for s in installs]  # type: ignore[union-attr]
    views = [shared(p, "litert", 1) for p in paths]
    assert (shared.loads, shared.borrows) == (1, 3)
    assert [v.path for v in views] == paths
    golden = GoldenSet.from_json((BUNDLES / "1" / "golden" / "model.int8.tflite.json").read_bytes())
    own = load_runtime(paths[0], "litert", 1)
    expected = own.predict(golden.inputs)
    own.close()
    results: list[bool] = []

    def hammer(view: object) -> None:
        for _ in range(50):
            results.append(bool(np.array_equal(view.predict(golden.inputs), expected)))  # type: ignore[attr-defined]

    threads = [threading.Thread(target=hammer, args=(v,)) for v in views]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 150 and all(results)
    views[0].close()  # a borrowed view: the shared runtime still serves the others
    assert np.array_equal(views[1].predict(golden.inputs), expected)
    shared(paths[0], "litert", 2)  # another thread count: another runtime
    assert shared.loads == 2
    shared.close()


def test_broken_accelerator_fails_the_real_health_check_on_new_models_only(
    tmp_path: Path,
) -> None:
    profile = load_profile("x86_64-gateway")
    factory = _installed(tmp_path / "d", 1, "x86_64-gateway").active_release()
    assert factory is not None
    loader = BrokenAccelerator(SharedRuntimes(), frozenset({file_sha256(factory.artifact_path)}))
    new = _installed(tmp_path / "new", 2, "x86_64-gateway").active_release()
    assert new is not None
    for installed, passes in ((factory, True), (new, False)):
        runtime = loader(installed.artifact_path, installed.release.runtime, 1)
        verdict = run_health_check(installed, 1, profile.latency_budget_ms * 100, runtime)
        assert verdict.passed is passes, verdict.reason


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    data = np.random.default_rng(0).bytes(12_000)
    (tmp_path / "blob").write_bytes(data)
    handler = partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], data
    server.shutdown()
    server.server_close()


def test_relay_slows_and_drops_downloads(file_server: tuple[int, bytes]) -> None:
    port, data = file_server
    with FaultyRelay("127.0.0.1", port, LinkFault(cut_after=3000, cuts=2)) as relay:
        got = []
        for _ in range(3):
            try:
                with urllib.request.urlopen(relay.url + "/blob", timeout=10) as r:
                    got.append(r.read())
            except Exception as exc:  # noqa: BLE001 - a dropped link shows as any of several
                got.append(type(exc).__name__.encode())
        assert got[2] == data and data not in got[:2]
        assert relay.cut_total == 2
    with FaultyRelay("127.0.0.1", port, LinkFault(rate=20_000)) as relay:
        started = time.monotonic()
        with urllib.request.urlopen(relay.url + "/blob", timeout=10) as r:
            assert r.read() == data
        assert time.monotonic() - started >= 0.4  # 12 kB at 20 kB/s


def test_a_host_of_real_agents(tmp_path: Path) -> None:
    telemetry = TelemetryConfig(
        heartbeat_seconds=0.5,
        drift_window_seconds=1.0,
        drift_min_rows=10,
        shutdown_flush_seconds=3.0,
    )
    with running_stack(tmp_path / "stack") as stack:
        stack.upload(build_release("v1", 1, tmp_path / "b1"))
        token = stack.enrollment_token(uses=6)
        settings = HostSettings(stack.url, telemetry, time.time(), 60.0)
        before = {t.name for t in threading.enumerate()}
        with DeviceHost(tmp_path / "devices", settings) as host:
            for i in range(6):
                profile = "x86_64-gateway" if i % 2 else "rpi3-armv7l"
                spec = DeviceSpec(f"d{i}", profile, "g", StreamSpec.stable(3, i), every_s=0.05)
                host.enroll(spec, token)
            host.start_all()
            assert {d["id"] for d in stack.devices()} == {
                d.device_id for d in host.devices.values()
            }
            wait_for(
                "every device to serve and report drift",
                lambda: all(s.predictions > 20 and len(s.sent) > 3 for s in host.snapshots()),
                90,  # seconds on a loaded machine; it takes about 3
                0.2,
            )
            # one runtime per artifact (v1's int8 ONNX and int8 TFLite), no HTTP server
            assert (host.runtimes.loads, host.runtimes.borrows) == (2, 6)
            new = {t.name for t in threading.enumerate()} - before
            assert not [n for n in new if "http" in n.lower()], new
            snaps = host.snapshots()
            assert {s.version for s in snaps} == {1} and not any(s.errors for s in snaps)
            host.offline("d0", 1.0)
            assert not host.snapshot("d0").running
            wait_for("d0 to come back", lambda: host.snapshot("d0").running, 10, 0.1)
            host.stop_all()
            snaps = host.snapshots()
        stored = wait_for(
            "the fleet to store every report",
            lambda: (
                (s := stack.stored_seqs())
                and all(set(d.sent) <= s.get(d.device_id, set()) for d in snaps)
                and s
            ),
            20,
            0.2,
        )
        assert sum(len(stored[d.device_id]) for d in snaps) == sum(len(d.sent) for d in snaps)
        assert all(not d.pending for d in snaps)


def test_supervisor_spreads_devices_over_enough_processes(tmp_path: Path) -> None:
    specs = [
        DeviceSpec(f"d{i}", "x86_64-gateway", "g", StreamSpec.stable(1, i)) for i in range(250)
    ]
    settings = HostSettings("http://127.0.0.1:1", TelemetryConfig())
    sup = Supervisor(tmp_path, settings, "token", specs, 1, [KillPlan("d7", "trial")])
    sizes = sorted(len(h.devices) for h in sup.hosts)
    assert sizes == [1, 83, 83, 83] and max(sizes) <= MAX_AGENTS
    assert [h.pause_in for h in sup.hosts if h.devices == ["d7"]] == ["trial"]
    assert sorted(n for h in sup.hosts for n in h.devices) == sorted(s.name for s in specs)
