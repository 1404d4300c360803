"""Runtime benchmark: our runtime interface against the bare runtime, in the same run.

For each artifact of a bundle (default: the committed ``pdm-classifier`` v1) it measures

* batch-1 latency: the median of single timed ``predict`` calls, in µs;
* batch-64 throughput: the median over rounds of rows/s of a block of calls;

once through :func:`agent.runtimes.load_runtime` and once through the bare runtime with the
same thread count and the same session options (onnxruntime ``InferenceSession.run`` with the
options of :func:`agent.runtimes.onnx_session_options`; LiteRT ``set_tensor``/``invoke``/
``get_tensor`` on an interpreter sized once). Both are warmed up, then timed in interleaved
rounds whose order alternates, so drift in machine load hits both alike. It prints the figures
and the ratio ours/bare; it asserts nothing.

Then, in a child process each, the peak RSS of serving the LiteRT artifact through our
interface, against a child that only imports numpy (the floor every agent pays).

    .venv/bin/python bench/runtime.py [--bundle DIR] [--threads N] [--rounds N] [--model PATH]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable as a plain script from a checkout

from agent.runtimes import (  # noqa: E402
    import_litert_interpreter,
    import_onnxruntime,
    load_runtime,
    onnx_session_options,
    runtime_for_path,
)
from protocol.bundle import METADATA_FILE, check_file, parse_bundle  # noqa: E402

DEFAULT_BUNDLE = REPO / "models" / "bundles" / "pdm-classifier" / "1"
Predict = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Result:
    file: str
    runtime: str
    ours_us: float
    bare_us: float
    ours_rows_s: float
    bare_rows_s: float


def bare_predictor(path: Path, runtime: str, threads: int, batch_rows: int) -> Predict:
    """The runtime used directly, the way a caller without our interface would."""
    if runtime == "onnxruntime":
        ort = import_onnxruntime()
        session = ort.InferenceSession(
            str(path),
            sess_options=onnx_session_options(threads),
            providers=["CPUExecutionProvider"],
        )
        outputs = [session.get_outputs()[0].name]
        input_name = session.get_inputs()[0].name

        def run_onnx(x: np.ndarray) -> np.ndarray:
            return session.run(outputs, {input_name: x})[0]

        return run_onnx
    interpreter = import_litert_interpreter()(model_path=str(path), num_threads=threads)
    details = interpreter.get_input_details()[0]
    in_index = details["index"]
    out_index = interpreter.get_output_details()[0]["index"]
    interpreter.resize_tensor_input(in_index, (batch_rows, int(details["shape"][1])))
    interpreter.allocate_tensors()

    def run_litert(x: np.ndarray) -> np.ndarray:
        interpreter.set_tensor(in_index, x)
        interpreter.invoke()
        return interpreter.get_tensor(out_index)

    return run_litert


def latency_us(
    ours: Predict, bare: Predict, x: np.ndarray, rounds: int, calls: int
) -> tuple[float, float]:
    """Median µs of single calls, ours and bare timed in alternating interleaved rounds."""
    timings: dict[str, list[int]] = {"ours": [], "bare": []}
    clock = time.perf_counter_ns
    for r in range(rounds):
        order = [("ours", ours), ("bare", bare)]
        for name, fn in order if r % 2 == 0 else reversed(order):
            sink = timings[name]
            for _ in range(calls):
                t0 = clock()
                fn(x)
                sink.append(clock() - t0)
    return statistics.median(timings["ours"]) / 1e3, statistics.median(timings["bare"]) / 1e3


def throughput(
    ours: Predict, bare: Predict, x: np.ndarray, rounds: int, calls: int
) -> tuple[float, float]:
    """Median rows/s over rounds of ``calls`` back-to-back calls, ours and bare interleaved."""
    rates: dict[str, list[float]] = {"ours": [], "bare": []}
    rows = x.shape[0] * calls
    for r in range(rounds):
        order = [("ours", ours), ("bare", bare)]
        for name, fn in order if r % 2 == 0 else reversed(order):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn(x)
            rates[name].append(rows / (time.perf_counter() - t0))
    return statistics.median(rates["ours"]), statistics.median(rates["bare"])


def bench_artifact(path: Path, runtime: str, threads: int, rounds: int) -> Result:
    ours = load_runtime(path, runtime, threads)
    features = ours.input.shape[1]
    assert features is not None
    rng = np.random.default_rng(0)
    x1 = rng.normal(size=(1, features)).astype(np.float32)
    x64 = rng.normal(size=(64, features)).astype(np.float32)

    bare1 = bare_predictor(path, runtime, threads, 1)
    np.testing.assert_allclose(ours.predict(x1), bare1(x1), rtol=1e-6, atol=1e-7)
    for _ in range(300):  # warm-up: caches, thread pools, allocator
        ours.predict(x1)
        bare1(x1)
    ours_us, bare_us = latency_us(ours.predict, bare1, x1, rounds, 200)

    bare64 = bare_predictor(path, runtime, threads, 64)
    for _ in range(200):
        ours.predict(x64)
        bare64(x64)
    ours_rows, bare_rows = throughput(ours.predict, bare64, x64, rounds, 300)
    ours.close()
    return Result(path.name, runtime, ours_us, bare_us, ours_rows, bare_rows)


_RSS_CHILD = """
import sys
import numpy as np
if sys.argv[1] != "-":
    from agent.runtimes import load_runtime
    rt = load_runtime(sys.argv[1], sys.argv[3], int(sys.argv[2]))
    x = np.zeros((1, rt.input.shape[1]), np.float32)
    for _ in range(1000):
        rt.predict(x)
    x = np.zeros((64, rt.input.shape[1]), np.float32)
    for _ in range(100):
        rt.predict(x)
# VmHWM: this process's peak RSS (ru_maxrss would carry the forking parent's peak over exec)
print(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")))  # kB
"""


def peak_rss_mib(model: Path | None, runtime: str, threads: int) -> float:
    """Peak RSS of a fresh process that serves ``model`` (or, for None, only imports numpy)."""
    out = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, str(model) if model else "-", str(threads), runtime],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.split()[-1]) / 1024


def default_threads() -> int:
    """The running machine's profile thread count (1 when no profile fits)."""
    from agent.machine import probe
    from firmware_profiles import load_profiles
    from protocol.errors import ProfileError
    from protocol.profiles import select_profile

    try:
        return select_profile(load_profiles().values(), probe()).inference_threads
    except ProfileError:
        return 1


def bundle_artifacts(bundle: Path) -> list[tuple[Path, str]]:
    meta = parse_bundle((bundle / METADATA_FILE).read_bytes())
    found = []
    for artifact in meta.artifacts:
        path = bundle / artifact.file
        check_file(meta, artifact.file, path.read_bytes())  # benchmark the files bundle.json names
        found.append((path, artifact.runtime))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="bundle directory")
    parser.add_argument("--model", type=Path, action="append", help="model file(s) instead")
    parser.add_argument("--threads", type=int, help="threads (default: this machine's profile)")
    parser.add_argument("--rounds", type=int, default=40, help="interleaved rounds per figure")
    args = parser.parse_args(argv)

    threads = args.threads or default_threads()
    if args.model:
        artifacts = [(p, runtime_for_path(p)) for p in args.model]
        source = ", ".join(str(p) for p in args.model)
    else:
        artifacts = bundle_artifacts(args.bundle)
        source = str(
            args.bundle.relative_to(REPO) if args.bundle.is_relative_to(REPO) else args.bundle
        )
    print(f"runtime benchmark: {source}; threads={threads}, rounds={args.rounds}")
    print("batch-1: median µs of rounds x 200 single calls; batch-64: median rows/s of rounds")
    print("x 300-call blocks. ratio = ours/bare (latency target <= 1.20, throughput >= 0.83)")
    print()
    header = (
        f"{'artifact':<20} {'runtime':<12} {'b1 ours µs':>11} {'b1 bare µs':>11} {'ratio':>6} "
        f"{'b64 ours rows/s':>16} {'b64 bare rows/s':>16} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for path, runtime in artifacts:
        r = bench_artifact(path, runtime, threads, args.rounds)
        print(
            f"{r.file:<20} {r.runtime:<12} {r.ours_us:>11.1f} {r.bare_us:>11.1f} "
            f"{r.ours_us / r.bare_us:>6.2f} {r.ours_rows_s:>16,.0f} {r.bare_rows_s:>16,.0f} "
            f"{r.ours_rows_s / r.bare_rows_s:>6.2f}",
            flush=True,
        )

    print()
    floor = peak_rss_mib(None, "-", threads)
    print("peak RSS of a fresh process (VmHWM), 1,000 batch-1 + 100 batch-64 predicts:")
    print(f"  {'python + numpy only':<44} {floor:6.1f} MiB")
    for runtime in ("litert", "onnxruntime"):
        path = next((p for p, rt in artifacts if rt == runtime), None)
        if path is not None:
            rss = peak_rss_mib(path, runtime, threads)
            print(f"  {runtime + ' serving ' + path.name:<44} {rss:6.1f} MiB (+{rss - floor:.1f})")
    print("  (agent target on LiteRT: <= 64 MiB in total)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
