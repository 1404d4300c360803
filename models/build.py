"""Build a versioned model bundle deterministically: data, training, exports, golden sets, metadata.

``build_bundle(version)`` runs the recipe of that version entirely in memory and returns every
file's bytes plus the parsed metadata; ``write_bundle`` puts them on disk atomically as
``<root>/pdm-classifier/<version>/``. Rebuilding a version gives byte-identical files: seeds are
fixed, nothing records a time, ONNX and flatbuffer serialisation are deterministic, int8 scales
come from a float64 calibration (:mod:`models.quantize`), and the fp32 golden outputs come from the
float64 reference rounded to 1e-6 (the build checks onnxruntime reproduces them within 1e-5).

Versions: v1 and v2 share the signature, feature and class names; v2 is retrained on more data
with another seed, so its weights and accuracy differ slightly.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.atomic import fsync_dir
from models import golden_rows, mlp, onnx_export, pdm_data, quantize, runners, tflite_export
from protocol.bundle import (
    METADATA_FILE,
    ArtifactInfo,
    BundleMetadata,
    HealthThresholds,
    TensorSpec,
    parse_bundle,
    sha256_hex,
)
from protocol.golden import GoldenSet, check_golden
from protocol.reference import build_reference_profile

log = logging.getLogger(__name__)

NAME = "pdm-classifier"
REFERENCE_FILE = "reference_profile.json"
HELDOUT_SEED = 9001  # one held-out set for every version, so accuracies compare
HELDOUT_ROWS = 4000
GOLDEN_CANDIDATES = 600  # held-out rows offered to the golden selection
GOLDEN_ROWS = 64
FP32_GOLDEN_DECIMALS = 6
FP32_RUNTIME_TOL = 1e-5
VIBRATION_COLUMNS = tuple(range(12))


class BuildError(RuntimeError):
    """A built artifact does not behave as the recipe requires; the message says which check."""


@dataclass(frozen=True)
class Recipe:
    version: int
    data_seed: int
    train_rows: int
    training: mlp.TrainConfig
    calibration_rows: int = 1000

    def to_dict(self) -> dict[str, Any]:
        return {
            "data_seed": self.data_seed,
            "train_rows": self.train_rows,
            "calibration_rows": self.calibration_rows,
            "heldout_seed": HELDOUT_SEED,
            "heldout_rows": HELDOUT_ROWS,
            **self.training.to_dict(),
        }


RECIPES: dict[int, Recipe] = {
    1: Recipe(
        version=1, data_seed=1, train_rows=12000, training=mlp.TrainConfig(seed=11, epochs=25)
    ),
    2: Recipe(
        version=2, data_seed=2, train_rows=24000, training=mlp.TrainConfig(seed=12, epochs=20)
    ),
}


@dataclass(frozen=True)
class Artifact:
    file: str
    format: str
    runtime: str
    quantization: str

    @property
    def golden(self) -> str:
        return f"golden/{self.file}.json"


ARTIFACTS = (
    Artifact("model.fp32.onnx", "onnx", "onnxruntime", "fp32"),
    Artifact("model.int8.onnx", "onnx", "onnxruntime", "int8"),
    Artifact("model.int8.tflite", "tflite", "litert", "int8"),
)

QUANTIZATION_NOTE = {
    "method": "static",
    "onnx_format": "QDQ (onnxruntime.quantization.quantize_static)",
    "activations": "int8 asymmetric, per tensor",
    "weights": "int8 symmetric, per tensor; int32 biases",
    "calibration": "min/max of every activation over the calibration rows (training data), "
    "float64 reference, widened to a 1/16 grid; the same scales in the ONNX and TFLite models",
    "standardisation": "float32 Mul/Add before the first quantize: raw features span 1e-2..1e3, "
    "one int8 scale over them loses the small features",
    "why_static": "per-row results do not depend on the batch (dynamic quantization's do, which "
    "breaks golden checks), int8 ONNX and TFLite give identical outputs, accuracy within a "
    "point of fp32",
}


def _description(version: int) -> str:
    return (
        f"edgefleet {NAME} v{version}: predictive maintenance of a pump motor from one sensor "
        f"window ({len(pdm_data.FEATURE_NAMES)} vibration/temperature/current features in raw "
        f"units) to {len(pdm_data.CLASS_NAMES)} machine states"
    )


def build_bundle(version: int) -> tuple[dict[str, bytes], BundleMetadata]:
    """All files of bundle ``version`` (``bundle.json`` included) and its metadata."""
    if version not in RECIPES:
        raise BuildError(f"no recipe for version {version}; known: {sorted(RECIPES)}")
    recipe = RECIPES[version]
    n_classes = len(pdm_data.CLASS_NAMES)
    train = pdm_data.generate(recipe.train_rows, recipe.data_seed)
    heldout = pdm_data.generate(HELDOUT_ROWS, HELDOUT_SEED)
    model = mlp.train(train.x, train.y, n_classes, recipe.training)
    calibration = train.x[: recipe.calibration_rows]
    qplan = quantize.plan(model, calibration)

    description = _description(version)
    fp32_model = onnx_export.fp32_model(model, description)
    fp32_model.model_version = version
    fp32_bytes = onnx_export.serialise(fp32_model)
    int8_model = onnx_export.int8_model(fp32_bytes, model, qplan, calibration)
    int8_model.model_version = version
    blobs = {
        "model.fp32.onnx": fp32_bytes,
        "model.int8.onnx": onnx_export.serialise(int8_model),
        "model.int8.tflite": tflite_export.build(model, qplan, description),
    }

    files: dict[str, bytes] = dict(blobs)
    reference = build_reference_profile(
        train.x,
        np.argmax(mlp.forward(model, train.x), axis=1),
        pdm_data.FEATURE_NAMES,
        pdm_data.CLASS_NAMES,
        n_bins=10,
    )
    files[REFERENCE_FILE] = reference.to_json()

    health = HealthThresholds()
    files.update(_golden_sets(model, train.x, heldout.x, blobs, health))
    metrics = _metrics(recipe, model, heldout, blobs)

    artifacts = []
    for a in ARTIFACTS:
        data = blobs[a.file]
        artifacts.append(
            ArtifactInfo(
                file=a.file,
                format=a.format,
                runtime=a.runtime,
                quantization=a.quantization,
                golden=a.golden,
                sha256=sha256_hex(data),
                length=len(data),
            )
        )
    meta = BundleMetadata(
        name=NAME,
        version=version,
        description=description,
        input=TensorSpec("features", "float32", (None, len(pdm_data.FEATURE_NAMES))),
        output=TensorSpec("probabilities", "float32", (None, n_classes)),
        feature_names=pdm_data.FEATURE_NAMES,
        class_names=pdm_data.CLASS_NAMES,
        artifacts=tuple(artifacts),
        reference_profile=REFERENCE_FILE,
        health=health,
        files={path: (sha256_hex(data), len(data)) for path, data in sorted(files.items())},
        metrics=metrics,
    )
    files[METADATA_FILE] = meta.to_json()
    return files, parse_bundle(files[METADATA_FILE])


def _golden_sets(
    model: mlp.MLP,
    train_x: np.ndarray,
    heldout_x: np.ndarray,
    blobs: dict[str, bytes],
    health: HealthThresholds,
) -> dict[str, bytes]:
    pool = golden_rows.rounded(heldout_x[:GOLDEN_CANDIDATES])
    normal = pool[np.argmax(np.argmax(mlp.forward(model, pool), axis=1) == 0)]
    edges = golden_rows.edge_cases(train_x, normal, VIBRATION_COLUMNS)
    candidates = np.concatenate([pool, edges])
    is_edge = np.arange(len(candidates)) >= len(pool)
    reference = mlp.forward(model, candidates)
    outputs = {a.file: runners.predict(a.runtime, blobs[a.file], candidates) for a in ARTIFACTS}

    fp32_err = float(np.abs(outputs["model.fp32.onnx"] - reference).max())
    if fp32_err > FP32_RUNTIME_TOL:
        raise BuildError(
            f"onnxruntime's fp32 outputs differ from the float64 reference by {fp32_err:.2g} "
            f"(> {FP32_RUNTIME_TOL}); the fp32 export is wrong"
        )
    rows = golden_rows.select(candidates, is_edge, reference, list(outputs.values()), GOLDEN_ROWS)
    out: dict[str, bytes] = {}
    for a in ARTIFACTS:
        if a.quantization == "fp32":
            # the exact values, rounded: independent of the build machine's float kernels
            expected = np.round(reference[rows], FP32_GOLDEN_DECIMALS).astype(np.float32)
        else:
            expected = outputs[a.file][rows]  # on the 1/256 grid of the int8 softmax
        golden = GoldenSet(
            inputs=candidates[rows],
            expected=expected,
            atol=health.golden_atol,
            min_agreement=health.golden_min_agreement,
        )
        result = check_golden(golden, outputs[a.file][rows])
        if not result.passed:
            raise BuildError(f"{a.file} fails its own golden set: {result.reason}")
        out[a.golden] = golden.to_json()
    return out


def _metrics(
    recipe: Recipe, model: mlp.MLP, heldout: pdm_data.Dataset, blobs: dict[str, bytes]
) -> dict[str, Any]:
    reference = mlp.forward(model, heldout.x)
    accuracy: dict[str, float] = {"fp32_reference": round(mlp.accuracy(reference, heldout.y), 4)}
    vs_fp32: dict[str, dict[str, float]] = {}
    for a in ARTIFACTS:
        probs = runners.predict(a.runtime, blobs[a.file], heldout.x)
        accuracy[a.file] = round(mlp.accuracy(probs, heldout.y), 4)
        if a.quantization == "int8":
            err = np.abs(probs.astype(np.float64) - reference)
            vs_fp32[a.file] = {
                "argmax_agreement": round(
                    float(np.mean(np.argmax(probs, 1) == np.argmax(reference, 1))), 4
                ),
                "mean_abs_error": round(float(err.mean()), 4),
                "p99_abs_error": round(float(np.quantile(err.max(axis=1), 0.99)), 4),
            }
    return {
        "accuracy_heldout": accuracy,
        "int8_vs_fp32_heldout": vs_fp32,
        "training": recipe.to_dict(),
        "quantization": QUANTIZATION_NOTE,
    }


def default_root() -> Path:
    """Where the committed bundles live: ``models/bundles``."""
    return Path(__file__).resolve().parent / "bundles"


def bundle_dir(root: Path, version: int) -> Path:
    return root / NAME / str(version)


def write_bundle(root: Path, version: int, files: dict[str, bytes]) -> Path:
    """Write ``files`` as ``<root>/pdm-classifier/<version>/``, replacing any previous build.

    Files go to a temporary sibling directory first (each fsynced), which is then renamed into
    place; a crash leaves the old bundle, the new one, or a ``.old``/``.tmp`` directory that the
    next build removes, never a half-written bundle under the version's name.
    """
    target = bundle_dir(root, version)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{version}.tmp"
    old = parent / f".{version}.old"
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    for rel, data in sorted(files.items()):
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    for d in sorted(
        {(tmp / rel).parent for rel in files}, key=lambda p: len(p.parts), reverse=True
    ):
        fsync_dir(d)
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)
    return target


@dataclass(frozen=True)
class BuildResult:
    directory: Path
    metadata: BundleMetadata
    seconds: float


def build(version: int, root: Path) -> BuildResult:
    """Build bundle ``version`` and write it under ``root``."""
    start = time.perf_counter()
    files, meta = build_bundle(version)
    directory = write_bundle(root, version, files)
    seconds = time.perf_counter() - start
    log.info("built %s v%d into %s in %.1f s", NAME, version, directory, seconds)
    return BuildResult(directory=directory, metadata=meta, seconds=seconds)
