"""Agent benchmarks: print figures, each beside a baseline measured in the same run.

One function per section; ``main`` runs them all (or the ones named with ``--section``).
Sections: ``drift`` (accumulation rows/s for 32 features, closing a window, merging summaries).

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


SECTIONS: dict[str, Callable[[bool], None]] = {"drift": bench_drift}


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
