"""A release as TUF targets: target paths, artifact custom metadata and its parser."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.bundle import ArtifactInfo, BundleMetadata, HealthThresholds, TensorSpec
from protocol.canonical import canonical_json, float_from_wire, float_to_wire
from protocol.errors import ProtocolError, ReleaseTargetError
from protocol.release import (
    ArtifactTarget,
    TargetKind,
    artifact_custom,
    parse_artifact_custom,
    release_targets,
    target_path,
)

ONNX = ArtifactInfo(
    file="model.int8.onnx",
    format="onnx",
    runtime="onnxruntime",
    quantization="int8",
    golden="golden.onnx.npz",
    sha256="a" * 64,
    length=1000,
    profiles=("x86-server", "rpi4"),
)
TFLITE = ArtifactInfo(
    file="model.int8.tflite",
    format="tflite",
    runtime="litert",
    quantization="int8",
    golden="golden.tflite.npz",
    sha256="b" * 64,
    length=900,
)
META = BundleMetadata(
    name="pdm",
    version=3,
    description="predictive maintenance",
    input=TensorSpec("x", "float32", (None, 4)),
    output=TensorSpec("y", "float32", (None, 2)),
    feature_names=("a", "b", "c", "d"),
    class_names=("ok", "fault"),
    artifacts=(ONNX, TFLITE),
    reference_profile="reference.json",
    health=HealthThresholds(golden_atol=0.03, trial_seconds=12.5, trial_min_requests=7),
    files={
        "model.int8.onnx": ("a" * 64, 1000),
        "model.int8.tflite": ("b" * 64, 900),
        "golden.onnx.npz": ("c" * 64, 50),
        "golden.tflite.npz": ("d" * 64, 60),
        "reference.json": ("e" * 64, 70),
    },
)


def test_release_targets_are_artifacts_goldens_and_the_reference() -> None:
    targets = release_targets(META)
    assert [(t.path, t.bundle_file, t.kind) for t in targets] == [
        ("pdm/3/model.int8.onnx", "model.int8.onnx", TargetKind.ARTIFACT),
        ("pdm/3/model.int8.tflite", "model.int8.tflite", TargetKind.ARTIFACT),
        ("pdm/3/golden.onnx.npz", "golden.onnx.npz", TargetKind.GOLDEN),
        ("pdm/3/golden.tflite.npz", "golden.tflite.npz", TargetKind.GOLDEN),
        ("pdm/3/reference.json", "reference.json", TargetKind.REFERENCE),
    ]
    for t in targets:
        canonical_json(dict(t.custom))  # signable: no floats anywhere


def test_artifact_custom_round_trips() -> None:
    custom = artifact_custom(META, ONNX)
    parsed = parse_artifact_custom(json.loads(canonical_json(custom)))
    assert parsed == ArtifactTarget(
        model="pdm",
        version=3,
        format="onnx",
        runtime="onnxruntime",
        quantization="int8",
        profiles=("x86-server", "rpi4"),
        input=META.input,
        output=META.output,
        golden_path="pdm/3/golden.onnx.npz",
        golden_sha256="c" * 64,
        reference_path="pdm/3/reference.json",
        reference_sha256="e" * 64,
        health=META.health,
    )
    assert custom["health"]["golden_atol"] == "0.03"
    assert custom["health"]["trial_min_requests"] == 7


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c.update(format="other/1"), "not edgefleet-target/1"),
        (lambda c: c.update(kind="golden"), "not a model artifact"),
        (lambda c: c.update(version=0), "positive integer"),
        (lambda c: c.update(version=True), "positive integer"),
        (lambda c: c.update(profiles="rpi4"), "list of strings"),
        (lambda c: c["golden"].update(path="other/3/golden.npz"), "not part of release"),
        (lambda c: c["health"].update(golden_atol=0.05), "decimal string"),
        (lambda c: c["health"].update(golden_atol="5e-2"), "not a canonical decimal"),
        (lambda c: c["health"].pop("trial_seconds"), "lack 'trial_seconds'"),
        (lambda c: c["input"].update(shape=[None, "4"]), "shape"),
        (lambda c: c.pop("runtime"), "'runtime'"),
    ],
)
def test_malformed_custom_is_refused(mutate: object, message: str) -> None:
    custom = json.loads(canonical_json(artifact_custom(META, ONNX)))
    mutate(custom)  # type: ignore[operator]
    with pytest.raises(ReleaseTargetError, match=message):
        parse_artifact_custom(custom)


@pytest.mark.parametrize(
    ("model", "version", "file"),
    [
        ("", 1, "m"),
        ("a/b", 1, "m"),
        ("..", 1, "m"),
        ("m", 0, "m"),
        ("m", 1, "../x"),
        ("m", 1, "/x"),
    ],
)
def test_bad_target_paths_are_refused(model: str, version: int, file: str) -> None:
    with pytest.raises(ReleaseTargetError):
        target_path(model, version, file)


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_floats_round_trip_through_their_wire_form(value: float) -> None:
    assert float_from_wire(float_to_wire(value)) == value


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_floats_cannot_be_signed(value: float) -> None:
    with pytest.raises(ProtocolError):
        float_to_wire(value)


def test_canonical_json_refuses_floats() -> None:
    with pytest.raises(ProtocolError, match="decimal strings"):
        canonical_json({"x": 0.5})
