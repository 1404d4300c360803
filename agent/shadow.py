"""The shadow step: a healthy candidate runs beside the active model on live inputs, judged.

When a release's signed health thresholds ask for it (``shadow_samples > 0``), the update engine
(:mod:`agent.updater`) puts a :class:`ShadowTap` on the *active* model (through
:meth:`agent.inference.InferenceService.add_tap`): the rows the active model serves, with the
classes it predicted, are copied into a bounded buffer, off the request path. The engine drains
the buffer in its own thread, runs the candidate (and a private copy of the active model, for a
fair latency figure) on the very same rows, and asks :func:`evaluate_shadow` after each drain:

* once ``samples`` rows are judged: the share of rows whose predicted class (argmax) is the same
  for both models must be at least ``min_agreement``, else :class:`~agent.trial.Fail`;
* with too little traffic the shadow waits up to ``max_seconds`` and then fails *closed*: the
  release explicitly asked for evidence, so a candidate without it is refused, not activated.

The candidate's and the active model's single-row latency on those rows are reported
(:func:`describe`), not gated: the trial gates latency on live serving.

It does not run models, read clocks or touch slots; the tap only copies rows (numpy, a lock).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from agent.trial import Continue, Fail, Pass

ShadowDecision = Continue | Pass | Fail


@dataclass(frozen=True)
class ShadowThresholds:
    samples: int  # live rows to judge (the release's shadow_samples)
    min_agreement: float  # the release's min_shadow_agreement
    max_seconds: float  # wait at most this long for ``samples`` rows, then fail closed


@dataclass(frozen=True)
class ShadowStats:
    """What the shadow has seen so far."""

    rows: int  # live rows both models predicted
    agreed: int  # of those, rows with the same predicted class
    candidate_ms: float | None = None  # median single-row latency on those rows
    active_ms: float | None = None

    @property
    def agreement(self) -> float | None:
        return None if self.rows <= 0 else self.agreed / self.rows


def median(values: Sequence[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _latency(stats: ShadowStats) -> str:
    if stats.candidate_ms is None or stats.active_ms is None:
        return "no latency measured"
    ratio = f" ({stats.candidate_ms / stats.active_ms:.2f}x)" if stats.active_ms > 0 else ""
    return (
        f"single-row latency candidate {stats.candidate_ms:.3f} ms vs active "
        f"{stats.active_ms:.3f} ms{ratio}"
    )


def describe(stats: ShadowStats) -> str:
    """The figures as one line for the update report."""
    if stats.agreement is None:
        return f"no live rows judged; {_latency(stats)}"
    return (
        f"agreement {stats.agreement:.3f} ({stats.agreed} of {stats.rows} live rows); "
        f"{_latency(stats)}"
    )


def evaluate_shadow(
    stats: ShadowStats, thresholds: ShadowThresholds, elapsed: float
) -> ShadowDecision:
    """Decide the shadow from the figures so far; ``elapsed`` seconds since it started."""
    t = thresholds
    if stats.rows >= t.samples:
        agreement = stats.agreement or 0.0
        if agreement < t.min_agreement:
            return Fail(
                f"agreement with the active model {agreement:.3f} ({stats.agreed} of "
                f"{stats.rows} live rows) is below the release's min_shadow_agreement "
                f"{t.min_agreement:g}; {_latency(stats)}"
            )
        return Pass(describe(stats))
    if elapsed >= t.max_seconds:
        return Fail(
            f"only {stats.rows} of {t.samples} live rows in {elapsed:.0f} s; the release asks "
            "for a shadow run, so the candidate is refused rather than activated unjudged "
            "(fail closed) — send the update again when the device serves traffic"
        )
    return Continue()


class ShadowTap:
    """Copies the active model's served rows (and its predicted classes) into a bounded buffer
    for the engine to drain; rows that do not fit are counted and dropped, never waited for."""

    def __init__(self, n_features: int, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a shadow tap needs room for at least one row, got {capacity}")
        self._inputs = np.empty((capacity, n_features), dtype=np.float32)
        self._predicted = np.empty(capacity, dtype=np.int64)
        self._fill = 0
        self._wanted = capacity  # rows still worth keeping (the engine lowers it near the end)
        self.dropped = 0
        self._lock = threading.Lock()

    def add(self, inputs: np.ndarray, predicted: np.ndarray) -> None:
        with self._lock:
            room = min(len(self._inputs), self._wanted) - self._fill
            n = min(room, len(inputs))
            if n > 0:
                self._inputs[self._fill : self._fill + n] = inputs[:n]
                self._predicted[self._fill : self._fill + n] = predicted[:n]
                self._fill += n
            self.dropped += len(inputs) - max(n, 0)

    def want(self, rows: int) -> None:
        """Keep at most ``rows`` more rows between drains (the samples still missing)."""
        with self._lock:
            self._wanted = max(0, rows)

    def drain(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The rows kept since the last drain (copies) and their served classes."""
        with self._lock:
            n, self._fill = self._fill, 0
            if not n:
                return None
            return self._inputs[:n].copy(), self._predicted[:n].copy()
