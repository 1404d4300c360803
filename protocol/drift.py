"""Drift summaries: a window's binned counts, their scores and verdict, and their wire form.

A device never sends raw inputs. Per window it sends, for each input feature, the counts in the
reference profile's bins (the binning rule of :mod:`protocol.reference`, under- and overflow
included), the sum and sum of squares and the missing count (NaN/inf) of the values, the
predicted-class counts, and the scores of all that against the reference profile.

* :class:`WindowCounts` holds the counts (additive): :func:`merge` sums counts made with the same
  reference profile, exactly, so the fleet merges devices, cohorts and time and scores the sum.
* :func:`score` compares counts with the reference profile, or with other counts (a canary cohort
  against a control cohort: two samples), per feature and for the output, and gives a verdict
  (the method is in :mod:`protocol.drift_stats`): a feature is drifted when its PSI exceeds a χ²
  bound or its binned KS a critical value, both at α / features (Bonferroni), neither below 0.1;
  the dataset is drifted when at least half its features are (Evidently's default).
* :class:`DriftSummary` is counts plus scores, the body of the ``telemetry/drift`` topic;
  ``to_dict``/``from_dict`` give its JSON object form, and ``from_dict`` raises
  :class:`~protocol.errors.DriftError` and nothing else on any malformed input.

Pure: numpy and stdlib only; window times are passed in. Accumulating counts from live traffic is
:mod:`agent.drift`; :func:`count_rows` here is the plain, unoptimised way (tests, simulators).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocol.drift_stats import KS_FLOOR, PSI_FLOOR, Comparison, compare
from protocol.errors import DriftError, DriftIncompatibleError
from protocol.reference import ReferenceProfile, bin_index

FORMAT = "edgefleet-drift/1"
METHOD = "psi-chi2+ks-binned/bonferroni"
MAX_FEATURES = 4096
MAX_BINS = 1024  # per feature; the reference builder makes 12-22
MAX_CLASSES = 65536
MAX_COUNT = 2**53  # counts stay exact in a float64 and in JSON readers that use doubles
MAX_NAME = 256
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class DriftThresholds:
    """The verdict's knobs: family-wise α, the floors of the bounds, the dataset share."""

    alpha: float = 0.05
    psi_floor: float = PSI_FLOOR
    ks_floor: float = KS_FLOOR
    dataset_share: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise DriftError(f"alpha={self.alpha}: use a level between 0 and 1, e.g. 0.05")
        if not (self.psi_floor >= 0 and self.ks_floor >= 0):
            raise DriftError("psi_floor and ks_floor must be >= 0 (defaults 0.1)")
        if not 0.0 < self.dataset_share <= 1.0:
            raise DriftError(f"dataset_share={self.dataset_share}: use a share in (0, 1]")


@dataclass(frozen=True)
class FeatureCounts:
    """One feature's part of a window (a read-only view for callers; :class:`WindowCounts`
    stores all features in flat arrays)."""

    name: str
    counts: tuple[int, ...]  # per bin, under- and overflow included; finite values only
    sum: float
    sumsq: float
    missing: int  # NaN or +-inf

    @property
    def out_of_range(self) -> int:
        return self.counts[0] + self.counts[-1]


@dataclass(frozen=True, eq=False)
class WindowCounts:
    """Additive counts of one window (or a merge of windows) against one reference profile.

    ``counts`` is flat, feature after feature (``bins[j]`` entries for feature ``j``); the arrays
    are copied and made read-only, so the value is immutable. Invariants (checked): per feature,
    counts plus missing equal ``n``; the class counts sum to ``n``.
    """

    model_name: str
    model_version: int
    reference_sha256: str
    start: float
    end: float
    n: int
    feature_names: tuple[str, ...]
    bins: tuple[int, ...]
    counts: np.ndarray  # int64 [sum(bins)]
    sums: np.ndarray  # float64 [features]
    sumsqs: np.ndarray  # float64 [features]
    missing: np.ndarray  # int64 [features]
    class_counts: np.ndarray  # int64 [classes]
    offsets: np.ndarray = field(init=False, repr=False)  # start of each feature in counts
    _layout: tuple[object, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        f = len(self.feature_names)
        _check_meta(self.model_name, self.model_version, self.reference_sha256)
        if not (math.isfinite(self.start) and math.isfinite(self.end) and self.start <= self.end):
            raise DriftError(f"window [{self.start}, {self.end}] must be finite with start <= end")
        if not 0 <= self.n <= MAX_COUNT:
            raise DriftError(f"n={self.n} must be between 0 and 2**53")
        if not 1 <= f <= MAX_FEATURES or len(self.bins) != f:
            raise DriftError(f"{f} feature names for {len(self.bins)} bin counts (1 to 4096)")
        if any(not 3 <= b <= MAX_BINS for b in self.bins):
            raise DriftError("every feature needs 3 to 1024 bins (>= 2 edges, plus under/over)")
        arrays = {
            "counts": (np.int64, sum(self.bins)),
            "sums": (np.float64, f),
            "sumsqs": (np.float64, f),
            "missing": (np.int64, f),
            "class_counts": (np.int64, None),
        }
        for name, (dtype, size) in arrays.items():
            arr = np.array(getattr(self, name), dtype=dtype)  # a private copy
            if arr.ndim != 1 or (size is not None and arr.size != size):
                raise DriftError(f"{name} has shape {arr.shape}, expected [{size}]")
            arr.flags.writeable = False
            object.__setattr__(self, name, arr)
        offsets = np.zeros(f, dtype=np.int64)
        np.cumsum(self.bins[:-1], out=offsets[1:])
        offsets.flags.writeable = False
        object.__setattr__(self, "offsets", offsets)
        layout = (
            self.model_name,
            self.model_version,
            self.reference_sha256,
            self.feature_names,
            self.bins,
            self.class_counts.size,
        )
        object.__setattr__(self, "_layout", layout)
        if not 1 <= self.class_counts.size <= MAX_CLASSES:
            raise DriftError(f"{self.class_counts.size} output classes (1 to 65536)")
        if (self.counts < 0).any() or (self.missing < 0).any() or (self.class_counts < 0).any():
            raise DriftError("counts must be >= 0")
        if not (np.isfinite(self.sums).all() and np.isfinite(self.sumsqs).all()):
            raise DriftError("sums and sums of squares must be finite")
        per_feature = np.add.reduceat(self.counts, offsets) + self.missing
        if (per_feature != self.n).any():
            j = int(np.argmax(per_feature != self.n))
            raise DriftError(
                f"feature {self.feature_names[j]!r}: {int(per_feature[j])} values (binned plus "
                f"missing) in a window of n={self.n}; every row has one value per feature"
            )
        if int(self.class_counts.sum()) != self.n:
            raise DriftError(
                f"class counts sum to {int(self.class_counts.sum())}, expected n={self.n} "
                "(one predicted class per row)"
            )

    def feature_counts(self, j: int) -> np.ndarray:
        """Bin counts of feature ``j`` (a read-only view)."""
        return self.counts[self.offsets[j] : self.offsets[j] + self.bins[j]]

    def feature(self, j: int) -> FeatureCounts:
        return FeatureCounts(
            name=self.feature_names[j],
            counts=tuple(int(c) for c in self.feature_counts(j)),
            sum=float(self.sums[j]),
            sumsq=float(self.sumsqs[j]),
            missing=int(self.missing[j]),
        )

    @property
    def features(self) -> tuple[FeatureCounts, ...]:
        return tuple(self.feature(j) for j in range(len(self.feature_names)))

    def layout(self) -> tuple[object, ...]:
        """What must be equal for two counts to merge: model, version, reference, bins."""
        return self._layout

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WindowCounts):
            return NotImplemented
        return (
            self.layout() == other.layout()
            and (self.start, self.end, self.n) == (other.start, other.end, other.n)
            and all(
                np.array_equal(getattr(self, a), getattr(other, a))
                for a in ("counts", "sums", "sumsqs", "missing", "class_counts")
            )
        )

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        """The counts' JSON object form (a summary's dict without ``scores``)."""
        from protocol import drift_wire  # imported here: drift_wire imports this module

        return drift_wire.counts_to_dict(self)

    @classmethod
    def from_dict(cls, doc: Any) -> WindowCounts:
        """Parse the counts part of a summary's dict; raises :class:`DriftError` only."""
        from protocol import drift_wire

        return drift_wire.counts_from_dict(doc)


@dataclass(frozen=True)
class FeatureDrift:
    name: str
    test: Comparison  # window against the baseline, at level alpha / features
    missing_rate: float  # missing / n
    out_of_range_rate: float  # (under- plus overflow) / n

    @property
    def drifted(self) -> bool:
        return self.test.drifted


@dataclass(frozen=True)
class DriftVerdict:
    drifted: bool  # at least dataset_share of the features are drifted
    drifted_features: tuple[str, ...]
    share: float
    output_drifted: bool
    thresholds: DriftThresholds
    feature_alpha: float  # alpha / features: the Bonferroni level each feature is tested at
    baseline: str  # "reference" (the profile) or "sample" (other counts)
    method: str = METHOD


@dataclass(frozen=True)
class DriftScores:
    features: tuple[FeatureDrift, ...]
    output: Comparison  # class counts, unordered (no KS), at level alpha
    verdict: DriftVerdict


@dataclass(frozen=True)
class DriftSummary:
    """Body of ``telemetry/drift``: one window's counts and their scores."""

    counts: WindowCounts
    scores: DriftScores

    def __post_init__(self) -> None:
        names = tuple(f.name for f in self.scores.features)
        if names != self.counts.feature_names:
            raise DriftError("scores name other features than the counts; rescore the counts")

    @property
    def verdict(self) -> DriftVerdict:
        return self.scores.verdict

    def to_dict(self) -> dict[str, Any]:
        """The JSON object form (:mod:`protocol.drift_wire` documents it)."""
        from protocol import drift_wire  # imported here: drift_wire imports this module

        return drift_wire.summary_to_dict(self)

    @classmethod
    def from_dict(cls, doc: Any) -> DriftSummary:
        """Parse a summary's JSON object form; raises :class:`DriftError` and nothing else."""
        from protocol import drift_wire

        return drift_wire.summary_from_dict(doc)


def summarize(
    counts: WindowCounts,
    reference: ReferenceProfile,
    thresholds: DriftThresholds | None = None,
) -> DriftSummary:
    """Score ``counts`` against the reference profile they were binned with."""
    return DriftSummary(counts, score(counts, reference, thresholds))


def score(
    counts: WindowCounts,
    baseline: ReferenceProfile | WindowCounts,
    thresholds: DriftThresholds | None = None,
) -> DriftScores:
    """Scores and verdict of ``counts`` against a reference profile or against other counts.

    Against other counts both are samples (canary vs control, new model's window vs the previous
    one's); they must have been binned with the same reference profile.
    """
    t = thresholds or DriftThresholds()
    base_counts, base_classes = _baseline(counts, baseline)
    f = len(counts.feature_names)
    feature_alpha = t.alpha / f
    features = []
    for j, name in enumerate(counts.feature_names):
        window = counts.feature_counts(j)
        test = compare(
            window, base_counts[j], feature_alpha, psi_floor=t.psi_floor, ks_floor=t.ks_floor
        )
        n = counts.n
        features.append(
            FeatureDrift(
                name=name,
                test=test,
                missing_rate=float(counts.missing[j]) / n if n else 0.0,
                out_of_range_rate=float(window[0] + window[-1]) / n if n else 0.0,
            )
        )
    output = compare(
        counts.class_counts, base_classes, t.alpha, ordered=False, psi_floor=t.psi_floor
    )
    drifted = tuple(fd.name for fd in features if fd.drifted)
    share = len(drifted) / f
    verdict = DriftVerdict(
        drifted=share >= t.dataset_share,
        drifted_features=drifted,
        share=share,
        output_drifted=output.drifted,
        thresholds=t,
        feature_alpha=feature_alpha,
        baseline="reference" if isinstance(baseline, ReferenceProfile) else "sample",
    )
    return DriftScores(tuple(features), output, verdict)


def merge(items: Iterable[WindowCounts | DriftSummary]) -> WindowCounts:
    """Sum counts made with the same reference profile (devices, cohorts, successive windows).

    Exact for the counts; sums and sums of squares are float sums. The window spans the earliest
    start to the latest end. Refuses an empty input and counts of another model, version,
    reference profile or bin layout with :class:`DriftIncompatibleError`.
    """
    windows = [i.counts if isinstance(i, DriftSummary) else i for i in items]
    if not windows:
        raise DriftError("nothing to merge: pass at least one window's counts")
    first = windows[0]
    layout = first.layout()
    for w in windows:
        if w.layout() != layout:
            raise DriftIncompatibleError(_mismatch("merge", first, w))
    if len(windows) == 1:
        return first
    return WindowCounts(
        model_name=first.model_name,
        model_version=first.model_version,
        reference_sha256=first.reference_sha256,
        start=min(w.start for w in windows),
        end=max(w.end for w in windows),
        n=sum(w.n for w in windows),
        feature_names=first.feature_names,
        bins=first.bins,
        counts=_sum_rows([w.counts for w in windows]),
        sums=_sum_rows([w.sums for w in windows]),
        sumsqs=_sum_rows([w.sumsqs for w in windows]),
        missing=_sum_rows([w.missing for w in windows]),
        class_counts=_sum_rows([w.class_counts for w in windows]),
    )


def _sum_rows(arrays: list[np.ndarray]) -> np.ndarray:
    # one copy into a [windows, size] block and one reduction: far faster than np.sum(list)
    return np.concatenate(arrays).reshape(len(arrays), -1).sum(axis=0)


def count_rows(
    reference: ReferenceProfile,
    inputs: np.ndarray,
    predicted: np.ndarray,
    *,
    start: float,
    end: float,
    model_name: str,
    model_version: int,
    reference_sha256: str,
) -> WindowCounts:
    """Counts of ``inputs`` [n, features] and predicted class ids [n], plainly (one feature at a
    time); the reference implementation :class:`agent.drift.DriftAccumulator` must agree with."""
    x = np.asarray(inputs, dtype=np.float64)
    pred = np.asarray(predicted)
    f = reference.n_features
    if x.ndim != 2 or x.shape[1] != f:
        raise DriftError(f"inputs have shape {x.shape}, expected [n, {f}] for the reference")
    check_predicted(pred, x.shape[0], len(reference.classes))
    counts, sums, sumsqs, missing = [], [], [], []
    for j, feature in enumerate(reference.features):
        col = x[:, j]
        finite = np.isfinite(col)
        good = col[finite]
        edges = np.asarray(feature.edges, dtype=np.float64)
        counts.append(np.bincount(bin_index(edges, good), minlength=len(edges) + 1))
        sums.append(float(good.sum()))
        sumsqs.append(float(np.square(good).sum()))
        missing.append(int((~finite).sum()))
    return WindowCounts(
        model_name=model_name,
        model_version=model_version,
        reference_sha256=reference_sha256,
        start=start,
        end=end,
        n=int(x.shape[0]),
        feature_names=tuple(ft.name for ft in reference.features),
        bins=tuple(len(ft.edges) + 1 for ft in reference.features),
        counts=np.concatenate(counts),
        sums=np.asarray(sums),
        sumsqs=np.asarray(sumsqs),
        missing=np.asarray(missing),
        class_counts=np.bincount(pred.astype(np.int64), minlength=len(reference.classes)),
    )


def check_predicted(pred: np.ndarray, n: int, n_classes: int) -> None:
    """Refuse predicted class ids that are not integers in ``[0, n_classes)``, one per row."""
    if pred.shape != (n,):
        raise DriftError(f"predicted has shape {pred.shape}, expected [{n}] (one id per row)")
    if n == 0:
        return
    if pred.dtype.kind not in "iu":
        raise DriftError(f"predicted class ids must be integers, got {pred.dtype}")
    if n <= 64:  # the agent's hot path: Python's min/max beat numpy's on a few values
        ids = pred.tolist()
        lo, hi = min(ids), max(ids)
    else:
        lo, hi = int(pred.min()), int(pred.max())
    if lo < 0 or hi >= n_classes:
        raise DriftError(
            f"predicted class ids span [{lo}, {hi}] but the reference profile has {n_classes} "
            "classes; the model's output does not match its profile"
        )


def _baseline(
    counts: WindowCounts, baseline: ReferenceProfile | WindowCounts
) -> tuple[list[np.ndarray], np.ndarray]:
    if isinstance(baseline, WindowCounts):
        if (baseline.reference_sha256, baseline.feature_names, baseline.bins) != (
            counts.reference_sha256,
            counts.feature_names,
            counts.bins,
        ) or baseline.class_counts.size != counts.class_counts.size:
            raise DriftIncompatibleError(_mismatch("compare", counts, baseline))
        return (
            [baseline.feature_counts(j) for j in range(len(baseline.bins))],
            baseline.class_counts,
        )
    names = tuple(ft.name for ft in baseline.features)
    bins = tuple(len(ft.edges) + 1 for ft in baseline.features)
    if names != counts.feature_names or bins != counts.bins:
        raise DriftIncompatibleError(
            f"counts of features {_short(counts.feature_names)} with bins {_short(counts.bins)} "
            f"were not made with this reference profile (features {_short(names)}, bins "
            f"{_short(bins)}); score counts against the profile of the model that produced them"
        )
    if len(baseline.classes) != counts.class_counts.size:
        raise DriftIncompatibleError(
            f"counts have {counts.class_counts.size} output classes, the reference profile "
            f"{len(baseline.classes)}; score counts against the profile of their model"
        )
    return [np.asarray(ft.counts) for ft in baseline.features], np.asarray(baseline.class_counts)


def _mismatch(what: str, a: WindowCounts, b: WindowCounts) -> str:
    names = ("model name", "model version", "reference sha256", "features", "bins", "classes")
    diffs = [
        f"{name} {_short(x)} vs {_short(y)}"
        for name, x, y in zip(names, a.layout(), b.layout(), strict=True)
        if x != y
    ]
    return (
        f"cannot {what} counts of different layouts ({'; '.join(diffs)}); only counts binned "
        "with the same reference profile (same model release) can be merged or compared: "
        "compare each against its own reference instead"
    )


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_meta(model_name: str, model_version: int, reference_sha256: str) -> None:
    if not isinstance(model_name, str) or not 1 <= len(model_name) <= MAX_NAME:
        raise DriftError("model_name must be a non-empty string of at most 256 characters")
    if isinstance(model_version, bool) or not isinstance(model_version, int | np.integer):
        raise DriftError(f"model_version must be an integer, got {model_version!r}")
    if not 0 <= model_version < 2**63:
        raise DriftError(f"model_version={model_version} must be between 0 and 2**63 - 1")
    if not isinstance(reference_sha256, str) or not _SHA256.fullmatch(reference_sha256):
        raise DriftError(
            "reference_sha256 must be the 64 lowercase hex digits of the reference profile's "
            "sha256 (as listed in the bundle)"
        )
