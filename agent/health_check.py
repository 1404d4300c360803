"""The health check of a freshly installed slot: golden replay and the latency budget.

:func:`evaluate_health` is the pure comparison: the golden replay's result
(:func:`protocol.golden.check_golden`) and the p95 of single-row latencies against the firmware
profile's ``latency_budget_ms``. :func:`run_health_check` is the thin adapter: it loads the slot's
artifact in its runtime, replays the golden inputs as one batch, then times single-row
predictions (after a warm-up) and closes the runtime — unless the caller passed the runtime in,
which the update engine does when a shadow step follows, so the candidate is loaded once.

It does not activate anything, and it does not touch the active slot or the inference service.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from agent.runtimes import Runtime, load_runtime
from agent.slots import InstalledRelease
from protocol.golden import GoldenResult, GoldenSet, check_golden

WARMUP = 3
TIMED_ROWS = 32


@dataclass(frozen=True)
class HealthVerdict:
    passed: bool
    golden: GoldenResult
    p95_ms: float | None
    budget_ms: float
    reason: str  # "" when passed


def _p95(values: Sequence[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def evaluate_health(
    golden: GoldenResult, latencies_s: Sequence[float], budget_ms: float
) -> HealthVerdict:
    """Pass when the golden set matched and the single-row p95 latency is within budget."""
    p95 = _p95(latencies_s)
    p95_ms = None if p95 is None else p95 * 1000.0
    reasons = []
    if not golden.passed:
        reasons.append(f"golden set failed: {golden.reason}")
    if p95_ms is None:
        reasons.append("no latency was measured")
    elif p95_ms > budget_ms:
        reasons.append(
            f"single-row p95 latency {p95_ms:.2f} ms is over the profile's budget of "
            f"{budget_ms:g} ms"
        )
    return HealthVerdict(not reasons, golden, p95_ms, budget_ms, "; ".join(reasons))


def run_health_check(
    installed: InstalledRelease, threads: int, budget_ms: float, runtime: Runtime | None = None
) -> HealthVerdict:
    """Load ``installed`` in its runtime and check it (raises ModelLoadError if it cannot).

    With ``runtime`` (``installed``'s artifact, loaded by the caller) it is used and left open.
    """
    release = installed.release
    golden = GoldenSet.from_json(installed.file(release.golden).read_bytes())
    owned = runtime is None
    if runtime is None:
        runtime = load_runtime(installed.artifact_path, release.runtime, threads)
    try:
        result = check_golden(golden, runtime.predict(golden.inputs))
        rows = golden.inputs
        for i in range(WARMUP):
            runtime.predict(rows[i % golden.n : i % golden.n + 1])
        latencies = []
        for i in range(TIMED_ROWS):
            row = rows[i % golden.n : i % golden.n + 1]
            start = time.perf_counter()
            runtime.predict(row)
            latencies.append(time.perf_counter() - start)
    finally:
        if owned:
            runtime.close()
    return evaluate_health(result, latencies, budget_ms)
