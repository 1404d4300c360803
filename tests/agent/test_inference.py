"""The inference service on the real runtimes with the committed pdm-classifier bundles:
validation of every kind of bad batch, counters, drift feeding, and model swaps under load;
every test on the C predict path (agent._fastpath) and on the pure-Python one, and both side
by side on the same requests."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import fastpath
from agent.bundle_install import install_bundle
from agent.drift import DriftAccumulator
from agent.errors import InferenceError
from agent.inference import (
    InferenceService,
    InputError,
    LoadedModel,
    NoModelError,
    batch_from_json,
    load_model,
)
from agent.latency import LatencyRecorder, new_recorder, quantile
from agent.runtimes import load_runtime
from agent.slots import Slots
from firmware_profiles import load_profile
from protocol.golden import GoldenSet

REPO = Path(__file__).resolve().parents[2]
BUNDLES = REPO / "models" / "bundles" / "pdm-classifier"
PROFILES = {"onnxruntime": "x86_64-gateway", "litert": "rpi4-aarch64"}

pytestmark = pytest.mark.usefixtures("implementation")


def loaded(tmp_path: Path, version: int = 1, runtime: str = "onnxruntime") -> LoadedModel:
    slots = Slots(tmp_path / f"slots-{runtime}")
    result = install_bundle(BUNDLES / str(version), slots, load_profile(PROFILES[runtime]))
    return load_model(result.installed, threads=1, drift_factory=DriftAccumulator)


def golden_inputs(model: LoadedModel) -> np.ndarray:
    golden = GoldenSet.from_json(model.installed.file(model.release.golden).read_bytes())
    return np.array(golden.inputs)


@pytest.fixture(params=["onnxruntime", "litert"])
def service(request: pytest.FixtureRequest, tmp_path: Path) -> InferenceService:
    svc = InferenceService(nan_policy="reject", max_rows=128)
    svc.swap(loaded(tmp_path, runtime=request.param))
    return svc


def test_predict_matches_the_bare_runtime(service: InferenceService) -> None:
    model = service.current()
    assert model is not None
    x = golden_inputs(model)
    bare = load_runtime(model.installed.artifact_path, model.release.runtime, 1)
    try:
        for rows in (x[:1], x[:64]):
            result = service.predict(rows)
            np.testing.assert_array_equal(result.outputs, bare.predict(rows))
            assert result.model_name == "pdm-classifier" and result.model_version == 1
            assert result.outputs.shape == (len(rows), 5)
            assert result.classes == [model.release.class_names[i] for i in result.predicted]
    finally:
        bare.close()


def test_float64_and_int_inputs_are_converted(service: InferenceService) -> None:
    model = service.current()
    assert model is not None
    x = golden_inputs(model)[:4]
    np.testing.assert_allclose(
        service.predict(x.astype(np.float64)).outputs, service.predict(x).outputs
    )
    assert service.predict(np.zeros((2, 24), dtype=np.int64)).outputs.shape == (2, 5)


@pytest.mark.parametrize(
    ("batch", "status", "says"),
    [
        (np.zeros((1, 23), np.float32), 400, "takes rows of 24 features: [rows, 24]"),
        (np.zeros(24, np.float32), 400, "shape [24]"),
        (np.zeros((2, 3, 24), np.float32), 400, "shape [2, 3, 24]"),
        (np.zeros((0, 24), np.float32), 400, "no rows"),
        (np.zeros((129, 24), np.float32), 413, "129 rows is over the limit of 128"),
        (np.full((1, 24), "a"), 400, "not numbers"),
        (np.zeros((1, 24), bool), 400, "not numbers"),
        ([[0.0] * 24], 400, "pass rows of numbers"),
    ],
)
def test_bad_batches(service: InferenceService, batch: object, status: int, says: str) -> None:
    with pytest.raises(InputError) as err:
        service.predict(batch)  # type: ignore[arg-type]
    assert err.value.status == status
    assert says in str(err.value)


def test_nan_policy_names_the_rows(service: InferenceService) -> None:
    x = np.zeros((30, 24), np.float32)
    x[3, 0] = np.nan
    x[7, 5] = np.inf
    x[12:29, 1] = -np.inf
    with pytest.raises(InputError) as err:
        service.predict(x)
    assert err.value.status == 422
    assert "rows 3, 7, 12, 13, 14, 15, 16, 17, 18, 19 and 9 more" in str(err.value)
    x = np.zeros((1, 24), np.float32)
    x[0, 2] = np.nan
    with pytest.raises(InputError, match="row 0 of the batch"):
        service.predict(x)


def test_nan_allowed_when_configured(tmp_path: Path) -> None:
    svc = InferenceService(nan_policy="allow")
    svc.swap(loaded(tmp_path))
    x = np.zeros((2, 24), np.float32)
    x[0, 0] = np.nan
    assert svc.predict(x).outputs.shape == (2, 5)


@pytest.mark.parametrize(
    ("inputs", "says"),
    [
        ([], "non-empty list of rows"),
        ({"a": 1}, "non-empty list of rows"),
        ([[1.0, "2"]], "row 0 column 1 is str '2'"),
        ([[1.0, True]], "row 0 column 1 is bool True"),
        ([[1.0], [None]], "row 1 column 0 is NoneType None"),
        ([[1.0, 2.0], [1.0]], "different lengths [1, 2]"),
        ([1.0, 2.0], "row 0 is not a list"),
        ([[[1.0]]], "row 0 column 0 is list"),
    ],
)
def test_json_inputs_refused(inputs: object, says: str) -> None:
    with pytest.raises(InputError) as err:
        batch_from_json(inputs)
    assert err.value.status == 400 and says in str(err.value)


def test_json_inputs_accepted() -> None:
    assert batch_from_json([[1, 2.5], [3, 4]]).tolist() == [[1.0, 2.5], [3.0, 4.0]]


def test_counters_latency_and_drift(tmp_path: Path) -> None:
    svc = InferenceService()
    svc.swap(loaded(tmp_path))
    model = svc.current()
    assert model is not None and model.drift is not None
    x = golden_inputs(model)
    for n in (1, 5, 64):
        svc.predict(x[:n])
    with pytest.raises(InputError):
        svc.predict(x[:, :3])
    with pytest.raises(InputError):
        svc.predict_json([["x"]])
    stats = svc.stats()
    assert (stats.requests, stats.rows, stats.rejected, stats.errors) == (3, 70, 2, 0)
    assert stats.latency_count == 3 and stats.latency_buckets[-1][1] == 3
    assert stats.p50 is not None and stats.p95 is not None and 0 < stats.p50 <= stats.p95
    assert svc.drift_rows() == 70  # every served row, none of the refused ones
    summary = svc.close_drift_window(0.0, 1.0)
    assert summary is not None and summary.counts.n == 70
    assert summary.counts.reference_sha256 == model.release.files[model.release.reference]
    assert svc.drift_rows() == 0


def test_drift_window_counts_rows_as_served_from_a_reused_array(
    service: InferenceService,
) -> None:
    """The drift feed copies: a caller refilling one array between calls (small batches held
    in the buffer, large ones handed on) gets each row counted as it was served."""
    model = service.current()
    assert model is not None and isinstance(model.drift, DriftAccumulator)
    rows = golden_inputs(model).astype(np.float32)
    rng = np.random.default_rng(5)
    oracle = DriftAccumulator(model.drift.reference)
    reused = np.empty((64, rows.shape[1]), np.float32)
    for n in [1] * 300 + [64, 7, 33, 1, 64]:
        batch = reused[:n]
        batch[:] = rows[rng.integers(0, len(rows), n)] * np.float32(rng.uniform(0.5, 2.0))
        served = batch.copy()
        outputs = service.predict(batch).outputs
        oracle.add(served, outputs.argmax(1))
        reused[:] = np.nan  # the caller's next use of its array changes nothing served
    assert service.drift_rows() == oracle.rows == 300 + 64 + 7 + 33 + 1 + 64
    summary = service.close_drift_window(0.0, 1.0)
    assert summary is not None
    r = model.release
    expected = oracle.close_window(0.0, 1.0, r.name, r.version, r.files[r.reference])
    assert summary.to_dict() == expected.to_dict()


def test_no_model(tmp_path: Path) -> None:
    svc = InferenceService()
    with pytest.raises(NoModelError, match="edge-agent model install"):
        svc.predict(np.zeros((1, 24), np.float32))
    assert svc.stats().rejected == 1


def test_swap_under_load_fails_no_request(tmp_path: Path) -> None:
    svc = InferenceService()
    models = [loaded(tmp_path / "v1", 1), loaded(tmp_path / "v2", 2, runtime="litert")]
    x = golden_inputs(models[0])[:8]
    svc.swap(models[0])
    failures: list[BaseException] = []
    versions: set[int] = set()
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                versions.add(svc.predict(x).model_version)
            except BaseException as exc:  # noqa: BLE001 - any failure fails the test
                failures.append(exc)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(10):
        fresh = load_model(models[i % 2].installed, threads=1, drift_factory=DriftAccumulator)
        old = svc.swap(fresh)
        assert old is not None
        assert svc.retire(old, timeout=5)
        with pytest.raises(InferenceError, match="closed"):
            old.runtime.predict(x)  # retired means closed
    stop.set()
    for t in threads:
        t.join()
    assert failures == []
    assert versions == {1, 2}
    stats = svc.stats()
    assert stats.requests > 0 and stats.errors == 0
    assert stats.rows == stats.requests * 8  # counts of retired models are kept
    svc.close()
    with pytest.raises(NoModelError):
        svc.predict(x)


@pytest.mark.parametrize("window", [1, 7, 2048])
def test_latency_recorder_histogram_is_exact_across_wraps(window: int) -> None:
    rng = np.random.default_rng(window)
    samples = rng.lognormal(-7, 1.5, size=5000).tolist()
    recorder = new_recorder(window)
    for i, s in enumerate(samples):
        recorder.record(s)
        if i in (3, 999):  # reads in between must not count anything twice
            recorder.stats()
    stats = recorder.stats()
    assert stats.count == 5000 and stats.total_seconds == pytest.approx(sum(samples))
    for le, cumulative in stats.buckets:
        assert cumulative == sum(1 for s in samples if s <= le)
    recent = sorted(samples[-window:])
    assert stats.window == len(recent)
    assert stats.p50 == quantile(recent, 0.5) and stats.p99 == quantile(recent, 0.99)
    assert stats.p50 is not None and stats.p95 is not None and stats.p50 <= stats.p95


def test_latency_recorder_empty() -> None:
    stats = new_recorder().stats()
    assert (stats.count, stats.p50, stats.p95, stats.p99) == (0, None, None, None)
    assert all(c == 0 for _, c in stats.buckets)


def test_latency_recorder_kind_follows_the_implementation(implementation: str) -> None:
    assert (type(new_recorder()) is LatencyRecorder) == (implementation == "python")


@pytest.mark.parametrize("implementation", ["native"], indirect=True)
@pytest.mark.parametrize("runtime", ["onnxruntime", "litert"])
def test_the_c_path_serves_the_common_request(tmp_path: Path, runtime: str) -> None:
    """The C predict takes a float32 C-contiguous batch itself (LiteRT's runner too, once the
    interpreter has the batch's size) and hands everything else to the Python predict."""
    svc = InferenceService(max_rows=128)
    svc.swap(loaded(tmp_path, runtime=runtime))
    model = svc.current()
    assert model is not None
    predictor: Any = svc.predict
    assert type(predictor).__name__ == "Predictor" and predictor.model is model
    run: Any = model.runtime.run
    x = golden_inputs(model).astype(np.float32)
    for n in (1, 1, 64, 64, 1):
        svc.predict(x[:n])
    svc.predict(x[:2], owned=True)
    svc.predict(x[:2], True)
    assert predictor.delegated == 0
    if runtime == "litert":
        assert type(run).__name__ == "LiteRtRunner"
        assert run.delegated == 3  # the three size changes resize in Python
    svc.predict(x[:2].astype(np.float64))
    svc.predict(np.asfortranarray(x[:3]))
    for bad in (x[:4, :3], x[:0]):
        with pytest.raises(InputError):
            svc.predict(bad)
    x_nan = x[:2].copy()
    x_nan[1, 3] = np.nan
    with pytest.raises(InputError):
        svc.predict(x_nan)
    assert predictor.delegated == 5
    assert svc.stats().requests == 9 and svc.stats().rejected == 3
    svc.swap(None)
    assert predictor.model is None
    with pytest.raises(NoModelError):
        svc.predict(x[:1])


def _requests(x: np.ndarray) -> list[object]:
    """A mix of what clients send: plain batches of several sizes, the kinds the C path hands
    on (float64, ints, a view, a Fortran array, a big-endian one), and every bad kind."""
    nan = x[:3].copy()
    nan[1, 2] = np.nan
    inf = x[:40].copy()
    inf[39, 0] = np.inf
    huge = np.full((60, 24), 3e38, np.float32)  # finite, but a float32 sum of squares is not
    return [
        *(x[: 1 + i % 5] for i in range(40)),
        x[:64],
        x[:1].astype(np.float64),
        x[:2].astype(np.int32),
        np.repeat(x[:8], 2, axis=0)[::2],
        np.asfortranarray(x[:6]),
        x[:5].astype(">f4"),
        huge,
        nan,
        inf,
        x[:1, :23],
        x[0],
        x[:0],
        np.zeros((129, 24), np.float32),
        np.full((1, 24), "a"),
        [[0.0] * 24],
        *(x[i : i + 1] for i in range(300)),
    ]


def _serve(svc: InferenceService, requests: list[object]) -> list[object]:
    answers: list[object] = []
    for request in requests:
        try:
            r = svc.predict(request)  # type: ignore[arg-type]
            answers.append((r.outputs.tolist(), r.model_name, r.model_version, r.classes))
        except InputError as exc:
            answers.append((type(exc).__name__, exc.status, str(exc)))
    return answers


@pytest.mark.parametrize("implementation", ["native"], indirect=True)  # and Python, below
@pytest.mark.parametrize("runtime", ["onnxruntime", "litert"])
@pytest.mark.parametrize("nan_policy", ["reject", "allow"])
def test_c_and_python_paths_agree(tmp_path: Path, runtime: str, nan_policy: str) -> None:
    """The same requests through a service on each path: the same outputs, the same errors
    word for word, the same counters and latency count, the same drift summary."""
    services = {}
    for name, module in (("native", fastpath.native()), ("python", None)):
        fastpath._native = module
        svc = InferenceService(nan_policy=nan_policy, max_rows=128)
        svc.swap(loaded(tmp_path / name, runtime=runtime))
        services[name] = svc
    model = services["native"].current()
    assert model is not None
    requests = _requests(golden_inputs(model).astype(np.float32))
    answers = {name: _serve(svc, requests) for name, svc in services.items()}
    assert answers["native"] == answers["python"]
    stats = {name: svc.stats() for name, svc in services.items()}
    for field in ("requests", "rows", "rejected", "errors", "latency_count"):
        assert getattr(stats["native"], field) == getattr(stats["python"], field), field
    assert stats["native"].latency_buckets[-1][1] == stats["native"].latency_count
    summaries = {name: svc.close_drift_window(0.0, 1.0) for name, svc in services.items()}
    assert summaries["native"] is not None and summaries["python"] is not None
    assert summaries["native"].to_dict() == summaries["python"].to_dict()
    assert summaries["native"].counts.n == stats["native"].rows
