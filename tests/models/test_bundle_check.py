"""Golden sets pass on the committed artifacts; tampering is caught by check_file and the CLI."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleet.cli import main
from models import build, mlp, quantize, tflite_export
from models.check import check_bundle
from protocol.bundle import METADATA_FILE, check_file, parse_bundle, sha256_hex
from protocol.errors import BundleError
from protocol.golden import GoldenSet

VERSIONS = sorted(build.RECIPES)


def _copy(version: int, tmp_path: Path) -> Path:
    src = build.bundle_dir(build.default_root(), version)
    return Path(shutil.copytree(src, tmp_path / str(version)))


def _rehash(directory: Path) -> None:
    """Re-sign bundle.json over the current files: the hash check passes, the replay must not."""
    meta = parse_bundle((directory / METADATA_FILE).read_bytes())
    files = {rel: (directory / rel).read_bytes() for rel in meta.files}
    artifacts = tuple(
        replace(a, sha256=sha256_hex(files[a.file]), length=len(files[a.file]))
        for a in meta.artifacts
    )
    fresh = replace(
        meta,
        artifacts=artifacts,
        files={rel: (sha256_hex(d), len(d)) for rel, d in files.items()},
    )
    (directory / METADATA_FILE).write_bytes(fresh.to_json())


@pytest.mark.parametrize("version", VERSIONS)
def test_committed_bundles_pass_the_check(version: int, capsys: pytest.CaptureFixture[str]) -> None:
    directory = build.bundle_dir(build.default_root(), version)
    report = check_bundle(directory)
    assert report.passed, (report.problems, report.artifacts)
    assert report.files_checked == 7
    assert [a.rows for a in report.artifacts] == [64, 64, 64]
    assert main(["models", "check", str(directory)]) == 0
    out = capsys.readouterr().out
    assert f"pdm-classifier v{version}" in out
    for file in ("model.fp32.onnx", "model.int8.onnx", "model.int8.tflite"):
        assert file in out
    assert "ok: every file" in out


@pytest.mark.parametrize("version", VERSIONS)
def test_golden_sets_are_stratified_with_edge_cases(
    committed: dict[int, Any], version: int
) -> None:
    bundle = committed[version]
    inputs = None
    for art in bundle.meta.artifacts:
        golden = GoldenSet.from_json(bundle.files[art.golden])
        assert golden.n == 64 and golden.atol == bundle.meta.health.golden_atol
        assert golden.min_agreement == bundle.meta.health.golden_min_agreement
        counts = np.bincount(np.argmax(golden.expected, axis=1), minlength=5)
        assert counts.min() >= 8  # every class is represented
        inputs = golden.inputs if inputs is None else inputs
        assert np.array_equal(golden.inputs, inputs)  # one input set per bundle
    assert inputs is not None
    # edge cases: some rows lie outside the training range (saturating the int8 input)
    profile_hi = np.array([max(f["edges"]) for f in _profile(bundle)["features"]])
    assert np.any((inputs > profile_hi).any(axis=1))


def _profile(bundle: Any) -> dict[str, Any]:
    return dict(json.loads(bundle.files[bundle.meta.reference_profile]))


@pytest.mark.parametrize(
    "file",
    [
        "model.fp32.onnx",
        "model.int8.onnx",
        "model.int8.tflite",
        "reference_profile.json",
        "golden/model.int8.tflite.json",
    ],
)
def test_flipped_byte_is_caught(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], file: str
) -> None:
    directory = _copy(1, tmp_path)
    path = directory / file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))

    meta = parse_bundle((directory / METADATA_FILE).read_bytes())
    with pytest.raises(BundleError, match="sha256 does not match"):
        check_file(meta, file, bytes(data))

    assert main(["models", "check", str(directory)]) == 1
    err = capsys.readouterr().err
    assert f"FAIL {file}: sha256 does not match" in err


def test_truncated_missing_and_stray_files_are_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = _copy(2, tmp_path)
    (directory / "model.int8.onnx").write_bytes((directory / "model.int8.onnx").read_bytes()[:-10])
    (directory / "golden" / "model.fp32.onnx.json").unlink()
    (directory / "notes.txt").write_text("not part of the bundle")
    report = check_bundle(directory)
    assert not report.passed
    text = "\n".join(report.problems)
    assert "model.int8.onnx: 6338 bytes, bundle.json says 6348" in text
    assert "golden/model.fp32.onnx.json" in text
    assert "notes.txt: not listed in bundle.json" in text
    reasons = {a.file: a.reason for a in report.artifacts}
    assert reasons["model.int8.onnx"] == "not run: model.int8.onnx failed the file check"
    assert reasons["model.fp32.onnx"].startswith("not run: golden/model.fp32.onnx.json")
    assert reasons["model.int8.tflite"] == ""  # the healthy artifact still ran and passed
    assert main(["models", "check", str(directory)]) == 1
    assert "notes.txt" in capsys.readouterr().err


def test_wrong_model_under_valid_hashes_fails_the_golden_replay(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # v1's weights in v2's bundle, bundle.json re-hashed: only the replay can notice
    directory = _copy(2, tmp_path)
    v1 = build.bundle_dir(build.default_root(), 1)
    shutil.copyfile(v1 / "model.int8.tflite", directory / "model.int8.tflite")
    _rehash(directory)
    report = check_bundle(directory)
    assert report.problems == ()
    by_file = {a.file: a for a in report.artifacts}
    assert by_file["model.fp32.onnx"].passed and by_file["model.int8.onnx"].passed
    bad = by_file["model.int8.tflite"]
    assert not bad.passed and bad.max_abs_error > 0.05
    assert "atol 0.05" in bad.reason or "predicted class matches" in bad.reason
    assert main(["models", "check", str(directory)]) == 1
    out, err = capsys.readouterr()
    assert "FAIL" in out and "FAIL model.int8.tflite:" in err


def test_malformed_bundle_json_and_bad_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = _copy(1, tmp_path)
    (directory / METADATA_FILE).write_text("{}")
    assert main(["models", "check", str(directory)]) == 1
    assert "bundle.json" in capsys.readouterr().err
    assert main(["models", "check", str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_model_of_another_signature_is_refused_by_the_agent_runtime(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a 4-feature network where the 24-feature one belongs, hashes re-signed
    rng = np.random.default_rng(1)
    tiny = mlp.MLP(
        np.ones(4, np.float32),
        np.zeros(4, np.float32),
        (mlp.Dense(rng.normal(size=(4, 5)).astype(np.float32), np.zeros(5, np.float32), False),),
    )
    x = rng.normal(size=(50, 4)).astype(np.float32)
    directory = _copy(1, tmp_path)
    (directory / "model.int8.tflite").write_bytes(
        tflite_export.build(tiny, quantize.plan(tiny, x), "other")
    )
    _rehash(directory)
    assert main(["models", "check", str(directory)]) == 1
    err = capsys.readouterr().err
    assert "FAIL model.int8.tflite:" in err and "signature does not match the bundle" in err
    bare = {a.file: a for a in check_bundle(directory).artifacts}["model.int8.tflite"]
    assert not bare.passed and "LiteRT could not run the model" in bare.reason
