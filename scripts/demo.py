"""The demo behind ./scripts/demo: build the sample bundles, then run every artifact.

It rebuilds both versions of the sample model from their seeded recipe into var/demo/, checks
the rebuild is byte-identical to the committed bundles, and runs each artifact through the
agent's runtime interface on fresh sensor windows, printing predictions, accuracy and latency.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.runtimes import load_runtime  # noqa: E402
from models import build, pdm_data  # noqa: E402
from protocol.bundle import METADATA_FILE, parse_bundle  # noqa: E402


def main() -> int:
    out = REPO / "var" / "demo" / "bundles"
    data = pdm_data.generate(2000, seed=424242)
    names = pdm_data.CLASS_NAMES
    for version in (1, 2):
        result = build.build(version, out)
        built, seconds = result.directory, result.seconds
        committed = (build.bundle_dir(build.default_root(), version) / METADATA_FILE).read_bytes()
        same = (built / METADATA_FILE).read_bytes() == committed
        meta = parse_bundle(committed)
        print(f"\n== {meta.name} v{meta.version}: built in {seconds:.1f}s into {built}")
        print(f"   byte-identical to the committed bundle: {'yes' if same else 'NO'}")
        print(f"   {'artifact':<20}{'runtime':<13}{'bytes':>7}{'accuracy':>10}{'p50 µs':>9}  rows")
        for artifact in meta.artifacts:
            runtime = load_runtime(built / artifact.file, artifact.runtime, threads=1)
            try:
                probs = runtime.predict(data.x)
                accuracy = float(np.mean(probs.argmax(axis=1) == data.y))
                one = data.x[:1]
                timings = []
                for _ in range(300):
                    t0 = time.perf_counter_ns()
                    runtime.predict(one)
                    timings.append(time.perf_counter_ns() - t0)
                p50 = statistics.median(timings) / 1000
                sample = ", ".join(
                    f"{names[p]}{'' if p == t else f'(true {names[t]})'}"
                    for p, t in zip(probs[:3].argmax(axis=1), data.y[:3], strict=True)
                )
            finally:
                runtime.close()
            print(
                f"   {artifact.file:<20}{artifact.runtime:<13}{artifact.length:>7}"
                f"{accuracy:>10.4f}{p50:>9.1f}  {sample}"
            )
    print("\nNext: ./scripts/test runs the suite; see README.md for the agent and fleet manager.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
