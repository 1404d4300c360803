"""The int8 quantization plan of an MLP: one set of scales and zero points for every export.

Both int8 artifacts (ONNX through onnxruntime's static quantizer, TFLite through our own
flatbuffer writer) use this one plan, so they hold the same int8 network:

* activations are int8, asymmetric, per tensor; weights int8, symmetric (zero point 0, values in
  [-127, 127]), per tensor; biases int32 with scale = input scale x weight scale.
* the quantized network starts *after* the standardisation step, which stays in float32. Raw
  features span four orders of magnitude (rpm ~1500 next to power factor ~0.8); one per-tensor
  int8 scale over raw features would leave the small ones a handful of levels. Standardised
  features share one range of about [-4, 8], and 256 levels cover every feature finely.
* activation ranges come from the calibration rows run through the exact float64 reference
  (:func:`models.mlp.activations`), widened to a 1/16 grid. Computing them in float64 numpy
  instead of reading them back from a float32 runtime keeps the plan, and so the artifacts' bytes,
  independent of the build machine's CPU kernels.
* the softmax output is int8 with scale 1/256 and zero point -128 (the TFLite convention), so
  the int8 artifacts' probabilities lie on a 1/256 grid.

This module computes numbers only; it writes no files and calls no runtime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from models.mlp import MLP, activations

_RANGE_GRID = 1.0 / 16.0
SOFTMAX_SCALE = 1.0 / 256.0
SOFTMAX_ZERO_POINT = -128


@dataclass(frozen=True)
class QParams:
    scale: float  # a float32 value
    zero_point: int


@dataclass(frozen=True)
class QuantPlan:
    input: QParams  # the standardised input
    outputs: tuple[QParams, ...]  # each layer's output: after ReLU for hidden layers, logits last
    weight_scales: tuple[float, ...]  # per layer, symmetric
    softmax: QParams


def _activation_params(lo: float, hi: float) -> QParams:
    lo = min(0.0, math.floor(lo / _RANGE_GRID) * _RANGE_GRID)  # zero must be representable
    hi = max(0.0, math.ceil(hi / _RANGE_GRID) * _RANGE_GRID)
    if hi - lo < _RANGE_GRID:
        hi = lo + _RANGE_GRID
    scale = float(np.float32((hi - lo) / 255.0))
    zero_point = int(np.clip(round(-128.0 - lo / scale), -128, 127))
    return QParams(scale=scale, zero_point=zero_point)


def weight_scale(w: np.ndarray) -> float:
    return float(np.float32(max(float(np.abs(w).max()), 1e-8) / 127.0))


def plan(mlp: MLP, calibration_x: np.ndarray) -> QuantPlan:
    """Scales and zero points from the min/max of every activation over ``calibration_x``."""
    acts = activations(mlp, calibration_x)
    params = [_activation_params(float(a.min()), float(a.max())) for a in acts]
    return QuantPlan(
        input=params[0],
        outputs=tuple(params[1:]),
        weight_scales=tuple(weight_scale(layer.w) for layer in mlp.layers),
        softmax=QParams(scale=SOFTMAX_SCALE, zero_point=SOFTMAX_ZERO_POINT),
    )


def quantize_weights(w: np.ndarray, scale: float) -> np.ndarray:
    """Symmetric int8 weights (float32 arithmetic, round half to even)."""
    q = np.rint(w.astype(np.float32) / np.float32(scale))
    return np.clip(q, -127, 127).astype(np.int8)


def quantize_bias(b: np.ndarray, input_scale: float, weight_scale: float) -> np.ndarray:
    """Int32 bias with scale ``input_scale * weight_scale``."""
    scale = np.float32(input_scale) * np.float32(weight_scale)
    return np.rint(b.astype(np.float32) / scale).astype(np.int32)
