"""The trial monitor's decision: does a freshly activated model keep serving, or go back?

After activation the new model serves live traffic for a soak period (the release's
``trial_seconds``). The engine samples the new model's counters and latency and the predicted
classes of the new model and of the previous one on the same live inputs, and asks
:func:`evaluate_trial` each time: :class:`Continue`, :class:`Pass` or :class:`Fail` with a reason.

The gates, each compared with the previous model's figures where there is a previous model:

* error rate: runtime failures / served batches above ``max_error_rate`` fails at once;
* latency: p95 above ``max_latency_ratio`` × the previous model's p95 fails (only with at least
  ``min_requests`` batches on both sides, so one cold request does not decide);
* output drift: the Jensen–Shannon distance between the predicted-class distribution of the new
  model and that of the previous model on the *same* inputs above ``max_output_js`` fails.

The trial passes once the soak period is over and at least ``min_requests`` batches were served.
A device with too little traffic keeps watching up to ``max_seconds`` and then passes, saying so:
it has shown no harm, and the fleet's rollout gates see the thin evidence in the report.

Pure: no clocks (``elapsed`` is passed in), no runtimes, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TrialThresholds:
    soak_seconds: float
    min_requests: int
    max_error_rate: float
    max_latency_ratio: float
    max_output_js: float = 0.3  # JS distance (base 2, in [0, 1]) of predicted classes
    max_seconds: float = 24 * 3600.0  # watch at most this long for ``min_requests``


@dataclass(frozen=True)
class TrialStats:
    """The figures of one model: served batches, runtime failures, p95 latency (seconds)."""

    requests: int
    errors: int
    p95_seconds: float | None


@dataclass(frozen=True)
class Continue:
    pass


@dataclass(frozen=True)
class Pass:
    note: str = ""


@dataclass(frozen=True)
class Fail:
    reason: str


TrialDecision = Continue | Pass | Fail


def js_distance(p_counts: Sequence[int], q_counts: Sequence[int]) -> float:
    """Jensen–Shannon distance (base 2, in [0, 1]) between two count vectors; 0 if either is
    empty."""
    if len(p_counts) != len(q_counts):
        raise ValueError(f"count vectors differ in length: {len(p_counts)} vs {len(q_counts)}")
    np_, nq = sum(p_counts), sum(q_counts)
    if np_ <= 0 or nq <= 0:
        return 0.0
    div = 0.0
    for a, b in zip(p_counts, q_counts, strict=True):
        p, q = a / np_, b / nq
        m = (p + q) / 2
        if p > 0:
            div += 0.5 * p * math.log2(p / m)
        if q > 0:
            div += 0.5 * q * math.log2(q / m)
    return math.sqrt(max(0.0, div))


def evaluate_trial(
    new: TrialStats,
    previous: TrialStats | None,
    thresholds: TrialThresholds,
    elapsed: float,
    classes_new: Sequence[int] = (),
    classes_previous: Sequence[int] = (),
) -> TrialDecision:
    """Decide the trial from the new model's figures so far and the previous model's.

    ``classes_new`` / ``classes_previous`` count the predicted classes of each model on the same
    sample of live inputs (empty when there is no previous model to compare with).
    """
    t = thresholds
    total = new.requests + new.errors
    if new.errors and new.errors / total > t.max_error_rate:
        return Fail(
            f"error rate {new.errors / total:.3f} ({new.errors} of {total} batches failed) "
            f"above the release's max_error_rate {t.max_error_rate:g}"
        )
    enough = new.requests >= max(1, t.min_requests)
    if (
        enough
        and previous is not None
        and previous.requests >= max(1, t.min_requests)
        and new.p95_seconds is not None
        and previous.p95_seconds
    ):
        ratio = new.p95_seconds / previous.p95_seconds
        if ratio > t.max_latency_ratio:
            return Fail(
                f"p95 latency {new.p95_seconds * 1000:.2f} ms is {ratio:.2f}x the previous "
                f"model's {previous.p95_seconds * 1000:.2f} ms, above max_latency_ratio "
                f"{t.max_latency_ratio:g}"
            )
    sampled = min(sum(classes_new), sum(classes_previous))
    if classes_new and classes_previous and sampled >= max(1, t.min_requests):
        js = js_distance(classes_new, classes_previous)
        if js > t.max_output_js:
            return Fail(
                f"predicted classes drift from the previous model's on the same {sampled} live "
                f"inputs: JS distance {js:.3f} > {t.max_output_js:g} (new {list(classes_new)}, "
                f"previous {list(classes_previous)})"
            )
    if elapsed < t.soak_seconds:
        return Continue()
    if enough or t.min_requests <= 0:
        return Pass()
    if elapsed >= t.max_seconds:
        return Pass(
            f"only {new.requests} of {t.min_requests} requests in {elapsed:.0f} s: too little "
            "traffic to judge, committed without evidence of harm"
        )
    return Continue()
