"""The JSON object form of drift summaries (the body of ``telemetry/drift``).

Example (one feature, shortened)::

    {"format": "edgefleet-drift/1",
     "model": {"name": "vibration", "version": 3},
     "reference_sha256": "9f2c...e1",
     "window": {"start": 1718000000.0, "end": 1718000300.0},
     "n": 1200,
     "features": [{"name": "rms", "counts": [0, 118, 122, ..., 121, 3], "sum": 603.2,
                   "sumsq": 1490.7, "missing": 2, "out_of_range": 3}],
     "output": {"counts": [1010, 190]},
     "scores": {
       "features": [{"name": "rms", "n": 1198, "m": 10000, "k": 11, "psi": 0.012, "js": 0.05,
                     "ks": 0.021, "psi_bound": 0.1, "ks_bound": 0.1, "drifted": false,
                     "missing_rate": 0.0017, "out_of_range_rate": 0.0025}],
       "output": {"n": 1200, "m": 10000, "k": 2, "psi": 0.004, "js": 0.03, "ks": null,
                  "psi_bound": 0.1, "ks_bound": null, "drifted": false},
       "verdict": {"drifted": false, "drifted_features": [], "share": 0.0,
                   "output_drifted": false, "alpha": 0.05, "psi_floor": 0.1, "ks_floor": 0.1,
                   "dataset_share": 0.5, "feature_alpha": 0.05, "baseline": "reference",
                   "method": "psi-chi2+ks-binned/bonferroni"}}}

``counts`` are per bin of the reference profile (underflow first, overflow last) over the finite
values; ``missing`` counts NaN and +-inf; ``out_of_range`` repeats under- plus overflow for
readers. Parsing is strict: every field is required, unknown fields are refused, numbers are
range-checked, and the counts' invariants (per feature, counts plus missing equal ``n``; class
counts sum to ``n``) hold, so anything malformed raises :class:`~protocol.errors.DriftError` and
nothing else. ``WindowCounts.from_dict`` reads the same object with ``scores`` optional.

Pure: dicts in, values out (no JSON text, no I/O).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from protocol.drift import (
    FORMAT,
    MAX_BINS,
    MAX_CLASSES,
    MAX_COUNT,
    MAX_FEATURES,
    MAX_NAME,
    DriftScores,
    DriftSummary,
    DriftThresholds,
    DriftVerdict,
    FeatureDrift,
    WindowCounts,
)
from protocol.drift_stats import Comparison
from protocol.errors import DriftError


def counts_from_dict(doc: Any) -> WindowCounts:
    """Parse counts (a summary's dict, ``scores`` optional); raises :class:`DriftError` only."""
    result: WindowCounts = _guarded(_parse_counts, doc)
    return result


def summary_from_dict(doc: Any) -> DriftSummary:
    """Parse a summary; raises :class:`DriftError` and nothing else."""
    result: DriftSummary = _guarded(_parse_summary, doc)
    return result


def summary_to_dict(s: DriftSummary) -> dict[str, Any]:
    return {**counts_to_dict(s.counts), "scores": _scores_to_dict(s.scores)}


def _comparison_to_dict(c: Comparison) -> dict[str, Any]:
    return {
        "n": c.n,
        "m": c.m,
        "k": c.k,
        "psi": c.psi,
        "js": c.js,
        "ks": c.ks,
        "psi_bound": c.psi_bound,
        "ks_bound": c.ks_bound,
        "drifted": c.drifted,
    }


def counts_to_dict(c: WindowCounts) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "model": {"name": c.model_name, "version": int(c.model_version)},
        "reference_sha256": c.reference_sha256,
        "window": {"start": float(c.start), "end": float(c.end)},
        "n": int(c.n),
        "features": [
            {
                "name": f.name,
                "counts": list(f.counts),
                "sum": f.sum,
                "sumsq": f.sumsq,
                "missing": f.missing,
                "out_of_range": f.out_of_range,
            }
            for f in c.features
        ],
        "output": {"counts": [int(x) for x in c.class_counts]},
    }


def _scores_to_dict(s: DriftScores) -> dict[str, Any]:
    v = s.verdict
    return {
        "features": [
            {
                "name": f.name,
                **_comparison_to_dict(f.test),
                "missing_rate": f.missing_rate,
                "out_of_range_rate": f.out_of_range_rate,
            }
            for f in s.features
        ],
        "output": _comparison_to_dict(s.output),
        "verdict": {
            "drifted": v.drifted,
            "drifted_features": list(v.drifted_features),
            "share": v.share,
            "output_drifted": v.output_drifted,
            "alpha": v.thresholds.alpha,
            "psi_floor": v.thresholds.psi_floor,
            "ks_floor": v.thresholds.ks_floor,
            "dataset_share": v.thresholds.dataset_share,
            "feature_alpha": v.feature_alpha,
            "baseline": v.baseline,
            "method": v.method,
        },
    }


def _guarded(parse: Any, doc: Any) -> Any:
    try:
        return parse(doc)
    except DriftError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        # the explicit checks below should leave nothing for this net; it keeps the promise that
        # a malformed summary raises DriftError only
        raise DriftError(f"drift summary is malformed ({type(exc).__name__}: {exc})") from None


def _parse_counts(doc: Any) -> WindowCounts:
    d = _obj(
        doc,
        "summary",
        ("format", "model", "reference_sha256", "window", "n", "features", "output"),
        optional=("scores",),
    )
    if d["format"] != FORMAT:
        raise DriftError(
            f"summary.format is {_short(d['format'])}, expected {FORMAT!r}; "
            "upgrade the agent or the fleet so both speak the same drift format"
        )
    model = _obj(d["model"], "summary.model", ("name", "version"))
    window = _obj(d["window"], "summary.window", ("start", "end"))
    features = _list(d["features"], "summary.features", MAX_FEATURES)
    names, bins, counts, sums, sumsqs, missing = [], [], [], [], [], []
    for j, item in enumerate(features):
        where = f"summary.features[{j}]"
        f = _obj(item, where, ("name", "counts", "sum", "sumsq", "missing", "out_of_range"))
        names.append(_str(f["name"], f"{where}.name"))
        c = _ints(f["counts"], f"{where}.counts", MAX_BINS)
        if len(c) < 3:
            raise DriftError(f"{where}.counts has {len(c)} bins; expected at least 3")
        if _int(f["out_of_range"], f"{where}.out_of_range") != c[0] + c[-1]:
            raise DriftError(f"{where}.out_of_range is not the under- plus overflow count")
        bins.append(len(c))
        counts.extend(c)
        sums.append(_num(f["sum"], f"{where}.sum"))
        sumsqs.append(_num(f["sumsq"], f"{where}.sumsq"))
        missing.append(_int(f["missing"], f"{where}.missing"))
    output = _obj(d["output"], "summary.output", ("counts",))
    classes = _ints(output["counts"], "summary.output.counts", MAX_CLASSES)
    return WindowCounts(
        model_name=_str(model["name"], "summary.model.name"),
        model_version=_int(model["version"], "summary.model.version", hi=2**63 - 1),
        reference_sha256=_str(d["reference_sha256"], "summary.reference_sha256"),
        start=_num(window["start"], "summary.window.start"),
        end=_num(window["end"], "summary.window.end"),
        n=_int(d["n"], "summary.n"),
        feature_names=tuple(names),
        bins=tuple(bins),
        counts=np.asarray(counts, dtype=np.int64),
        sums=np.asarray(sums, dtype=np.float64),
        sumsqs=np.asarray(sumsqs, dtype=np.float64),
        missing=np.asarray(missing, dtype=np.int64),
        class_counts=np.asarray(classes, dtype=np.int64),
    )


_COMPARISON_KEYS = ("n", "m", "k", "psi", "js", "ks", "psi_bound", "ks_bound", "drifted")


def _comparison_from_dict(doc: Any, where: str) -> Comparison:
    d = _obj(doc, where, _COMPARISON_KEYS)
    return Comparison(
        n=_int(d["n"], f"{where}.n"),
        m=_int(d["m"], f"{where}.m"),
        k=_int(d["k"], f"{where}.k"),
        **{
            key: _opt_num(d[key], f"{where}.{key}")
            for key in ("psi", "js", "ks", "psi_bound", "ks_bound")
        },
        drifted=_bool(d["drifted"], f"{where}.drifted"),
    )


def _parse_summary(doc: Any) -> DriftSummary:
    counts = _parse_counts(doc)  # also checks that doc is an object with known fields
    if "scores" not in doc:
        raise DriftError("summary lacks scores; send a DriftSummary, not bare WindowCounts")
    s = _obj(doc["scores"], "summary.scores", ("features", "output", "verdict"))
    items = _list(s["features"], "summary.scores.features", MAX_FEATURES)
    features = []
    for j, item in enumerate(items):
        where = f"summary.scores.features[{j}]"
        d = _obj(item, where, ("name", *_COMPARISON_KEYS, "missing_rate", "out_of_range_rate"))
        features.append(
            FeatureDrift(
                name=_str(d["name"], f"{where}.name"),
                test=_comparison_from_dict({k: d[k] for k in _COMPARISON_KEYS}, where),
                missing_rate=_num(d["missing_rate"], f"{where}.missing_rate", lo=0.0, hi=1.0),
                out_of_range_rate=_num(
                    d["out_of_range_rate"], f"{where}.out_of_range_rate", lo=0.0, hi=1.0
                ),
            )
        )
    v = _obj(
        s["verdict"],
        "summary.scores.verdict",
        (
            "drifted",
            "drifted_features",
            "share",
            "output_drifted",
            "alpha",
            "psi_floor",
            "ks_floor",
            "dataset_share",
            "feature_alpha",
            "baseline",
            "method",
        ),
    )
    where = "summary.scores.verdict"
    drifted_features = tuple(
        _str(x, f"{where}.drifted_features[{i}]")
        for i, x in enumerate(
            _list(v["drifted_features"], f"{where}.drifted_features", MAX_FEATURES)
        )
    )
    if not set(drifted_features) <= set(counts.feature_names):
        raise DriftError(f"{where}.drifted_features names features the summary does not have")
    baseline = _str(v["baseline"], f"{where}.baseline")
    if baseline not in ("reference", "sample"):
        raise DriftError(f"{where}.baseline must be 'reference' or 'sample'")
    thresholds = DriftThresholds(
        alpha=_num(v["alpha"], f"{where}.alpha"),
        psi_floor=_num(v["psi_floor"], f"{where}.psi_floor"),
        ks_floor=_num(v["ks_floor"], f"{where}.ks_floor"),
        dataset_share=_num(v["dataset_share"], f"{where}.dataset_share"),
    )
    verdict = DriftVerdict(
        drifted=_bool(v["drifted"], f"{where}.drifted"),
        drifted_features=drifted_features,
        share=_num(v["share"], f"{where}.share", lo=0.0, hi=1.0),
        output_drifted=_bool(v["output_drifted"], f"{where}.output_drifted"),
        thresholds=thresholds,
        feature_alpha=_num(v["feature_alpha"], f"{where}.feature_alpha", lo=0.0, hi=1.0),
        baseline=baseline,
        method=_str(v["method"], f"{where}.method"),
    )
    output = _comparison_from_dict(s["output"], "summary.scores.output")
    return DriftSummary(counts, DriftScores(tuple(features), output, verdict))


def _obj(
    doc: Any, where: str, keys: tuple[str, ...], optional: tuple[str, ...] = ()
) -> Mapping[str, Any]:
    if not isinstance(doc, Mapping):
        raise DriftError(f"{where} must be a JSON object, got {_kind(doc)}")
    missing = [k for k in keys if k not in doc]
    if missing:
        raise DriftError(f"{where} lacks {', '.join(missing)}")
    unknown = [k for k in doc if k not in keys and k not in optional]
    if unknown:
        raise DriftError(f"{where} has unknown fields {_short(unknown)}; check the format version")
    return doc


def _list(value: Any, where: str, max_len: int) -> list[Any]:
    if not isinstance(value, list):
        raise DriftError(f"{where} must be a JSON array, got {_kind(value)}")
    if len(value) > max_len:
        raise DriftError(f"{where} has {len(value)} items, at most {max_len} allowed")
    return value


def _ints(value: Any, where: str, max_len: int) -> list[int]:
    items = _list(value, where, max_len)
    # the common case in one pass; a bad item is then found and named by _int
    if not all(type(x) is int for x in items) or (
        items and not 0 <= min(items) <= max(items) <= MAX_COUNT
    ):
        for i, x in enumerate(items):
            _int(x, f"{where}[{i}]")
    return items


def _int(value: Any, where: str, hi: int = MAX_COUNT) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DriftError(f"{where} must be an integer, got {_kind(value)}")
    if not 0 <= value <= hi:
        raise DriftError(f"{where} must be between 0 and {hi}, got {_short(value)}")
    return value


def _num(value: Any, where: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DriftError(f"{where} must be a number, got {_kind(value)}")
    try:
        x = float(value)
    except OverflowError:
        raise DriftError(f"{where} is too large") from None
    if not (math.isfinite(x) and lo <= x <= hi):
        raise DriftError(f"{where} must be a finite number in [{lo}, {hi}], got {_short(value)}")
    return x


def _opt_num(value: Any, where: str) -> float | None:
    if value is None:
        return None
    return _num(value, where, lo=0.0)


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise DriftError(f"{where} must be true or false, got {_kind(value)}")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_NAME:
        raise DriftError(f"{where} must be a non-empty string of at most {MAX_NAME} characters")
    return value


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
