"""Agent benchmarks: print figures, each beside a baseline measured in the same run.

One function per section; ``main`` runs them all (or the ones named with ``--section``).
Sections: ``drift`` (accumulation rows/s for 32 features, closing a window, merging summaries),
``predict`` (the agent's predict path at batch 1 and 64 against the runtime called the plain
documented way, interleaved, same options and threads; our runtime wrapper alone; the same path
on the pure-Python fallback of the C extension; and over HTTP; on the sample model and on a
wider MLP of the same recipe), ``memory`` (resident memory of a
real ``edge-agent run`` with a model loaded and connected to a broker, LiteRT and onnxruntime,
against a bare process that only loads the same model).

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
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

if not __package__:  # run as a file, bench/ is on sys.path first and this file shadows `agent`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np

from agent.drift import DEFAULT_BLOCK_ROWS, DriftAccumulator
from protocol.drift import DriftSummary, WindowCounts, count_rows, merge, score, summarize
from protocol.reference import bin_index, build_reference_profile

if TYPE_CHECKING:
    from protocol.profiles import FirmwareProfile

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
    fns: list[Callable[[], object]], calls: int, rounds: int
) -> tuple[list[float], list[float]]:
    """Per-call seconds of each of ``fns``, measured in rotating rounds so that all see the same
    machine load: (best wall time of each, best process CPU time of each). The CPU time is the
    steadier figure on a shared machine (time spent waiting for a core is not in it), and it
    counts work any thread of the process does, so work moved off the caller's thread shows."""
    wall: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        for k in range(len(fns)):
            i = (k + r) % len(fns)  # rotate who goes first
            fn = fns[i]
            c, t = time.process_time(), time.perf_counter()
            for _ in range(calls):
                fn()
            wall[i].append((time.perf_counter() - t) / calls)
            cpu[i].append((time.process_time() - c) / calls)
    return [min(w) for w in wall], [min(c) for c in cpu]


def _wide_bundle(root: Path, hidden: tuple[int, int]) -> Path:
    """A bundle of the sample's recipe with wider hidden layers (a few seconds to build): the
    same features, classes, exports and quantization, more work per row."""
    from models import build, mlp

    version = 90
    build.RECIPES[version] = build.Recipe(
        version=version,
        data_seed=1,
        train_rows=4000,
        training=mlp.TrainConfig(seed=11, hidden=hidden, epochs=2),
    )
    try:
        files, _ = build.build_bundle(version)
    finally:
        del build.RECIPES[version]
    return build.write_bundle(root, version, files)


WIDE_HIDDEN = (512, 256)


def bench_predict(quick: bool) -> None:
    """InferenceService.predict (validation, runtime, counters, latency, drift feed) against the
    runtime called the plain documented way (``InferenceSession.run([output], {input: x})``;
    LiteRT ``set_tensor``/``invoke``/``get_tensor`` on an interpreter sized for the batch, as
    :func:`bench.runtime.bare_predictor` does) with the same options and threads, interleaved;
    beside it our runtime wrapper's ``run`` alone and the same over HTTP with the Python client
    (keep-alive). On the sample model, then on a wider MLP of the same recipe, which shows how
    the agent's fixed per-call cost compares with a model that does more work."""
    import logging
    import tempfile

    from firmware_profiles import load_profile

    logging.getLogger("models").setLevel(logging.WARNING)
    # many short rounds: the best round of each path is the one the machine left alone
    rounds = 31 if quick else 101
    from agent import fastpath

    path = "C extension" if fastpath.native() is not None else "pure Python (no C extension)"
    print(
        "== predict path: agent vs bare runtime (same artifact, same threads, interleaved; "
        f"agent on its {path}) =="
    )
    print(
        f"{'runtime':12s} {'model':>7s} {'batch':>5s} {'bare us':>8s} {'run us':>7s} "
        f"{'agent us':>9s} {'svc us':>7s} {'overhead':>9s} {'ratio':>6s} {'cpu':>6s} "
        f"{'no drift':>9s} {'python':>7s} {'http us':>8s} {'http':>7s}"
    )
    with tempfile.TemporaryDirectory() as build_dir:
        bundles = [("sample", BUNDLE), ("wide", _wide_bundle(Path(build_dir), WIDE_HIDDEN))]
        for model_name, bundle in bundles:
            for runtime, profile_name in RUNTIME_PROFILES.items():
                profile = load_profile(profile_name)
                _bench_predict_one(model_name, bundle, runtime, profile, rounds)
    print(
        "(bare: the runtime's documented call; run: our runtime wrapper's run() alone, the "
        "call the agent makes (onnxruntime: the session's binding with one reused RunOptions, "
        "cheaper than the documented call; LiteRT: the interpreter's C++ wrapper under a lock); "
        "agent: InferenceService.predict with a drift accumulator, the caller keeping its array "
        "(every row copied and binned; each timed round holds whole 1,024-row drift blocks); "
        "svc: agent - run, the service's own cost per call; overhead: agent - bare, wall "
        "microseconds per call; ratio: best wall time agent / bare, target <= 1.2x at batch 1; "
        "cpu: the same in process CPU time; no drift: the cpu ratio without the drift feed; "
        "python: the agent's ratio on the pure-Python fallback (no agent._fastpath); "
        "http: a keep-alive AgentClient round trip, as a multiple of bare. wide: hidden layers "
        f"{WIDE_HIDDEN} "
        "instead of (32, 16).)"
    )


def _bench_predict_one(
    model_name: str,
    bundle: Path,
    runtime: str,
    profile: FirmwareProfile,
    rounds: int,
) -> None:
    """One row per batch size of :func:`bench_predict`."""
    import tempfile

    from agent import fastpath
    from agent.bundle_install import install_bundle
    from agent.client import AgentClient
    from agent.config import Listen
    from agent.http_server import predict_server
    from agent.inference import InferenceService, load_model
    from agent.slots import Slots
    from bench.runtime import bare_predictor
    from protocol.golden import GoldenSet

    threads = profile.inference_threads
    with tempfile.TemporaryDirectory() as tmp:
        installed = install_bundle(bundle, Slots(Path(tmp)), profile).installed
        service = InferenceService(max_rows=1024)
        service.swap(load_model(installed, threads, DriftAccumulator))
        plain = InferenceService(max_rows=1024)  # the same without the drift feed
        plain.swap(load_model(installed, threads))
        native = fastpath.native()
        fastpath.use_native(False)  # the same service and runtime on the pure-Python path
        try:
            pure = InferenceService(max_rows=1024)
            pure.swap(load_model(installed, threads, DriftAccumulator))
        finally:
            if native is not None:
                fastpath.use_native(True)
        model = service.current()
        assert model is not None
        ours = model.runtime
        server = predict_server(Listen("127.0.0.1", 0), service, 16 * 1024 * 1024)
        server.start()
        client = AgentClient(server.url)
        golden = GoldenSet.from_json(installed.file(installed.release.golden).read_bytes())
        try:
            for batch in (1, 64):
                x = np.ascontiguousarray(
                    np.resize(golden.inputs, (batch, golden.n_features)), dtype=np.float32
                )
                bare = bare_predictor(installed.artifact_path, runtime, threads, batch)
                np.testing.assert_allclose(service.predict(x).outputs, bare(x), atol=1e-6)
                # whole drift blocks per round (1,024 rows by default), so that every round
                # carries the same share of the block work: a round of fewer rows would let
                # the best round be one that binned nothing
                calls = DEFAULT_BLOCK_ROWS // batch
                fns: list[Callable[[], object]] = [
                    partial(f, x)
                    for f in (bare, ours.run, service.predict, plain.predict, pure.predict)
                ]
                for _ in range(50):  # warm up every path (allocations, tensor resizes)
                    for fn in fns:
                        fn()
                rows = x.tolist()

                def run_http(rows: list[list[float]] = rows, c: AgentClient = client) -> None:
                    for _ in range(20):
                        c.predict(rows)

                (b, r, a, _, ap), (cb, _, ca, cp, _) = _interleaved(fns, calls, rounds)
                http = _best_seconds(run_http, max(3, rounds // 4)) / 20
                print(
                    f"{runtime:12s} {model_name:>7s} {batch:5d} {b * 1e6:8.1f} {r * 1e6:7.1f} "
                    f"{a * 1e6:9.1f} {(a - r) * 1e6:7.1f} {(a - b) * 1e6:8.1f}u {a / b:5.2f}x "
                    f"{ca / cb:5.2f}x {cp / cb:8.2f}x {ap / b:6.2f}x {http * 1e6:8.1f} "
                    f"{http / b:6.1f}x",
                    flush=True,
                )
        finally:
            client.close()
            server.stop()
            service.close()
            plain.close()
            pure.close()


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
