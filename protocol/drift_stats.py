"""Two-sample drift statistics on binned counts, and their sample-size-aware bounds.

Every function here compares two count vectors over the *same* bins (a window against the
reference profile, a canary cohort against a control cohort, a new model's window against the
previous model's). Both vectors are treated as samples, so every bound accounts for both sizes
through the effective size ``n_eff = n·m / (n + m)``; against a very large reference it tends to
``n``.

* **PSI** (population stability index, the symmetric Kullback–Leibler divergence) on proportions
  smoothed with :data:`PSEUDO_COUNT` per bin with support. Under H0 (same distribution)
  ``n_eff · PSI`` is approximately χ²(k − 1), ``k`` = bins where either sample has a count.
* **Jensen–Shannon distance** (natural log, the square root of the divergence, as
  ``scipy.spatial.distance.jensenshannon``) on raw proportions: bounded by ``sqrt(ln 2)`` and
  finite without smoothing. Reported, not tested: for small differences ``8 · JSD ≈ PSI``, so a
  separate JS test would spend α on the same information.
* **KS** from the binned CDFs: the largest gap between the cumulative proportions at the bin
  boundaries. The boundaries are points of both empirical CDFs, so this is a lower bound of the
  exact two-sample KS statistic (close with 10–20 quantile bins) and its test is conservative.

The test of one comparison: drifted when PSI exceeds its χ² bound or KS exceeds its critical value,
each at level α/2 (so the pair stays at α). Callers pass α already divided for Bonferroni across
features. Neither bound goes below its conventional floor (PSI 0.1, KS 0.1): with a million rows
a statistically significant but tiny shift is not worth an alarm.

Pure numpy and stdlib (no scipy: the device has none): the χ² tail is computed in closed form for
integer degrees of freedom and inverted by Newton's method from the Wilson–Hilferty start. This
module knows nothing of features, references, windows or the wire form; that is
:mod:`protocol.drift`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

# Pseudo-count added to every bin with support in either sample before taking PSI's log ratios
# (Haldane–Anscombe's ½). In counts, not proportions, so smoothing weighs the same at any n: a bin
# one sample never hit (e.g. the reference's empty under/overflow bins) gets proportion
# 0.5 / (size + 0.5·k) instead of 0, which keeps PSI finite and its χ² approximation calibrated.
PSEUDO_COUNT = 0.5

PSI_FLOOR = 0.1  # Evidently's and NannyML's "some drift" threshold, valid from ~1,000 rows
KS_FLOOR = 0.1


def effective_size(n: int, m: int) -> float:
    """``n·m / (n + m)``: the size that scales a two-sample statistic (0 if either is empty)."""
    return 0.0 if n <= 0 or m <= 0 else n * m / (n + m)


def support(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mask of the bins where either count vector has a count."""
    return (np.asarray(a) + np.asarray(b)) > 0


def psi(a: np.ndarray, b: np.ndarray) -> float:
    """PSI of counts ``a`` against counts ``b`` (same bins), smoothed with :data:`PSEUDO_COUNT`."""
    a, b = _pair(a, b)
    mask = support(a, b)
    if not mask.any() or a.sum() == 0 or b.sum() == 0:
        return 0.0
    pa = a[mask] + PSEUDO_COUNT
    pb = b[mask] + PSEUDO_COUNT
    pa /= pa.sum()
    pb /= pb.sum()
    return max(0.0, float(np.sum((pa - pb) * np.log(pa / pb))))


def js_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Jensen–Shannon distance (natural log) between the proportions of counts ``a`` and ``b``."""
    a, b = _pair(a, b)
    if a.sum() == 0 or b.sum() == 0:
        return 0.0
    pa = a / a.sum()
    pb = b / b.sum()
    mid = (pa + pb) / 2
    # 0·log(0/x) = 0; where pa > 0 the midpoint is > 0 too
    with np.errstate(divide="ignore", invalid="ignore"):
        ka = np.where(pa > 0, pa * np.log(pa / mid), 0.0).sum()
        kb = np.where(pb > 0, pb * np.log(pb / mid), 0.0).sum()
    return math.sqrt(max(0.0, float(ka + kb) / 2))


def ks_binned(a: np.ndarray, b: np.ndarray) -> float:
    """Largest gap between the cumulative proportions of ``a`` and ``b`` at the bin boundaries.

    A lower bound of the exact two-sample KS statistic of the data that produced the counts.
    """
    a, b = _pair(a, b)
    if a.sum() == 0 or b.sum() == 0:
        return 0.0
    gap = np.abs(np.cumsum(a) / a.sum() - np.cumsum(b) / b.sum())
    return float(gap.max())


def chi2_sf(x: float, df: int) -> float:
    """P(χ²(df) > x), exact in closed form for integer ``df`` (the Poisson / normal-tail sums)."""
    if x <= 0:
        return 1.0
    half = x / 2
    if df % 2 == 0:
        term = total = math.exp(-half)
        for r in range(1, df // 2):
            term *= half / r
            total += term
        return min(1.0, total)
    chi = math.sqrt(x)
    term = chi
    total = 0.0
    for r in range(1, (df - 1) // 2 + 1):
        if r > 1:
            term *= x / (2 * r - 1)
        total += term
    return min(
        1.0, math.erfc(chi / math.sqrt(2)) + math.sqrt(2 / math.pi) * math.exp(-half) * total
    )


def chi2_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of χ²(df): Wilson–Hilferty refined by safeguarded Newton steps on the
    exact :func:`chi2_sf` (agrees with scipy to ~1e-9); Wilson–Hilferty alone above 300 df."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p={p}: a quantile needs 0 < p < 1")
    if df <= 0:
        return 0.0
    z = NormalDist().inv_cdf(p)
    c = 2.0 / (9.0 * df)
    x = df * max(1e-3, 1.0 - c + z * math.sqrt(c)) ** 3
    if df > 300:  # the sums get long and Wilson–Hilferty is within ~0.1% there
        return x
    target = 1.0 - p
    lo, hi = 0.0, math.inf
    log_norm = (df / 2) * math.log(2) + math.lgamma(df / 2)
    for _ in range(100):
        sf = chi2_sf(x, df)
        if sf > target:
            lo = x
        else:
            hi = x
        pdf = math.exp((df / 2 - 1) * math.log(x) - x / 2 - log_norm)
        step = (sf - target) / pdf if pdf > 0 else math.inf
        nxt = x + step
        if not lo < nxt < hi:  # Newton left the bracket: bisect (or grow) instead
            nxt = (lo + hi) / 2 if math.isfinite(hi) else 2 * x
        if abs(nxt - x) <= 1e-12 * x:
            return nxt
        x = nxt
    return x


def ks_critical(alpha: float, n: int, m: int) -> float:
    """Asymptotic two-sample KS critical value ``c(α)·sqrt((n + m) / (n·m))``."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha={alpha}: use 0 < alpha < 1")
    n_eff = effective_size(n, m)
    if n_eff == 0:
        return math.inf
    return math.sqrt(-math.log(alpha / 2) / 2) / math.sqrt(n_eff)


def psi_critical(alpha: float, k: int, n: int, m: int) -> float:
    """PSI above which H0 (same distribution over ``k`` supported bins) is rejected at ``alpha``."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha={alpha}: use 0 < alpha < 1")
    n_eff = effective_size(n, m)
    if n_eff == 0:
        return math.inf
    return chi2_quantile(1.0 - alpha, k - 1) / n_eff


@dataclass(frozen=True)
class Comparison:
    """One two-sample comparison of counts over shared bins, with the bounds it was tested at.

    ``psi``/``js``/``ks`` are ``None`` when either sample is empty (nothing to compare); ``ks`` is
    also ``None`` for unordered bins (class counts).
    """

    n: int  # size of the first sample (the window)
    m: int  # size of the second (the reference or the other cohort)
    k: int  # bins with support
    psi: float | None
    js: float | None
    ks: float | None
    psi_bound: float | None
    ks_bound: float | None
    drifted: bool


def compare(
    a: np.ndarray,
    b: np.ndarray,
    alpha: float,
    *,
    ordered: bool = True,
    psi_floor: float = PSI_FLOOR,
    ks_floor: float = KS_FLOOR,
) -> Comparison:
    """Compare counts ``a`` with counts ``b`` at level ``alpha`` (already Bonferroni-divided).

    Drifted when PSI exceeds ``max(psi_floor, χ²-bound)`` or, for ordered bins, KS exceeds
    ``max(ks_floor, critical value)``; with both tests each gets ``alpha / 2``.
    """
    a, b = _pair(a, b)
    n, m = int(a.sum()), int(b.sum())
    k = int(support(a, b).sum())
    if n == 0 or m == 0:
        return Comparison(n, m, k, None, None, None, None, None, False)
    level = alpha / 2 if ordered else alpha
    p = psi(a, b)
    p_bound = max(psi_floor, psi_critical(level, k, n, m))
    drifted = p > p_bound
    ks: float | None = None
    ks_bound: float | None = None
    if ordered:
        ks = ks_binned(a, b)
        ks_bound = max(ks_floor, ks_critical(level, n, m))
        drifted = drifted or ks > ks_bound
    return Comparison(n, m, k, p, js_distance(a, b), ks, p_bound, ks_bound, drifted)


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"count vectors of shapes {a.shape} and {b.shape} do not share bins; "
            "compare counts made with the same bin edges"
        )
    return a, b
