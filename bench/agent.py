"""Agent benchmarks: print figures, each beside a baseline measured in the same run.

One function per section; ``main`` runs them all (or the ones named with ``--section``).
Sections: ``drift`` (accumulation rows/s for 32 features, closing a window, merging summaries),
``predict`` (the agent's predict path at batch 1 and 64 against the bare runtime, interleaved,
same threads; and over HTTP), ``memory`` (resident memory of a real ``edge-agent run`` with a
model loaded and connected to a broker, LiteRT and onnxruntime, against a bare process that only
loads the same model).

Run: ``.venv/bin/python -m bench.agent [--section drift] [--quick]`` (or ``bench/agent.py``).
Figures depend on the machine and its load; compare the ratios, not the absolute numbers, across
machines.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

if not __package__:  # run as a file, bench/ is on sys.path first and this file shadows `agent`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np

from agent.drift import DriftAccumulator
from protocol.drift import DriftSummary, WindowCounts, count_rows, merge, score, summarize
from protocol.reference import bin_index, build_reference_profile

SHA = "0" * 64


def _best_seconds(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_drift(quick: bool) -> None:
    """Drift accumulation rows/s for 32 features, against bare numpy in the same run."""
    features, block = 32, 1024
    rng = np.random.default_rng(0)
    train = rng.normal(size=(20_000, features)).astype(np.float32)
    names = [f"f{j}" for j in range(features)]
    reference = build_reference_profile(
        train, (train[:, 0] > 0).astype(np.int64), names, ["a", "b"]
    )
    rows = 50_000 if quick else 200_000
    data = rng.normal(size=(rows, features)).astype(np.float32)
    data[::101, 3] = np.nan  # some missing values, as in the field
    predicted = (data[:, 0] > 0).astype(np.int64)
    repeat = 2 if quick else 3
    edges = [np.asarray(f.edges) for f in reference.features]
    print(f"== drift: {features} features, {len(edges[0]) + 1} bins each, block {block} rows ==")

    # baseline 1: the bare fixed-bin histogram update (indices precomputed), block by block
    slots = np.cumsum([0] + [len(e) + 1 for e in edges])
    flat = np.stack([bin_index(e, data[:, j]) for j, e in enumerate(edges)], axis=1) + slots[:-1]
    hist = np.zeros(int(slots[-1]), dtype=np.int64)

    def bare_bincount() -> None:
        for s in range(0, rows, block):
            hist[:] += np.bincount(flat[s : s + block].ravel(), minlength=hist.size)

    base = rows / _best_seconds(bare_bincount, repeat)
    print(f"{'bare np.bincount (indices given)':44s} {base / 1e6:8.2f} M rows/s   1.00x")

    # baseline 2: bin by np.searchsorted one feature at a time, then the same bincount
    def per_feature_searchsorted() -> None:
        for s in range(0, rows, block):
            chunk = data[s : s + block]
            idx = np.stack([bin_index(e, chunk[:, j]) for j, e in enumerate(edges)], axis=1)
            hist[:] += np.bincount((idx + slots[:-1]).ravel(), minlength=hist.size)

    ss = rows / _best_seconds(per_feature_searchsorted, repeat)
    print(f"{'searchsorted per feature + bincount':44s} {ss / 1e6:8.2f} M rows/s {ss / base:6.2f}x")

    for batch in (1, 8, 256):
        n = min(rows, 20_000 if batch == 1 else rows)

        def accumulate(batch: int = batch, n: int = n) -> None:
            acc = DriftAccumulator(reference, block_rows=block)
            for s in range(0, n, batch):
                acc.add(data[s : s + batch], predicted[s : s + batch])
            acc.flush()

        rate = n / _best_seconds(accumulate, repeat)
        label = f"DriftAccumulator.add, batch {batch}"
        print(f"{label:44s} {rate / 1e6:8.3f} M rows/s {rate / base:6.2f}x")

    # closing a window: flush the buffered rows, copy the counts, score 32 features and output
    def close_one() -> None:
        acc = DriftAccumulator(reference, block_rows=block)
        acc.add(data[:1000], predicted[:1000])
        acc.close_window(0.0, 300.0, "bench", 1, SHA)

    close = _best_seconds(close_one, repeat * 5)
    print(f"{'add 1,000 rows + close_window (scores)':44s} {close * 1e3:8.2f} ms")

    # the fleet side of the same format: parse and merge many devices' summaries, score the sum
    devices = 1_000 if quick else 10_000
    window = count_rows(
        reference,
        data[:1000],
        predicted[:1000],
        start=0.0,
        end=300.0,
        model_name="bench",
        model_version=1,
        reference_sha256=SHA,
    )
    wire = json.dumps(summarize(window, reference).to_dict())
    parse = _best_seconds(lambda: DriftSummary.from_dict(json.loads(wire)), repeat * 20)
    print(
        f"{'json.loads + DriftSummary.from_dict':44s} {parse * 1e6:8.0f} us/summary "
        f"({len(wire)} bytes)"
    )
    many = [window] * devices
    merged: list[WindowCounts] = []
    took = _best_seconds(lambda: merged.append(merge(many)), repeat)
    scored = _best_seconds(lambda: score(merged[0], reference), repeat)
    print(
        f"{f'merge {devices:,} summaries':44s} {took * 1e3:8.2f} ms; score the sum "
        f"{scored * 1e3:.2f} ms"
    )


# --- the predict path ---------------------------------------------------------------------------

BUNDLE = Path(__file__).resolve().parents[1] / "models" / "bundles" / "pdm-classifier" / "1"
# one profile per runtime: each picks that runtime's int8 artifact of the bundle
RUNTIME_PROFILES = {"onnxruntime": "x86_64-gateway", "litert": "rpi4-aarch64"}


def _interleaved(
    a: Callable[[], object], b: Callable[[], object], calls: int, rounds: int
) -> tuple[float, float, float, float]:
    """Per-call seconds of ``a`` and ``b``, measured in alternating rounds so that both see the
    same machine load: (best wall a, best wall b, best CPU a, best CPU b). The process CPU time
    is the steadier figure on a shared machine: time spent waiting for a core is not in it."""
    wall: tuple[list[float], list[float]] = ([], [])
    cpu: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for i, fn in enumerate((a, b)):
            c, t = time.process_time(), time.perf_counter()
            for _ in range(calls):
                fn()
            wall[i].append((time.perf_counter() - t) / calls)
            cpu[i].append((time.process_time() - c) / calls)
    return min(wall[0]), min(wall[1]), min(cpu[0]), min(cpu[1])


def bench_predict(quick: bool) -> None:
    """InferenceService.predict (validation, runtime, argmax, drift feed, counters, latency)
    against runtime.predict on the same artifact, same thread count, interleaved; then the same
    over HTTP with the Python client (keep-alive)."""
    import tempfile

    from agent.bundle_install import install_bundle
    from agent.client import AgentClient
    from agent.config import Listen
    from agent.http_server import predict_server
    from agent.inference import InferenceService, load_model
    from agent.runtimes import Runtime, load_runtime
    from agent.slots import Slots
    from firmware_profiles import load_profile
    from protocol.golden import GoldenSet

    # many short rounds: the best round of each path is the one the machine left alone
    rounds = 31 if quick else 101
    print("== predict path: agent vs bare runtime (same artifact, same threads, interleaved) ==")
    print(
        f"{'runtime':12s} {'batch':>5s} {'bare us':>9s} {'agent us':>9s} {'overhead':>9s} "
        f"{'ratio':>6s} {'cpu':>7s} {'no drift':>9s} {'http us':>9s} {'http':>8s}"
    )
    for runtime, profile_name in RUNTIME_PROFILES.items():
        profile = load_profile(profile_name)
        threads = profile.inference_threads
        with tempfile.TemporaryDirectory() as tmp:
            installed = install_bundle(BUNDLE, Slots(Path(tmp)), profile).installed
            service = InferenceService(max_rows=1024)
            service.swap(load_model(installed, threads, DriftAccumulator))
            plain = InferenceService(max_rows=1024)  # the same without the drift feed
            plain.swap(load_model(installed, threads))
            bare = load_runtime(installed.artifact_path, installed.release.runtime, threads)
            server = predict_server(Listen("127.0.0.1", 0), service, 16 * 1024 * 1024)
            server.start()
            client = AgentClient(server.url)
            golden = GoldenSet.from_json(installed.file(installed.release.golden).read_bytes())
            try:
                for batch in (1, 64):
                    x = np.ascontiguousarray(
                        np.resize(golden.inputs, (batch, golden.n_features)), dtype=np.float32
                    )
                    calls = 200 if batch == 1 else 25
                    for _ in range(50):  # warm up every path (allocations, tensor resizes)
                        bare.predict(x)
                        service.predict(x)
                        plain.predict(x)

                    def run_bare(x: np.ndarray = x, rt: Runtime = bare) -> object:
                        return rt.predict(x)

                    def run_agent(x: np.ndarray = x, svc: InferenceService = service) -> object:
                        return svc.predict(x)

                    def run_plain(x: np.ndarray = x, svc: InferenceService = plain) -> object:
                        return svc.predict(x)

                    rows = x.tolist()

                    def run_http(rows: list[list[float]] = rows, c: AgentClient = client) -> None:
                        for _ in range(20):
                            c.predict(rows)

                    b, a, cb, ca = _interleaved(run_bare, run_agent, calls, rounds)
                    _, _, cb2, cp = _interleaved(run_bare, run_plain, calls, rounds)
                    http = _best_seconds(run_http, max(3, rounds // 4)) / 20
                    print(
                        f"{runtime:12s} {batch:5d} {b * 1e6:9.1f} {a * 1e6:9.1f} "
                        f"{(a - b) * 1e6:8.1f}u {a / b:5.2f}x {ca / cb:6.2f}x "
                        f"{cp / cb2:8.2f}x {http * 1e6:9.1f} {http / b:7.1f}x"
                    )
            finally:
                client.close()
                server.stop()
                service.close()
                plain.close()
                bare.close()
    print(
        "(ratio: best wall time agent / bare, target <= 1.2x at batch 1; cpu: the same in "
        "process CPU time; overhead: the agent's own wall microseconds per call; no drift: the "
        "cpu ratio without the drift feed; http: a keep-alive AgentClient round trip, as a "
        "multiple of bare.)"
    )


# --- memory of a real agent process -------------------------------------------------------------

_BARE_SERVER = """
import sys, time, numpy as np, psutil
from agent.runtimes import load_runtime
rt = load_runtime(sys.argv[1], sys.argv[2], int(sys.argv[3]))
x = np.zeros((64, rt.input.shape[1]), np.float32)
for i in range(300):
    rt.predict(x if i % 2 else x[:1])
print(psutil.Process().memory_info().rss, flush=True)
"""


def bench_memory(quick: bool) -> None:
    """RSS of ``edge-agent run`` with the model loaded, connected to a real Mosquitto, after
    predictions and a heartbeat; beside a bare process that imports only numpy and the runtime
    and runs the same model (the floor any process serving this model pays)."""
    import json as json_module
    import os
    import signal
    import subprocess
    import tempfile
    import urllib.request

    import psutil

    from agent.bundle_install import install_bundle
    from agent.client import AgentClient, AgentClientError
    from agent.config import (
        AgentConfig,
        DeviceConfig,
        HttpConfig,
        Listen,
        MqttConfig,
        TelemetryConfig,
        save_config,
    )
    from agent.slots import Slots
    from firmware_profiles import load_profile
    from simulators.broker import MosquittoBroker, free_port

    targets = {"litert": 64.0, "onnxruntime": 90.0}
    repo = Path(__file__).resolve().parents[1]
    print("== memory: resident set of `edge-agent run` (model loaded, broker connected) ==")
    print(
        f"{'runtime':12s} {'agent MiB':>9s} {'USS MiB':>8s} {'bare MiB':>8s} {'agent/bare':>10s} "
        f"{'target':>7s}"
    )
    with tempfile.TemporaryDirectory() as tmp, MosquittoBroker(Path(tmp) / "broker") as broker:
        for runtime in ("litert", "onnxruntime"):
            profile = load_profile(RUNTIME_PROFILES[runtime])
            state = Path(tmp) / runtime
            config = AgentConfig(
                state_dir=state,
                device=DeviceConfig(f"bench-{runtime}", profile.name, "http://127.0.0.1:9"),
                mqtt=MqttConfig("127.0.0.1", broker.port),
                http=HttpConfig(
                    predict_listen=Listen("127.0.0.1", free_port()),
                    health_listen=Listen("127.0.0.1", free_port()),
                ),
                telemetry=TelemetryConfig(heartbeat_seconds=1.0),
            )
            state.mkdir()
            save_config(config)
            installed = install_bundle(BUNDLE, Slots(config.paths.slots), profile).installed
            proc = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--state-dir", str(state)],
                cwd=repo,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                client = AgentClient(f"http://{config.http.predict_listen}", timeout=5)
                deadline = time.monotonic() + 60
                health: dict[str, object] = {}
                while not health.get("broker_connected"):
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError(f"the {runtime} agent did not come up")
                    try:
                        url = f"http://{config.http.health_listen}/health"
                        with urllib.request.urlopen(url, timeout=2) as r:
                            health = json_module.loads(r.read())
                    except OSError:
                        time.sleep(0.1)
                x = np.zeros((64, 24), np.float32)
                for i in range(100 if quick else 500):
                    try:
                        client.predict(x if i % 2 else x[:1])
                    except AgentClientError as exc:
                        raise RuntimeError(f"the {runtime} agent refused: {exc}") from None
                client.close()
                time.sleep(1.5)  # a heartbeat or two
                info = psutil.Process(proc.pid).memory_full_info()
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
            bare = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    _BARE_SERVER,
                    str(installed.artifact_path),
                    runtime,
                    str(profile.inference_threads),
                ],
                cwd=repo,
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "PYTHONPATH": str(repo)},
            )
            bare_rss = int(bare.stdout.strip().splitlines()[-1]) / 2**20
            rss = info.rss / 2**20
            print(
                f"{runtime:12s} {rss:9.1f} {info.uss / 2**20:8.1f} {bare_rss:8.1f} "
                f"{rss / bare_rss:9.2f}x {targets[runtime]:6.0f}  "
                + ("ok" if rss <= targets[runtime] else "OVER")
            )


SECTIONS: dict[str, Callable[[bool], None]] = {
    "drift": bench_drift,
    "predict": bench_predict,
    "memory": bench_memory,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--section", action="append", choices=sorted(SECTIONS))
    parser.add_argument("--quick", action="store_true", help="fewer rows and repeats")
    args = parser.parse_args(argv)
    for name in args.section or list(SECTIONS):
        SECTIONS[name](args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
