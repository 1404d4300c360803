"""The trial monitor's decision: does a freshly activated model keep serving, or go back?

After activation the new model serves live traffic for a soak period (the release's
``trial_seconds``). The engine samples the new model's counters and latency and the predicted
classes of the new model and of the previous one on the same live inputs, and asks
:func:`evaluate_trial` each time: :class:`Continue`, :class:`Pass` or :class:`Fail` with a reason.

The gates, each compared with the previous model's figures where there is a previous model:

* error rate: runtime failures / served batches above ``max_error_rate`` fails at once;
* latency: p95 above ``max_latency_ratio`` × the previous model's p95 fails (only with at least
  ``min_requests`` batches on both sides, so one cold request does not decide);
* output drift: the predicted-class distribution of the new model against that of the previous
  model on the *same* inputs fails when their Jensen–Shannon distance is above ``max_output_js``
  (the effect is large enough to matter) *and* the difference is significant at
  ``output_alpha`` for the number of inputs compared (:func:`output_js_bound`): a fixed 0.3 on
  its own fails a model equal to the previous one about once in a few hundred trials on 8–16
  inputs, and a 0-failure rollout gate over a thousand devices then rolls a good release back.

The trial passes once the soak period is over and at least ``min_requests`` batches were served.
A device with too little traffic keeps watching up to ``max_seconds`` and then passes, saying so:
it has shown no harm, and the fleet's rollout gates see the thin evidence in the report.

Pure: no clocks (``elapsed`` is passed in), no runtimes, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from protocol.drift_stats import chi2_quantile

# Significance level of the output-drift test. The trial looks again each second of its soak,
# on every device of a rollout whose trial-failure gate may allow none, so a false failure must
# be rare per device. The bound assumes two independent samples; the trial's are the same
# inputs through two models, positively correlated, so its real false-failure rate is far below
# alpha: over 20,000 simulated trials (8 looks from 8 to 64 inputs, 5 classes) of a model that
# disagrees with the previous one on 10% of inputs, none failed at 0.01 (the plain 0.3 failed
# 7%); at 30% disagreement 1 in 10,000. 0.01 rather than 0.001 keeps a collapsed model caught
# early: on 16 inputs ~83% of the time against ~40% (on 24 inputs 98% against 90%).
OUTPUT_ALPHA = 0.01


@dataclass(frozen=True)
class TrialThresholds:
    soak_seconds: float
    min_requests: int
    max_error_rate: float
    max_latency_ratio: float
    max_output_js: float = 0.3  # JS distance (base 2, in [0, 1]) of predicted classes
    output_alpha: float = OUTPUT_ALPHA  # and significant at this level for the inputs compared
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


def output_js_bound(n: int, m: int, classes: int, alpha: float = OUTPUT_ALPHA) -> float:
    """JS distance (base 2) of two class-count samples of sizes ``n`` and ``m`` over ``classes``
    classes with support above which they differ significantly at ``alpha``.

    The G statistic of the 2 x k table of counts is ``4n · JSD`` (JS divergence in nats) for two
    samples of ``n`` each, χ²(k − 1) under H0 (same distribution); for unequal sizes ``2n`` is
    replaced by ``4·n·m / (n + m)`` (the approximation the drift verdict's bounds use). So the
    bound is ``sqrt(χ²_{1-α}(k-1) / (8 · n_eff · ln 2))``, ``n_eff = n·m / (n + m)``; infinite
    (nothing is significant) with an empty sample or a single class.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha={alpha}: use 0 < alpha < 1")
    if n <= 0 or m <= 0 or classes < 2:
        return math.inf
    n_eff = n * m / (n + m)
    return math.sqrt(chi2_quantile(1.0 - alpha, classes - 1) / (8.0 * n_eff * math.log(2)))


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
        k = sum(1 for a, b in zip(classes_new, classes_previous, strict=True) if a + b > 0)
        bound = output_js_bound(sum(classes_new), sum(classes_previous), k, t.output_alpha)
        if js > t.max_output_js and js > bound:
            return Fail(
                f"predicted classes drift from the previous model's on the same {sampled} live "
                f"inputs: JS distance {js:.3f} > {t.max_output_js:g} and above {bound:.3f}, the "
                f"bound for n={sampled} over {k} classes at alpha {t.output_alpha:g} "
                f"(new {list(classes_new)}, previous {list(classes_previous)})"
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
