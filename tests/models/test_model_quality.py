"""The committed models are accurate, and int8 stays close to fp32 on both runtimes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from models import build, mlp, pdm_data, runners

VERSIONS = sorted(build.RECIPES)
FP32_FLOOR = 0.92  # the task has irreducible overlap (mild faults look normal): ~0.94 is the top
INT8_MAX_DROP = 0.01
INT8_MIN_AGREEMENT = 0.98  # share of held-out rows where int8 predicts what fp32 predicts
INT8_MEAN_ABS = 0.01
INT8_P99_ABS = 0.2


@pytest.fixture(scope="module")
def outputs(
    committed: dict[int, Any], heldout: pdm_data.Dataset
) -> dict[tuple[int, str], np.ndarray]:
    out = {}
    for v, bundle in committed.items():
        for art in bundle.meta.artifacts:
            out[(v, art.file)] = runners.predict(art.runtime, bundle.files[art.file], heldout.x)
    return out


@pytest.mark.parametrize("version", VERSIONS)
def test_fp32_accuracy_above_floor(
    outputs: dict[tuple[int, str], np.ndarray], heldout: pdm_data.Dataset, version: int
) -> None:
    acc = mlp.accuracy(outputs[(version, "model.fp32.onnx")], heldout.y)
    assert acc >= FP32_FLOOR


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("file", ["model.int8.onnx", "model.int8.tflite"])
def test_int8_close_to_fp32(
    outputs: dict[tuple[int, str], np.ndarray], heldout: pdm_data.Dataset, version: int, file: str
) -> None:
    fp32 = outputs[(version, "model.fp32.onnx")]
    int8 = outputs[(version, file)]
    assert mlp.accuracy(int8, heldout.y) >= mlp.accuracy(fp32, heldout.y) - INT8_MAX_DROP
    assert np.mean(np.argmax(int8, 1) == np.argmax(fp32, 1)) >= INT8_MIN_AGREEMENT
    err = np.abs(int8 - fp32).max(axis=1)
    assert err.mean() <= INT8_MEAN_ABS
    assert np.quantile(err, 0.99) <= INT8_P99_ABS
    assert np.allclose(int8.sum(axis=1), 1.0, atol=5 * 2**-8)  # still a distribution


@pytest.mark.parametrize("version", VERSIONS)
def test_int8_runtimes_agree_exactly(
    outputs: dict[tuple[int, str], np.ndarray], version: int
) -> None:
    # one quantization plan: onnxruntime and LiteRT run the same int8 network
    onnx_out = outputs[(version, "model.int8.onnx")]
    tflite_out = outputs[(version, "model.int8.tflite")]
    assert np.mean(onnx_out == tflite_out) >= 0.999
    assert np.abs(onnx_out - tflite_out).max() <= 2 * 2**-8


@pytest.mark.parametrize("version", VERSIONS)
def test_metrics_in_bundle_match_the_artifacts(
    committed: dict[int, Any],
    outputs: dict[tuple[int, str], np.ndarray],
    heldout: pdm_data.Dataset,
    version: int,
) -> None:
    recorded = committed[version].meta.metrics["accuracy_heldout"]
    for art in committed[version].meta.artifacts:
        measured = mlp.accuracy(outputs[(version, art.file)], heldout.y)
        assert recorded[art.file] == pytest.approx(measured, abs=1e-4)


def test_v2_is_a_retrained_model_with_the_same_signature(committed: dict[int, Any]) -> None:
    v1, v2 = committed[1].meta, committed[2].meta
    assert (v1.input, v1.output) == (v2.input, v2.output)
    assert (v1.feature_names, v1.class_names) == (v2.feature_names, v2.class_names)
    assert [a.file for a in v1.artifacts] == [a.file for a in v2.artifacts]
    for a1, a2 in zip(v1.artifacts, v2.artifacts, strict=True):
        assert a1.sha256 != a2.sha256
    t1, t2 = v1.metrics["training"], v2.metrics["training"]
    assert t2["train_rows"] > t1["train_rows"] and t2["seed"] != t1["seed"]
    assert v1.metrics["accuracy_heldout"] != v2.metrics["accuracy_heldout"]


@pytest.mark.parametrize(
    "runtime_file", [("onnxruntime", "model.int8.onnx"), ("litert", "model.int8.tflite")]
)
def test_batch_size_does_not_change_a_row(
    committed: dict[int, Any], heldout: pdm_data.Dataset, runtime_file: tuple[str, str]
) -> None:
    # static quantization: a row's output is the same alone or in a batch (golden checks rely on it)
    runtime, file = runtime_file
    model = committed[1].files[file]
    batch = runners.predict(runtime, model, heldout.x[:32])
    single = np.concatenate(
        [runners.predict(runtime, model, heldout.x[i : i + 1]) for i in range(32)]
    )
    assert np.array_equal(batch, single)
