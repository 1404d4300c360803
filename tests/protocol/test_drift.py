"""Drift statistics, verdicts, merging and the summary wire form (protocol.drift*).

scipy serves only as an oracle here (exact χ² quantiles, exact KS, JS distance); the code under
test has none.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import special, stats
from scipy.spatial.distance import jensenshannon

from protocol.drift import (
    DriftSummary,
    DriftThresholds,
    WindowCounts,
    count_rows,
    merge,
    score,
    summarize,
)
from protocol.drift_stats import (
    chi2_quantile,
    chi2_sf,
    compare,
    js_distance,
    ks_binned,
    ks_critical,
    psi,
    psi_critical,
)
from protocol.errors import DriftError, DriftIncompatibleError, ProtocolError
from protocol.reference import FeatureReference, ReferenceProfile, build_reference_profile

SHA = "ab" * 32
OTHER_SHA = "cd" * 32
CLASSES = ["low", "high"]


def _reference(features: int, rows: int = 10_000, seed: int = 1) -> ReferenceProfile:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features))
    return build_reference_profile(
        x, (x[:, 0] > 0.8).astype(np.int64), [f"f{j}" for j in range(features)], CLASSES
    )


REF3 = _reference(3)
REF10 = _reference(10)


def _counts(
    reference: ReferenceProfile,
    x: np.ndarray,
    predicted: np.ndarray | None = None,
    start: float = 0.0,
    end: float = 60.0,
    sha: str = SHA,
    version: int = 1,
) -> WindowCounts:
    if predicted is None:
        predicted = (np.nan_to_num(x[:, 0]) > 0.8).astype(np.int64)
    return count_rows(
        reference,
        x,
        predicted,
        start=start,
        end=end,
        model_name="vibration",
        model_version=version,
        reference_sha256=sha,
    )


def _window(reference: ReferenceProfile, n: int, seed: int, shift: dict[int, float] | None = None):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, reference.n_features)).astype(np.float32)
    for j, d in (shift or {}).items():
        x[:, j] += d
    return _counts(reference, x)


# --- statistics against the scipy oracle ---------------------------------------------------------


@pytest.mark.parametrize("df", [1, 2, 3, 5, 9, 10, 19, 21, 50, 120, 299, 301, 1000])
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.95, 0.99, 0.999, 0.99999, 1 - 1e-8])
def test_chi2_quantile_matches_scipy(df: int, p: float) -> None:
    tol = 1e-9 if df <= 300 else 1e-3  # Wilson-Hilferty alone above 300 df
    assert chi2_quantile(p, df) == pytest.approx(stats.chi2.ppf(p, df), rel=tol)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 9, 10, 57, 300])
@pytest.mark.parametrize("x", [1e-6, 0.5, 3.0, 9.0, 40.0, 400.0])
def test_chi2_sf_matches_scipy(df: int, x: float) -> None:
    assert chi2_sf(x, df) == pytest.approx(stats.chi2.sf(x, df), rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("alpha", [0.1, 0.05, 0.01, 0.001, 1e-5])
def test_ks_critical_is_the_kolmogorov_quantile(alpha: float) -> None:
    n, m = 300, 2000
    expected = special.kolmogi(alpha) * math.sqrt((n + m) / (n * m))
    assert ks_critical(alpha, n, m) == pytest.approx(expected, rel=1e-3)


count_vectors = st.lists(st.integers(0, 500), min_size=3, max_size=22)


@given(data=st.data(), a=count_vectors)
def test_js_distance_matches_scipy(data: st.DataObject, a: list[int]) -> None:
    b = data.draw(st.lists(st.integers(0, 500), min_size=len(a), max_size=len(a)))
    if sum(a) == 0 or sum(b) == 0:
        assert js_distance(np.array(a), np.array(b)) == 0.0
        return
    assert js_distance(np.array(a), np.array(b)) == pytest.approx(
        jensenshannon(np.array(a, float), np.array(b, float)), abs=1e-9
    )


@pytest.mark.parametrize("seed", range(20))
def test_binned_ks_is_a_close_lower_bound_of_the_exact_statistic(seed: int) -> None:
    rng = np.random.default_rng(seed)
    edges = np.array(REF3.features[0].edges)
    a = rng.normal(size=int(rng.integers(50, 3000)))
    b = rng.normal(
        loc=rng.uniform(-1, 1), scale=rng.uniform(0.5, 2), size=int(rng.integers(50, 3000))
    )
    from protocol.reference import bin_index

    ca = np.bincount(bin_index(edges, a), minlength=len(edges) + 1)
    cb = np.bincount(bin_index(edges, b), minlength=len(edges) + 1)
    exact = stats.ks_2samp(a, b).statistic
    assert ks_binned(ca, cb) <= exact + 1e-12
    assert ks_binned(ca, cb) >= exact - 0.1  # ten quantile bins: at most ~one bin's mass off


def test_psi_by_hand() -> None:
    a = np.array([0, 30, 70, 0])
    b = np.array([0, 50, 50, 0])
    # supported bins: the middle two; each count + 0.5, then normalised
    pa = np.array([30.5, 70.5]) / 101
    pb = np.array([50.5, 50.5]) / 101
    assert psi(a, b) == pytest.approx(float(np.sum((pa - pb) * np.log(pa / pb))))


def test_psi_stays_finite_when_one_sample_has_an_empty_bin() -> None:
    reference = np.array([0, 5000, 5000, 0])  # a profile's under/overflow bins are empty
    one_stray = np.array([1, 500, 499, 0])  # one value under the reference's minimum
    assert 0 < psi(one_stray, reference) < 0.02
    assert not compare(one_stray, reference, 0.05).drifted
    many = np.array([5, 100, 100, 0])  # 2.4% of the values: a real change
    assert 0.1 < psi(many, reference) < 1


@given(a=count_vectors)
def test_identical_counts_have_zero_drift(a: list[int]) -> None:
    c = np.array(a)
    assert psi(c, c) == 0.0
    assert js_distance(c, c) == 0.0
    assert ks_binned(c, c) == 0.0
    assert not compare(c, c, 0.05).drifted


def test_a_window_scored_against_itself_has_zero_drift() -> None:
    c = _window(REF10, 300, seed=9, shift={0: 2.0})
    scores = score(c, c)
    assert all((f.test.psi, f.test.js, f.test.ks) == (0.0, 0.0, 0.0) for f in scores.features)
    assert scores.output.psi == 0.0 and scores.verdict.drifted_features == ()


@given(a=count_vectors, k=st.integers(2, 50))
def test_proportional_counts_have_no_drift(a: list[int], k: int) -> None:
    c = np.array(a)
    assert js_distance(c, k * c) == pytest.approx(0.0, abs=1e-7)
    assert ks_binned(c, k * c) == pytest.approx(0.0, abs=1e-12)
    assert not compare(c, k * c, 0.05).drifted


@given(data=st.data(), a=count_vectors)
def test_scores_are_symmetric_and_in_range(data: st.DataObject, a: list[int]) -> None:
    b = data.draw(st.lists(st.integers(0, 500), min_size=len(a), max_size=len(a)))
    ca, cb = np.array(a), np.array(b)
    assert psi(ca, cb) == pytest.approx(psi(cb, ca), rel=1e-9, abs=1e-15)
    assert 0 <= js_distance(ca, cb) <= math.sqrt(math.log(2)) + 1e-12
    assert 0 <= ks_binned(ca, cb) <= 1


def test_bounds_shrink_with_sample_size_but_not_below_the_floor() -> None:
    a = np.full(10, 10)
    bounds = [compare(a * n, a * 1000, 0.05 / 32).psi_bound for n in (1, 2, 100, 10_000)]
    assert bounds[0] > bounds[1] > 0.1  # 100 and 200 rows: the chi-squared bound
    assert bounds[2] == bounds[3] == 0.1  # 1,000 rows and more: the conventional floor
    # a cohort against a cohort of the same size: both are samples, so the bound is wider
    assert psi_critical(0.01, 10, 500, 500) > psi_critical(0.01, 10, 500, 10**9)


def test_empty_samples_compare_to_nothing() -> None:
    result = compare(np.zeros(5), np.array([1, 2, 3, 4, 5]), 0.05)
    assert (result.psi, result.js, result.ks, result.drifted) == (None, None, None, False)


# --- verdicts on known distributions -----------------------------------------------------------


@pytest.mark.parametrize("n", [1000, 5000])
@pytest.mark.parametrize("seed", range(5))
def test_no_shift_no_alarm(n: int, seed: int) -> None:
    scores = score(_window(REF10, n, seed=100 + seed), REF10)
    assert scores.verdict.drifted_features == ()
    assert not scores.verdict.drifted and not scores.verdict.output_drifted


@pytest.mark.parametrize("seed", range(5))
def test_half_sigma_shift_in_one_feature_flags_that_feature(seed: int) -> None:
    scores = score(_window(REF10, 1000, seed=200 + seed, shift={4: 0.5}), REF10)
    assert scores.verdict.drifted_features == ("f4",)
    assert not scores.verdict.drifted  # one feature of ten is not a drifted dataset
    f4 = scores.features[4].test
    assert f4.psi is not None and f4.psi > 0.15 and f4.ks is not None and f4.ks > 0.15


def test_dataset_drifts_when_half_the_features_do() -> None:
    shift = {j: 0.7 for j in range(5)}
    verdict = score(_window(REF10, 2000, seed=7, shift=shift), REF10).verdict
    assert verdict.drifted and verdict.share == 0.5
    assert set(verdict.drifted_features) == {f"f{j}" for j in range(5)}


def test_output_drift_is_flagged() -> None:
    c = _window(REF10, 2000, seed=8)
    flipped = WindowCounts(**{**_fields(c), "class_counts": c.class_counts[::-1]})
    assert score(flipped, REF10).verdict.output_drifted
    assert not score(c, REF10).verdict.output_drifted


def _false_alarm_and_power(n: int, shift: float, windows: int = 200) -> tuple[int, int, int]:
    """(windows with any unshifted feature flagged, with the dataset drifted, with f0 flagged)."""
    any_alarm = dataset = caught = 0
    for w in range(windows):
        v = score(_window(REF10, n, seed=10_000 * n + w, shift={0: shift}), REF10).verdict
        any_alarm += any(name != "f0" for name in v.drifted_features)
        dataset += v.drifted
        caught += "f0" in v.drifted_features
    return any_alarm, dataset, caught


def test_false_alarm_rate_and_power_over_200_seeded_windows() -> None:
    # Measured (10 features, alpha 0.05 family-wise, reference of 10,000 rows): at n=100, 7 of
    # 200 windows flag one of the nine unshifted features (Bonferroni keeps it under alpha) and
    # none calls the dataset drifted; at n=1000, 0 of 200 (the 0.1 floors rule there). A 0.5
    # sigma shift in f0 is caught in 200 of 200 windows at n=1000 and 171 of 200 at n=100.
    alarms_100, dataset_100, caught_100 = _false_alarm_and_power(100, 0.5)
    alarms_1000, dataset_1000, caught_1000 = _false_alarm_and_power(1000, 0.5)
    assert alarms_100 <= 20 and dataset_100 == 0  # family-wise 5% -> ~10 expected at most
    assert alarms_1000 <= 2 and dataset_1000 == 0
    assert caught_1000 >= 198
    assert caught_100 >= 100


def test_fixed_psi_threshold_false_alarms_on_small_windows_where_the_bound_does_not() -> None:
    fixed = bound = 0
    for w in range(200):
        scores = score(_window(REF3, 100, seed=w), REF3)
        fixed += sum(f.test.psi is not None and f.test.psi > 0.1 for f in scores.features)
        bound += len(scores.verdict.drifted_features)
    # measured: PSI > 0.1 in 219 of 600 null feature-windows ("four times in ten", DESIGN.md);
    # the sample-size-aware verdict flags 6
    assert fixed > 150
    assert bound <= 15


def test_cohort_against_cohort() -> None:
    canary = _window(REF10, 800, seed=31)
    control = _window(REF10, 4000, seed=32)
    assert score(canary, control).verdict.drifted_features == ()
    assert score(canary, control).verdict.baseline == "sample"
    shifted = _window(REF10, 800, seed=33, shift={2: 0.5})
    assert score(shifted, control).verdict.drifted_features == ("f2",)


def test_score_refuses_counts_of_another_reference() -> None:
    with pytest.raises(DriftIncompatibleError, match="reference profile"):
        score(_window(REF3, 100, seed=1), REF10)
    with pytest.raises(DriftIncompatibleError, match="reference sha256"):
        score(_window(REF3, 100, seed=1), _counts(REF3, np.zeros((5, 3)), sha=OTHER_SHA))


def test_thresholds_are_validated() -> None:
    for bad in ({"alpha": 0.0}, {"alpha": 1.5}, {"psi_floor": -1.0}, {"dataset_share": 0.0}):
        with pytest.raises(DriftError):
            DriftThresholds(**bad)  # type: ignore[arg-type]


def test_missing_and_out_of_range_rates() -> None:
    x = np.zeros((10, 3), dtype=np.float32)
    x[:2, 1] = np.nan
    x[2, 1] = np.inf
    x[:4, 2] = 1e6  # above the reference's maximum
    x[4, 2] = -1e6
    c = _counts(REF3, x)
    assert list(c.missing) == [0, 3, 0]
    assert c.feature(2).out_of_range == 5
    f = score(c, REF3).features
    assert f[1].missing_rate == pytest.approx(0.3)
    assert f[2].out_of_range_rate == pytest.approx(0.5)


def test_count_rows_refuses_bad_inputs() -> None:
    with pytest.raises(DriftError, match="expected \\[n, 3\\]"):
        _counts(REF3, np.zeros((4, 2)))
    with pytest.raises(DriftError, match="2 classes"):
        _counts(REF3, np.zeros((4, 3)), predicted=np.array([0, 1, 2, 0]))
    with pytest.raises(DriftError, match="integers"):
        _counts(REF3, np.zeros((4, 3)), predicted=np.zeros(4))


def test_count_rows_follows_the_binning_rule_at_the_edges() -> None:
    ref = ReferenceProfile(
        features=(FeatureReference("x", (0.0, 1.0, 2.0), (0, 5, 5, 0)),),
        classes=("a",),
        class_counts=(10,),
        n=10,
    )
    x = np.array([[-0.1], [0.0], [0.5], [1.0], [2.0], [2.1]])
    c = _counts(ref, x, predicted=np.zeros(6, dtype=np.int64))
    assert list(c.counts) == [1, 2, 2, 1]  # 2.0 (the last edge) is in the last inner bin


# --- merging ----------------------------------------------------------------------------------


def _fields(c: WindowCounts) -> dict[str, Any]:
    names = ("model_name", "model_version", "reference_sha256", "start", "end", "n")
    arrays = ("feature_names", "bins", "counts", "sums", "sumsqs", "missing", "class_counts")
    return {k: getattr(c, k) for k in names + arrays}


values = st.one_of(
    st.floats(-4, 4, width=32),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e9, -1e9]),
    st.sampled_from([e for f in REF3.features for e in f.edges]),
)
row_batches = st.lists(
    st.lists(st.lists(values, min_size=3, max_size=3), min_size=0, max_size=30),
    min_size=1,
    max_size=4,
)


def _approx_equal(a: WindowCounts, b: WindowCounts) -> None:
    assert a.layout() == b.layout() and (a.start, a.end, a.n) == (b.start, b.end, b.n)
    for name in ("counts", "missing", "class_counts"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    np.testing.assert_allclose(a.sums, b.sums, rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(a.sumsqs, b.sumsqs, rtol=1e-9, atol=1e-6)


def _batches_to_counts(batches: list[list[list[float]]]) -> list[WindowCounts]:
    return [
        _counts(
            REF3, np.array(b, dtype=np.float64).reshape(-1, 3), start=10.0 * i, end=10.0 * i + 5
        )
        for i, b in enumerate(batches)
    ]


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(batches=row_batches)
def test_merge_equals_counting_the_concatenated_data(batches: list[list[list[float]]]) -> None:
    parts = _batches_to_counts(batches)
    everything = np.array([r for b in batches for r in b], dtype=np.float64).reshape(-1, 3)
    whole = _counts(REF3, everything, start=0.0, end=10.0 * (len(batches) - 1) + 5)
    _approx_equal(merge(parts), whole)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(batches=row_batches, data=st.data())
def test_merge_is_commutative_and_associative(
    batches: list[list[list[float]]], data: st.DataObject
) -> None:
    parts = _batches_to_counts(batches)
    shuffled = data.draw(st.permutations(parts))
    _approx_equal(merge(parts), merge(shuffled))
    if len(parts) >= 3:
        left = merge([merge(parts[:2]), *parts[2:]])
        right = merge([parts[0], merge(parts[1:])])
        _approx_equal(left, right)


def test_merge_refuses_mismatched_counts() -> None:
    a = _window(REF3, 50, seed=1)
    with pytest.raises(DriftIncompatibleError, match="reference sha256"):
        merge([a, _counts(REF3, np.zeros((5, 3)), sha=OTHER_SHA)])
    with pytest.raises(DriftIncompatibleError, match="model version"):
        merge([a, _counts(REF3, np.zeros((5, 3)), version=2)])
    with pytest.raises(DriftIncompatibleError, match="features"):
        merge([a, _window(REF10, 50, seed=1)])
    with pytest.raises(DriftError, match="at least one"):
        merge([])


def test_merge_accepts_summaries_and_scores_the_sum() -> None:
    windows = [_window(REF10, 150, seed=s, shift={1: 0.5}) for s in range(10)]
    # each 150-row window alone is too small for the 0.5 sigma shift; the merged 1,500 rows are not
    merged = merge([summarize(w, REF10) for w in windows])
    assert merged.n == 1500 and (merged.start, merged.end) == (0.0, 60.0)
    assert score(merged, REF10).verdict.drifted_features == ("f1",)


def test_window_counts_check_their_invariants() -> None:
    c = _window(REF3, 20, seed=1)
    with pytest.raises(DriftError, match="every row has one value"):
        WindowCounts(**{**_fields(c), "n": 21})
    with pytest.raises(DriftError, match="class counts"):
        WindowCounts(**{**_fields(c), "class_counts": c.class_counts + 1})
    with pytest.raises(DriftError, match="sha256"):
        WindowCounts(**{**_fields(c), "reference_sha256": "nope"})
    with pytest.raises(DriftError, match="start <= end"):
        WindowCounts(**{**_fields(c), "start": 100.0})
    assert not c.counts.flags.writeable


# --- wire form ----------------------------------------------------------------------------------


def _summary(seed: int = 3, n: int = 400) -> DriftSummary:
    return summarize(_window(REF3, n, seed=seed, shift={0: 0.8}), REF3)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(batches=row_batches, alpha=st.sampled_from([0.01, 0.05, 0.2]))
def test_summary_survives_to_dict_and_from_dict(
    batches: list[list[list[float]]], alpha: float
) -> None:
    summary = summarize(merge(_batches_to_counts(batches)), REF3, DriftThresholds(alpha=alpha))
    wire = json.dumps(summary.to_dict(), allow_nan=False)  # strict JSON: no NaN anywhere
    back = DriftSummary.from_dict(json.loads(wire))
    assert back == summary
    assert WindowCounts.from_dict(json.loads(wire)) == summary.counts


def test_wire_form_carries_counts_scores_and_verdict() -> None:
    d = _summary().to_dict()
    assert d["format"] == "edgefleet-drift/1"
    assert set(d) == {
        "format",
        "model",
        "reference_sha256",
        "window",
        "n",
        "features",
        "output",
        "scores",
    }
    f0 = d["features"][0]
    assert set(f0) == {"name", "counts", "sum", "sumsq", "missing", "out_of_range"}
    assert sum(f0["counts"]) + f0["missing"] == d["n"]
    assert d["scores"]["verdict"]["drifted_features"] == ["f0"]
    assert d["scores"]["features"][0]["psi_bound"] >= 0.1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(doc=json_values)
def test_from_dict_rejects_arbitrary_values_with_drift_error(doc: Any) -> None:
    with pytest.raises(DriftError):
        DriftSummary.from_dict(doc)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


VALID = _summary().to_dict()
PATHS = _paths(VALID)[1:]


@settings(max_examples=300)
@given(
    path=st.sampled_from(PATHS),
    action=st.sampled_from(["replace", "delete", "add"]),
    value=json_values | st.sampled_from([-1, 2**64, math.nan, math.inf, "", "x" * 300, True]),
)
def test_from_dict_rejects_any_mutation_with_drift_error_only(
    path: tuple[Any, ...], action: str, value: Any
) -> None:
    doc = json.loads(json.dumps(VALID))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if action == "replace":
        parent[last] = value
    elif action == "delete":
        del parent[last]
    elif isinstance(parent, dict):
        parent["unexpected"] = value
    else:
        parent.append(value)
    try:
        parsed = DriftSummary.from_dict(doc)
    except DriftError:
        return
    except Exception as exc:  # pragma: no cover - the failure this test exists to catch
        pytest.fail(f"from_dict raised {type(exc).__name__}, not DriftError: {exc}")
    # a mutation that still parses must have kept the summary self-consistent
    assert parsed.counts.n == sum(parsed.counts.class_counts)


def test_from_dict_errors_say_where() -> None:
    doc = json.loads(json.dumps(VALID))
    doc["features"][1]["counts"][2] = -5
    with pytest.raises(DriftError, match=r"summary\.features\[1\]\.counts\[2\]"):
        DriftSummary.from_dict(doc)
    doc = json.loads(json.dumps(VALID))
    doc["format"] = "edgefleet-drift/9"
    with pytest.raises(DriftError, match="same drift format"):
        DriftSummary.from_dict(doc)
    assert issubclass(DriftError, ProtocolError)
