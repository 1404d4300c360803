"""Sensor streams: deterministic rows read from a tape of windows drawn in blocks, and each drift
scenario seen through the real drift scoring
(the committed v1 reference profile, protocol.drift) and the real int8 TFLite model."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from agent.runtimes import Runtime, load_runtime
from models import build, pdm_data
from protocol.bundle import METADATA_FILE, BundleMetadata, parse_bundle
from protocol.drift import DriftScores, count_rows, score
from protocol.reference import ReferenceProfile
from simulators.streams import (
    BLOCK_ROWS,
    FEATURE_NAMES,
    TEMPERATURE_FEATURES,
    Scenario,
    SensorStream,
    StreamSpec,
    StreamSpecError,
    feature_sigma,
)

SHIFTED = ("motor_current_a", "sound_db")
HOUR = 3600.0


@dataclass(frozen=True)
class V1:
    meta: BundleMetadata
    reference: ReferenceProfile
    model: Runtime

    def scores(self, x: np.ndarray) -> DriftScores:
        predicted = self.model.predict(x).argmax(axis=1)
        counts = count_rows(
            self.reference,
            x,
            predicted,
            start=0.0,
            end=1.0,
            model_name=self.meta.name,
            model_version=self.meta.version,
            reference_sha256=self.meta.files[self.meta.reference_profile][0],
        )
        return score(counts, self.reference)


@pytest.fixture(scope="module")
def v1() -> Iterator[V1]:
    directory = build.bundle_dir(build.default_root(), 1)
    meta = parse_bundle((directory / METADATA_FILE).read_bytes())
    reference = ReferenceProfile.from_json((directory / meta.reference_profile).read_bytes())
    model = load_runtime(Path(directory, "model.int8.tflite"), "litert", 1)
    yield V1(meta, reference, model)
    model.close()


# --- determinism --------------------------------------------------------------------------------


def test_same_spec_and_time_give_the_same_rows() -> None:
    a = SensorStream(StreamSpec.stable(7, 3)).at(120.0, 300)
    b = SensorStream(StreamSpec.stable(7, 3)).at(120.0, 300)
    assert a.x.dtype == np.float32 and a.x.shape == (300, len(FEATURE_NAMES))
    assert a.y.dtype == np.int64 and a.y.shape == (300,)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)


@pytest.mark.parametrize(
    "other",
    [StreamSpec.stable(7, 4), StreamSpec.stable(8, 3)],
    ids=["other device", "other seed"],
)
def test_other_device_or_seed_gives_other_rows(other: StreamSpec) -> None:
    a = SensorStream(StreamSpec.stable(7, 3)).at(120.0, 300).x
    b = SensorStream(other).at(120.0, 300).x
    assert not np.any(np.all(a == b, axis=1))  # no row in common, not just a different order


def test_other_time_gives_other_rows_and_batches_follow_at() -> None:
    stream = SensorStream(StreamSpec.stable(7, 3))
    got = list(stream.batches(50, every_s=30.0, start_s=60.0, count=3))
    assert [b.t_s for b in got] == [60.0, 90.0, 120.0]
    assert np.array_equal(got[2].x, stream.at(120.0, 50).x)
    assert not np.array_equal(got[0].x, got[1].x)


def test_calls_at_the_stream_rate_read_consecutive_windows_across_block_edges() -> None:
    rate = 8.0  # windows a simulated second
    stream = SensorStream(StreamSpec(3, 1, windows_per_s=rate))
    edge_s = BLOCK_ROWS / rate  # the first block ends here
    t0 = edge_s - 2.0  # 16 windows before the edge
    whole = SensorStream(StreamSpec(3, 1, windows_per_s=rate)).at(t0, 64)
    parts = [stream.at(t0 + k, 8) for k in range(8)]  # one call a second, 8 windows each
    assert np.array_equal(np.concatenate([p.x for p in parts]), whole.x)
    assert np.array_equal(np.concatenate([p.y for p in parts]), whole.y)
    assert len({row.tobytes() for row in whole.x}) == 64  # no window repeats


def test_a_block_is_drawn_once_and_the_rows_do_not_depend_on_call_order() -> None:
    rate = 4.0
    stream = SensorStream(StreamSpec(9, 9, windows_per_s=rate))
    times = [k * 0.5 for k in range(int(BLOCK_ROWS / rate) * 6)]  # 3 blocks, 2 calls a second
    forward = [stream.at(t, 2).x for t in times]
    assert stream.blocks_drawn == 3  # not one draw per call
    backward = SensorStream(StreamSpec(9, 9, windows_per_s=rate))
    for t, rows in reversed(list(zip(times, forward, strict=True))):
        assert np.array_equal(backward.at(t, 2).x, rows)
    again = stream.at(times[0], 2).x  # the first block was let go: drawn again, same rows
    assert np.array_equal(again, forward[0]) and stream.blocks_drawn == 4


def test_rows_are_the_callers_to_keep() -> None:
    stream = SensorStream(StreamSpec.stable(2, 2))
    first = stream.at(10.0, 4)
    kept = first.x.copy()
    first.x[:] = 0.0  # an agent owns the batch it is handed (predict(owned=True))
    assert np.array_equal(stream.at(10.0, 4).x, kept)


def test_small_batches_work() -> None:
    batch = SensorStream(StreamSpec.stable(1, 0)).at(0.0, 1)
    assert batch.x.shape == (1, len(FEATURE_NAMES)) and batch.y.shape == (1,)


@pytest.mark.parametrize(
    "spec",
    [
        StreamSpec.gradual(5, 2, SHIFTED, sigma_per_hour=0.5, start_s=600.0),
        StreamSpec.sudden(5, 2, SHIFTED, shift_sigma=1.0, at_s=600.0),
        StreamSpec.environment(5, 2, frozenset({2}), shift_sigma=1.0),
    ],
    ids=lambda s: s.scenario.value,
)
def test_drift_is_the_only_difference_from_the_stable_stream(spec: StreamSpec) -> None:
    stable = SensorStream(StreamSpec.stable(5, 2))
    drifting = SensorStream(spec)
    sigma = feature_sigma()
    cols = [FEATURE_NAMES.index(f) for f in spec.features]
    for t in (0.0, 599.0, 600.0, 2 * HOUR):
        a, b = stable.at(t, 200), drifting.at(t, 200)
        assert np.array_equal(a.y, b.y)
        diff = b.x.astype(np.float64) - a.x
        expected = np.zeros(len(FEATURE_NAMES))
        expected[cols] = spec.shift_sigmas(t) * sigma[cols]
        np.testing.assert_allclose(diff, np.broadcast_to(expected, diff.shape), atol=1e-3)
    assert drifting.spec.shift_sigmas(2 * HOUR) > 0


def test_offsets_per_scenario() -> None:
    g = StreamSpec.gradual(0, 0, SHIFTED, sigma_per_hour=0.5, start_s=HOUR)
    assert [g.shift_sigmas(h * HOUR) for h in (0, 1, 2, 3)] == [0.0, 0.0, 0.5, 1.0]
    s = StreamSpec.sudden(0, 0, SHIFTED, shift_sigma=1.5, at_s=600.0)
    assert (s.shift_sigmas(599.999), s.shift_sigmas(600.0), s.shift_sigmas(1e6)) == (0, 1.5, 1.5)
    hot = frozenset({1, 3})
    env = [StreamSpec.environment(0, d, hot, shift_sigma=2.0).shift_sigmas(0.0) for d in range(4)]
    assert env == [0.0, 2.0, 0.0, 2.0]


# --- against the committed v1 reference profile and model ----------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stable_stream_shows_no_drift(v1: V1, seed: int) -> None:
    stream = SensorStream(StreamSpec.stable(seed, seed + 10))
    x = np.concatenate([b.x for b in stream.batches(500, every_s=60.0, count=4)])
    verdict = v1.scores(x).verdict
    assert not verdict.drifted
    assert verdict.drifted_features == ()
    assert not verdict.output_drifted


def test_sudden_shift_flags_its_features_after_the_step_only(v1: V1) -> None:
    stream = SensorStream(StreamSpec.sudden(3, 1, SHIFTED, shift_sigma=1.0, at_s=HOUR))
    before = np.concatenate([b.x for b in stream.batches(500, 60.0, start_s=HOUR - 240, count=4)])
    after = np.concatenate([b.x for b in stream.batches(500, 60.0, start_s=HOUR, count=4)])
    assert v1.scores(before).verdict.drifted_features == ()
    verdict = v1.scores(after).verdict
    assert set(verdict.drifted_features) == set(SHIFTED)
    assert not verdict.drifted  # 2 of 24 features: below Evidently's dataset share


def test_gradual_drift_grows_monotonically(v1: V1) -> None:
    stream = SensorStream(StreamSpec.gradual(4, 0, SHIFTED, sigma_per_hour=0.25))
    cols = [FEATURE_NAMES.index(f) for f in SHIFTED]
    psi = []
    for hour in range(6):
        scores = v1.scores(stream.at(hour * HOUR, 2000).x)
        psi.append([scores.features[j].test.psi for j in cols])
        flagged = set(scores.verdict.drifted_features)
        assert flagged <= set(SHIFTED), f"hour {hour}: unshifted features flagged {flagged}"
    per_feature = np.asarray(psi).T
    for name, series in zip(SHIFTED, per_feature, strict=True):
        assert np.all(np.diff(series) > 0), f"{name} PSI by hour: {series.round(3)}"
    assert set(v1.scores(stream.at(5 * HOUR, 2000).x).verdict.drifted_features) == set(SHIFTED)


def test_environment_drifts_only_the_chosen_devices(v1: V1) -> None:
    hot = frozenset({1, 4})
    offset_c = 8.0  # a site 8 °C hotter, in σ of the ambient temperature
    shift = offset_c / feature_sigma()[FEATURE_NAMES.index("ambient_temp_c")]
    for device in range(6):
        stream = SensorStream(StreamSpec.environment(6, device, hot, shift_sigma=shift))
        flagged = v1.scores(stream.at(0.0, 1500).x).verdict.drifted_features
        expected = set(TEMPERATURE_FEATURES) if device in hot else set()
        assert set(flagged) == expected, f"device {device}: {flagged}"


def test_v1_accuracy_on_a_stable_stream_is_near_heldout(v1: V1) -> None:
    stream = SensorStream(StreamSpec.stable(11, 2))
    batches = list(stream.batches(1000, every_s=300.0, count=4))
    x = np.concatenate([b.x for b in batches])
    y = np.concatenate([b.y for b in batches])
    accuracy = float(np.mean(v1.model.predict(x).argmax(axis=1) == y))
    heldout = v1.meta.metrics["accuracy_heldout"]["model.int8.tflite"]
    # 4,000 rows: the standard error of an accuracy near 0.94 is ~0.004
    assert abs(accuracy - heldout) < 0.02, (accuracy, heldout)
    assert set(np.unique(y)) == set(range(len(pdm_data.CLASS_NAMES)))


# --- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"seed": -1}, "seed=-1"),
        ({"device": 1.5}, "device=1.5"),
        ({"scenario": "drifty"}, "use one of stable, gradual, sudden, environment"),
        ({"features": ("sound_db",)}, "stable stream has no drift"),
        ({"scenario": "sudden", "shift_sigma": 1.0}, "needs features"),
        ({"scenario": "sudden", "features": ("loudness",)}, "unknown features ['loudness']"),
        ({"scenario": "sudden", "features": ("sound_db", "sound_db")}, "repeat a name"),
        ({"scenario": "sudden", "features": ("sound_db",), "sigma_per_hour": 1}, "shift_sigma"),
        ({"scenario": "gradual", "features": ("sound_db",), "shift_sigma": 1}, "sigma_per_hour"),
        ({"scenario": "sudden", "features": ("sound_db",), "at_s": -5.0}, "starts at 0"),
        ({"scenario": "sudden", "features": ("sound_db",), "shift_sigma": np.inf}, "finite"),
        ({"scenario": "sudden", "features": ("sound_db",), "shift_sigma": "1"}, "finite number"),
        ({"scenario": "environment", "features": ("sound_db",)}, "needs devices"),
        ({"scenario": "sudden", "features": ("sound_db",), "devices": {1}}, "drop devices"),
        ({"windows_per_s": 0.0}, "windows_per_s=0.0: use a positive number"),
        ({"windows_per_s": float("nan")}, "windows_per_s=nan"),
    ],
)
def test_bad_specs_are_refused_with_what_to_do(kwargs: dict[str, object], says: str) -> None:
    args: dict[str, object] = {"seed": 0, "device": 0, **kwargs}
    with pytest.raises(StreamSpecError, match=re.escape(says)):
        StreamSpec(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(("t", "n"), [(-1.0, 10), (float("nan"), 10), ("5", 10), (0.0, 0)])
def test_bad_times_and_sizes_are_refused(t: float, n: int) -> None:
    with pytest.raises(StreamSpecError, match="simulated time|at least 1 row"):
        SensorStream(StreamSpec.stable(0, 0)).at(t, n)


def test_scenario_accepts_its_string_value() -> None:
    spec = StreamSpec(0, 0, "sudden", features=("sound_db",), shift_sigma=1.0)  # type: ignore[arg-type]
    assert spec.scenario is Scenario.SUDDEN
