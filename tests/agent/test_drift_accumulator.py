"""The on-device drift accumulator (agent.drift): it must count exactly what the plain
protocol.drift.count_rows counts, whatever the batching, threads and awkward values."""

from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from agent.drift import DriftAccumulator, WindowPolicy
from protocol.drift import DriftSummary, WindowCounts, count_rows
from protocol.errors import DriftError
from protocol.reference import FeatureReference, ReferenceProfile, build_reference_profile

SHA = "5e" * 32
F32_MAX = float(np.finfo(np.float32).max)
META = {"model_name": "vibration", "model_version": 4, "reference_sha256": SHA}

# binning in the C extension's bin_counts and in numpy: both must count what count_rows counts
pytestmark = pytest.mark.usefixtures("implementation")


def _reference(features: int, float64_edges: bool = True, seed: int = 0) -> ReferenceProfile:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(5000, features))
    if not float64_edges:
        x = x.astype(np.float32)
    return build_reference_profile(
        x, (x[:, 0] > 0).astype(np.int64), [f"f{j}" for j in range(features)], ["a", "b", "c"]
    )


REF = _reference(4)  # quantile edges in float64: most are not float32 values
REF32 = _reference(4, float64_edges=False, seed=1)  # edges that are float32 values (x == edge)
# hand-made: edges beyond float32's range, a tiny gap two float64 edges share one float32 in
WIDE = ReferenceProfile(
    features=(
        FeatureReference("wide", (-1e39, -1.0, 1.0 + 1e-12, 1.0 + 2e-12, 3e38, 1e39), (0,) * 7),
    ),
    classes=("a", "b", "c"),
    class_counts=(1, 1, 1),
    n=3,
)


def _expected(reference: ReferenceProfile, x: np.ndarray, pred: np.ndarray) -> WindowCounts:
    return count_rows(
        reference,
        x.astype(np.float32),
        pred,
        start=0.0,
        end=1.0,
        **META,  # type: ignore[arg-type]
    )


def _assert_same(got: WindowCounts, want: WindowCounts) -> None:
    assert got.n == want.n
    for name in ("counts", "missing", "class_counts"):
        assert np.array_equal(getattr(got, name), getattr(want, name)), name
    # float sums in another order: the error scales with sum(|x|) <= sqrt(n * sum(x^2))
    scale = np.sqrt(max(want.n, 1) * want.sumsqs)
    assert np.all(np.abs(got.sums - want.sums) <= 1e-9 * scale + 1e-9)
    np.testing.assert_allclose(got.sumsqs, want.sumsqs, rtol=1e-9, atol=1e-9)


def _near_edges(feature: FeatureReference) -> np.ndarray:
    """The float32 values on and beside each edge (the nearest float32 may be above or below)."""
    with np.errstate(over="ignore"):  # edges beyond float32's range become +-inf
        e32 = np.asarray(feature.edges).astype(np.float32)
    up = np.nextafter(e32, np.float32(np.inf))
    down = np.nextafter(e32, np.float32(-np.inf))
    return np.concatenate([e32, up, down])


def _awkward_values(feature: FeatureReference) -> st.SearchStrategy[float]:
    near = [float(v) for v in _near_edges(feature)]
    return st.one_of(
        st.floats(-5, 5, width=32),
        st.sampled_from(near),
        st.sampled_from([math.nan, math.inf, -math.inf, F32_MAX, -F32_MAX, 0.0, -0.0]),
    )


@pytest.mark.parametrize("reference", [REF, REF32, WIDE], ids=["float64-edges", "f32", "wide"])
@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data(), block_rows=st.sampled_from([1, 3, 16, 1024]))
def test_accumulator_counts_what_count_rows_counts(
    reference: ReferenceProfile, data: st.DataObject, block_rows: int
) -> None:
    f = reference.n_features
    n = data.draw(st.integers(0, 80))
    columns = [arrays(np.float32, n, elements=_awkward_values(ft)) for ft in reference.features]
    x = np.stack([data.draw(c) for c in columns], axis=1).reshape(n, f)
    pred = data.draw(arrays(np.int64, n, elements=st.integers(0, 2)))
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=6)))
    acc = DriftAccumulator(reference, block_rows=block_rows)
    for lo, hi in zip([0, *cuts], [*cuts, n], strict=True):
        acc.add(x[lo:hi], pred[lo:hi])
    assert acc.rows == n
    summary = acc.close_window(0.0, 1.0, **META)  # type: ignore[arg-type]
    _assert_same(summary.counts, _expected(reference, x, pred))


@pytest.mark.parametrize("reference", [REF, REF32, WIDE], ids=["float64-edges", "f32", "wide"])
def test_every_edge_and_its_neighbours_land_in_their_bins(reference: ReferenceProfile) -> None:
    near = [_near_edges(ft) for ft in reference.features]
    n = max(len(v) for v in near)
    x = np.stack([np.resize(v, n) for v in near], axis=1)
    pred = np.zeros(n, dtype=np.int64)
    acc = DriftAccumulator(reference, block_rows=7)
    acc.add(x, pred)
    _assert_same(acc.close_window(0.0, 1.0, **META).counts, _expected(reference, x, pred))  # type: ignore[arg-type]


def test_float64_inputs_are_binned_as_float32() -> None:
    x = np.random.default_rng(3).normal(size=(500, 4))
    pred = np.zeros(500, dtype=np.int64)
    acc = DriftAccumulator(REF, block_rows=64)
    acc.add(x, pred)
    _assert_same(acc.close_window(0.0, 1.0, **META).counts, _expected(REF, x, pred))  # type: ignore[arg-type]


def test_concurrent_adds_lose_nothing() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(8 * 3000, 4)).astype(np.float32)
    pred = rng.integers(0, 3, size=len(x))
    acc = DriftAccumulator(REF, block_rows=256)
    parts = np.array_split(np.arange(len(x)), 8)

    def worker(rows: np.ndarray) -> None:
        for chunk in np.array_split(rows, 300):  # batches of ~10 rows
            acc.add(x[chunk], pred[chunk])

    threads = [threading.Thread(target=worker, args=(p,)) for p in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _assert_same(acc.close_window(0.0, 1.0, **META).counts, _expected(REF, x, pred))  # type: ignore[arg-type]


def test_close_window_scores_and_starts_afresh() -> None:
    rng = np.random.default_rng(6)
    acc = DriftAccumulator(REF)
    x = rng.normal(size=(2000, 4)).astype(np.float32)
    x[:, 2] += 0.5
    acc.add(x, (x[:, 0] > 0).astype(np.int64))
    first = acc.close_window(100.0, 400.0, **META)  # type: ignore[arg-type]
    assert first.verdict.drifted_features == ("f2",)
    assert (first.counts.start, first.counts.end, first.counts.n) == (100.0, 400.0, 2000)
    assert acc.rows == 0
    y = rng.normal(size=(1500, 4)).astype(np.float32)
    acc.add(y, (y[:, 0] > 0).astype(np.int64))
    second = acc.close_window(400.0, 700.0, **META)  # type: ignore[arg-type]
    assert second.counts.n == 1500 and second.verdict.drifted_features == ()
    assert first.counts.n == 2000  # the first summary was not touched by the reset
    # the summary goes on the wire as it is
    wire = json.dumps(second.to_dict(), allow_nan=False)
    assert DriftSummary.from_dict(json.loads(wire)) == second


def test_an_empty_window_scores_nothing() -> None:
    summary = DriftAccumulator(REF).close_window(0.0, 300.0, **META)  # type: ignore[arg-type]
    assert summary.counts.n == 0
    assert all(f.test.psi is None and not f.drifted for f in summary.scores.features)
    assert not summary.verdict.drifted


@pytest.mark.parametrize(
    ("inputs", "predicted", "message"),
    [
        (np.zeros((2, 3), np.float32), np.zeros(2, np.int64), r"expected \[n, 4\]"),
        (np.zeros(4, np.float32), np.zeros(1, np.int64), r"expected \[n, 4\]"),
        (np.zeros((2, 4), np.float32), np.array([0, 3]), "3 classes"),
        (np.zeros((2, 4), np.float32), np.array([-1, 0]), "3 classes"),
        (np.zeros((2, 4), np.float32), np.zeros(3, np.int64), r"expected \[2\]"),
        (np.zeros((2, 4), np.float32), np.zeros(2), "integers"),
        (np.array([["a"] * 4] * 2), np.zeros(2, np.int64), "numbers"),
    ],
)
def test_add_refuses_bad_batches_and_keeps_what_it_had(
    inputs: np.ndarray, predicted: np.ndarray, message: str
) -> None:
    acc = DriftAccumulator(REF, block_rows=4)
    good = np.ones((3, 4), np.float32)
    acc.add(good, np.zeros(3, np.int64))
    with pytest.raises(DriftError, match=message):
        acc.add(inputs, predicted)
    assert acc.rows == 3
    summary = acc.close_window(0.0, 1.0, **META)  # type: ignore[arg-type]
    _assert_same(summary.counts, _expected(REF, good, np.zeros(3, np.int64)))


def test_block_rows_must_be_positive() -> None:
    with pytest.raises(DriftError, match="block_rows"):
        DriftAccumulator(REF, block_rows=0)


@pytest.mark.parametrize(
    ("now", "rows", "closes"),
    [
        (100.0, 5000, False),  # too young, however many rows
        (300.0, 999, False),  # old enough, too few rows: the window grows
        (300.0, 1000, True),
        (5000.0, 10, False),
        (86400.0, 20, True),  # a quiet device still reports once a day
        (90000.0, 19, False),  # but never under the privacy floor (the window stays open)
        (90000.0, 1, False),  # one row's sums are its raw inputs
        (90000.0, 0, False),
    ],
)
def test_window_policy(now: float, rows: int, closes: bool) -> None:
    policy = WindowPolicy(window_seconds=300.0, min_rows=1000, max_window_seconds=86400.0)
    assert policy.should_close(now, 0.0, rows) is closes


@pytest.mark.parametrize(
    "bad",
    [
        {"window_seconds": 0.0},
        {"window_seconds": math.inf},
        {"min_rows": 0},
        {"min_report_rows": 1},
        {"window_seconds": 600.0, "max_window_seconds": 60.0},
    ],
)
def test_window_policy_is_validated(bad: dict[str, float]) -> None:
    with pytest.raises(DriftError):
        WindowPolicy(**bad)  # type: ignore[arg-type]
