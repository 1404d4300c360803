"""ONNX exports of an MLP: the fp32 graph (onnx.helper) and its int8 static quantization.

The fp32 graph is ``features -> Mul(inv_std) -> Add(offset) -> [Gemm -> Relu]* -> Gemm ->
Softmax -> probabilities``, opset 17 and IR version 8 so that older onnxruntime builds on
devices load it. The int8 model comes from ``onnxruntime.quantization.quantize_static`` in QDQ
format (int8 activations and weights, per tensor) with every scale and zero point pinned by
``TensorQuantOverrides`` to the shared :class:`models.quantize.QuantPlan`; the standardisation
nodes stay float32 (see :mod:`models.quantize` for why).

Serialisation is deterministic: fixed node and tensor names, fixed producer fields, no
timestamps, protobuf's deterministic mode. This module writes no files except the quantizer's
own scratch files in a temporary directory.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.mlp import MLP
from models.quantize import QuantPlan

log = logging.getLogger(__name__)

OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17
PRODUCER_NAME = "edgefleet-models"
PRODUCER_VERSION = "1"
INPUT_NAME = "features"
OUTPUT_NAME = "probabilities"
STANDARDISE_NODES = ("standardise_mul", "standardise_add")


def _layer_output(i: int, n_layers: int) -> str:
    return "logits" if i == n_layers - 1 else f"hidden_{i}"


def fp32_model(mlp: MLP, doc_string: str) -> onnx.ModelProto:
    """The float32 graph of ``mlp`` with a dynamic batch axis."""
    f, c = mlp.n_features, mlp.n_classes
    inits = [
        numpy_helper.from_array(mlp.inv_std.astype(np.float32), "standardise.inv_std"),
        numpy_helper.from_array(mlp.offset.astype(np.float32), "standardise.offset"),
    ]
    nodes = [
        helper.make_node(
            "Mul", [INPUT_NAME, "standardise.inv_std"], ["scaled"], STANDARDISE_NODES[0]
        ),
        helper.make_node(
            "Add", ["scaled", "standardise.offset"], ["standardised"], STANDARDISE_NODES[1]
        ),
    ]
    prev = "standardised"
    n_layers = len(mlp.layers)
    for i, layer in enumerate(mlp.layers):
        inits.append(numpy_helper.from_array(layer.w.astype(np.float32), f"dense_{i}.weight"))
        inits.append(numpy_helper.from_array(layer.b.astype(np.float32), f"dense_{i}.bias"))
        out = _layer_output(i, n_layers)
        gemm_out = f"dense_{i}" if layer.relu else out
        nodes.append(
            helper.make_node(
                "Gemm", [prev, f"dense_{i}.weight", f"dense_{i}.bias"], [gemm_out], f"dense_{i}"
            )
        )
        if layer.relu:
            nodes.append(helper.make_node("Relu", [gemm_out], [out], f"relu_{i}"))
        prev = out
    nodes.append(helper.make_node("Softmax", [prev], [OUTPUT_NAME], "softmax", axis=-1))
    graph = helper.make_graph(
        nodes,
        "pdm_mlp",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", f])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", c])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=PRODUCER_NAME,
        producer_version=PRODUCER_VERSION,
        doc_string=doc_string,
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def serialise(model: onnx.ModelProto) -> bytes:
    """Deterministic bytes of ``model`` (fixed producer fields, protobuf deterministic mode)."""
    model.producer_name = PRODUCER_NAME
    model.producer_version = PRODUCER_VERSION
    return model.SerializeToString(deterministic=True)


class _Rows:
    """onnxruntime's CalibrationDataReader protocol over rows of raw features."""

    def __init__(self, x: np.ndarray, batch: int = 256) -> None:
        self._batches: Iterator[np.ndarray] = iter(
            [x[i : i + batch].astype(np.float32) for i in range(0, len(x), batch)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def _overrides(mlp: MLP, qplan: QuantPlan) -> dict[str, list[dict[str, object]]]:
    def act(scale: float, zero_point: int) -> list[dict[str, object]]:
        return [
            {
                "scale": np.array(scale, dtype=np.float32),
                "zero_point": np.array(zero_point, np.int8),
            }
        ]

    out: dict[str, list[dict[str, object]]] = {
        "standardised": act(qplan.input.scale, qplan.input.zero_point),
        OUTPUT_NAME: act(qplan.softmax.scale, qplan.softmax.zero_point),
    }
    n_layers = len(mlp.layers)
    for i, layer in enumerate(mlp.layers):
        p = qplan.outputs[i]
        out[_layer_output(i, n_layers)] = act(p.scale, p.zero_point)
        if layer.relu:  # the quantizer folds the Relu into the Gemm's output range
            out[f"dense_{i}"] = act(p.scale, p.zero_point)
        out[f"dense_{i}.weight"] = [
            {
                "scale": np.array(qplan.weight_scales[i], np.float32),
                "zero_point": np.array(0, np.int8),
            }
        ]
    return out


def int8_model(
    fp32: bytes, mlp: MLP, qplan: QuantPlan, calibration_x: np.ndarray
) -> onnx.ModelProto:
    """Static int8 QDQ quantization of the serialised fp32 model, pinned to ``qplan``."""
    quiet = _DropPreprocessAdvice()
    logging.getLogger().addFilter(quiet)
    try:
        with tempfile.TemporaryDirectory(prefix="edgefleet-quant-") as tmp:
            model = _quantize_static(fp32, mlp, qplan, calibration_x, Path(tmp))
    finally:
        logging.getLogger().removeFilter(quiet)
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


class _DropPreprocessAdvice(logging.Filter):
    """onnxruntime's quantizer advises shape-inference pre-processing on the root logger; our
    graph is already fully shaped, so the advice is noise in every build."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


def _quantize_static(
    fp32: bytes, mlp: MLP, qplan: QuantPlan, calibration_x: np.ndarray, tmp: Path
) -> onnx.ModelProto:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    out = tmp / "model.int8.onnx"
    # a fresh copy: the quantizer rewrites a ModelProto it is given to external data
    quantize_static(
        onnx.load_from_string(fp32),
        out,
        _Rows(calibration_x),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=False,
        reduce_range=False,
        nodes_to_exclude=list(STANDARDISE_NODES),
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={
            "TensorQuantOverrides": _overrides(mlp, qplan),
            "WeightSymmetric": True,
            "ActivationSymmetric": False,
        },
    )
    return onnx.load(out)
