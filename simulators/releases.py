"""Releases for runs and tests: the committed pdm-classifier bundles, re-versioned, and bad ones.

:func:`write_bundle` copies a committed bundle (``models/bundles/pdm-classifier/{1,2}``) under a
new version with short trial thresholds and optional swapped files; :func:`collapsed_model`
(outputs collapse to class 0: passes its own golden set, fails the device's trial) and
:func:`slow_model` (same outputs, far over the latency budget: fails the device's health check)
make the bad models; :func:`golden_for` computes a golden set for a changed model. Everything is
deterministic (no training, no randomness): the same call writes the same bytes.

It does not upload anything (:class:`simulators.stack.Stack.upload` does).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from agent.runtimes import load_runtime
from protocol.golden import GoldenSet

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "models" / "bundles" / "pdm-classifier"
MODEL = "pdm-classifier"
# a short trial so a whole update takes seconds; latency under a loaded 2-core box is noisy
TRIAL: dict[str, Any] = {"trial_seconds": 1.5, "trial_min_requests": 5, "max_latency_ratio": 100.0}
KINDS = ("v1", "v2", "collapsed", "slow")  # what build_release can make


def write_bundle(
    dest: Path,
    version: int,
    *,
    base: int = 2,
    only: str | None = None,
    replace: dict[str, bytes] | None = None,
    health: dict[str, Any] | None = None,
) -> Path:
    """A copy of committed bundle ``base`` as ``version``: the short trial thresholds (then
    ``health``), files in ``replace`` swapped in (hashes recomputed), and only the artifact
    ``only`` if given."""
    shutil.copytree(BUNDLES / str(base), dest)
    for name, data in (replace or {}).items():
        (dest / name).write_bytes(data)
    doc = json.loads((dest / "bundle.json").read_text())
    doc["version"] = version
    doc["health"] = {**doc["health"], **TRIAL, **(health or {})}
    if only is not None:
        kept = [a for a in doc["artifacts"] if a["file"] == only]
        for a in doc["artifacts"]:
            if a["file"] != only:
                (dest / a["file"]).unlink()
                doc["files"].pop(a["file"])
                if all(k["golden"] != a["golden"] for k in kept):
                    doc["files"].pop(a["golden"], None)
                    (dest / a["golden"]).unlink(missing_ok=True)
        doc["artifacts"] = kept
    for name in doc["files"]:
        data = (dest / name).read_bytes()
        doc["files"][name] = {"length": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (dest / "bundle.json").write_text(json.dumps(doc, indent=2, sort_keys=True))
    return dest


def fp32_model(base: int = 2) -> bytes:
    """The fp32 ONNX model of committed bundle ``base``."""
    return (BUNDLES / str(base) / "model.fp32.onnx").read_bytes()


def collapsed_model(data: bytes) -> bytes:
    """The fp32 model with class 0's output bias raised: it predicts "normal" for nearly all
    inputs (a retrained model whose outputs shifted: passes its own golden set, fails trial)."""
    model = onnx.load_from_string(data)
    for init in model.graph.initializer:
        if init.name == "dense_2.bias":
            bias = numpy_helper.to_array(init).copy()
            bias[0] += 40.0
            init.CopyFrom(numpy_helper.from_array(bias, init.name))
    return model.SerializeToString()


def slow_model(data: bytes, size: int = 1024) -> bytes:
    """The fp32 model plus a branch that costs two (size x size) @ (size x size) matmuls per row and
    adds exactly zero to the output: same outputs (the golden set passes anywhere), single-row
    latency far over the x86_64-gateway profile's 5 ms budget (the device's health check fails).
    The branch depends on the input, so no constant folding can remove it."""
    model = onnx.load_from_string(data)
    graph = model.graph
    out = graph.output[0].name
    inp = graph.input[0].name
    raw = out + "_raw"
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == out:
                node.output[i] = raw
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([0], np.int64), "slow_start"),
            numpy_helper.from_array(np.array([1], np.int64), "slow_end"),
            numpy_helper.from_array(np.array([1], np.int64), "slow_axis"),
            numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "slow_shape3"),
            numpy_helper.from_array(np.array([1, size, size], np.int64), "slow_expand"),
            numpy_helper.from_array(np.array([2], np.int64), "slow_axis2"),
            numpy_helper.from_array(np.array(0.0, np.float32), "slow_zero"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("Slice", [inp, "slow_start", "slow_end", "slow_axis"], ["slow_x"]),
            helper.make_node("Tanh", ["slow_x"], ["slow_t"]),
            helper.make_node("Reshape", ["slow_t", "slow_shape3"], ["slow_r"]),
            helper.make_node("Expand", ["slow_r", "slow_expand"], ["slow_m"]),
            helper.make_node("MatMul", ["slow_m", "slow_m"], ["slow_mm"]),
            helper.make_node("MatMul", ["slow_mm", "slow_m"], ["slow_mm2"]),
            helper.make_node("ReduceSum", ["slow_mm2", "slow_axis2"], ["slow_rows"], keepdims=0),
            helper.make_node("ReduceSum", ["slow_rows", "slow_axis"], ["slow_sum"], keepdims=1),
            helper.make_node("Mul", ["slow_sum", "slow_zero"], ["slow_nil"]),
            helper.make_node("Add", [raw, "slow_nil"], [out]),
        ]
    )
    onnx.checker.check_model(model)
    return model.SerializeToString()


def golden_for(model: bytes, base: int, where: Path, rows: int | None = None) -> bytes:
    """A golden set for ``model`` on (the first ``rows`` of) the inputs of bundle ``base``'s
    fp32 golden set."""
    old = GoldenSet.from_json(
        (BUNDLES / str(base) / "golden" / "model.fp32.onnx.json").read_bytes()
    )
    inputs = old.inputs[:rows]
    path = where / "model.onnx"
    path.write_bytes(model)
    runtime = load_runtime(path, "onnxruntime", 1)
    try:
        return GoldenSet(inputs, runtime.predict(inputs), 1e-4, 1.0).to_json()
    finally:
        runtime.close()


def build_release(
    kind: str, version: int, dest: Path, health: dict[str, Any] | None = None
) -> Path:
    """A bundle directory at ``dest`` for ``version`` of the kind:

    * ``v1`` / ``v2``: the committed bundle 1 / 2 (every artifact, every profile);
    * ``collapsed``: v2's fp32 ONNX model with its outputs collapsed to one class (ONNX only:
      devices take it, pass the health check and fail the trial);
    * ``slow``: v2's fp32 ONNX model with a costly no-op branch (fails the health check's
      latency budget on every profile).
    """
    if kind in ("v1", "v2"):
        return write_bundle(dest, version, base=int(kind[1]), health=health)
    if kind not in KINDS:
        raise ValueError(f"unknown release kind {kind!r}; use one of {', '.join(KINDS)}")
    model = collapsed_model(fp32_model()) if kind == "collapsed" else slow_model(fp32_model())
    rows = None if kind == "collapsed" else 8  # the server's replay of the slow model stays short
    with tempfile.TemporaryDirectory() as scratch:
        golden = golden_for(model, 2, Path(scratch), rows)
    return write_bundle(
        dest,
        version,
        only="model.fp32.onnx",
        replace={"model.fp32.onnx": model, "golden/model.fp32.onnx.json": golden},
        health=health,
    )
