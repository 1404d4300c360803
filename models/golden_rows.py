"""Choosing the golden inputs of a bundle: stratified over classes, plus edge cases.

The golden inputs are shared by every artifact of a bundle (each artifact records its own
expected outputs on them). Rows are chosen so that a healthy runtime on any device reproduces
the predicted class with certainty: only rows whose top-1 probability leads the runner-up by at
least ``margin`` in the fp32 reference *and* in every artifact are eligible, so tiny kernel
differences between CPUs (x86 vs ARM, XNNPack vs reference kernels) cannot flip an argmax.

Candidates are held-out rows and a few synthetic edge cases (training minimum/maximum, extreme
percentiles, vibration beyond the training range, which saturates the int8 input). Inputs are
rounded to 5 significant digits, as a sensor would report them, to keep the golden files small.

This module only selects rows from arrays it is given; it runs no model and writes no files.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def rounded(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to 5 significant digits, as float32."""
    x64 = x.astype(np.float64)
    with np.errstate(divide="ignore"):
        digits = 4 - np.floor(np.log10(np.abs(x64)))
    digits = np.where(np.isfinite(digits), digits, 0).astype(np.int64)
    out = np.array(
        [round(float(v), int(d)) for v, d in zip(x64.ravel(), digits.ravel(), strict=True)]
    )
    return out.reshape(x.shape).astype(np.float32)


def edge_cases(
    train_x: np.ndarray, normal_row: np.ndarray, vibration_columns: Sequence[int]
) -> np.ndarray:
    """Synthetic rows at and beyond the edges of the training distribution."""
    x = train_x.astype(np.float64)
    lo, hi = x.min(axis=0), x.max(axis=0)
    rows = [
        x.mean(axis=0),
        np.median(x, axis=0),
        np.quantile(x, 0.01, axis=0),
        np.quantile(x, 0.99, axis=0),
        lo,
        hi,
    ]
    beyond = normal_row.astype(np.float64).copy()
    beyond[list(vibration_columns)] = hi[list(vibration_columns)] * 1.5  # saturates int8 input
    rows.append(beyond)
    low_vibration = normal_row.astype(np.float64).copy()
    low_vibration[list(vibration_columns)] = lo[list(vibration_columns)]
    rows.append(low_vibration)
    return rounded(np.stack(rows))


def _margin(p: np.ndarray) -> np.ndarray:
    top2 = np.sort(p, axis=1)[:, -2:]
    return np.asarray(top2[:, 1] - top2[:, 0])


def select(
    candidates: np.ndarray,
    is_edge: np.ndarray,
    reference: np.ndarray,
    artifacts: Sequence[np.ndarray],
    n: int = 64,
    max_edges: int = 8,
    margin: float = 0.2,
) -> np.ndarray:
    """Indices into ``candidates``: eligible edge cases first, then rows per predicted class.

    ``reference`` and each of ``artifacts`` are probabilities [m, C] on ``candidates``.
    """
    predicted = np.argmax(reference, axis=1)
    eligible = _margin(reference) >= margin
    for probs in artifacts:
        eligible &= (_margin(probs) >= margin) & (np.argmax(probs, axis=1) == predicted)
    edges = [int(i) for i in np.flatnonzero(eligible & is_edge)[:max_edges]]
    n_classes = reference.shape[1]
    pools = [list(np.flatnonzero(eligible & ~is_edge & (predicted == c))) for c in range(n_classes)]
    chosen: list[int] = []
    quota = n - len(edges)
    # round-robin over classes: stratified, and a short class just leaves its turns to the others
    while len(chosen) < quota and any(pools):
        for pool in pools:
            if pool and len(chosen) < quota:
                chosen.append(int(pool.pop(0)))
    if len(chosen) < quota:
        raise ValueError(
            f"only {len(chosen) + len(edges)} candidate rows are eligible for the golden set, "
            f"{n} wanted; give more candidates or a smaller margin"
        )
    by_class = sorted(chosen, key=lambda i: (int(predicted[i]), i))
    return np.asarray(by_class + edges, dtype=np.int64)
