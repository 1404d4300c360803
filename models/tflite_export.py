"""The int8 TFLite export of an MLP, written as a flatbuffer without TensorFlow.

Graph (one subgraph, batch 1 with ``shape_signature`` ``[-1, ...]`` so runtimes can resize)::

    features f32 -> MUL(inv_std) -> ADD(offset) -> QUANTIZE -> [FULLY_CONNECTED+RELU]* int8
        -> FULLY_CONNECTED int8 -> SOFTMAX int8 (1/256, -128) -> DEQUANTIZE -> probabilities f32

Scales and zero points come from the shared :class:`models.quantize.QuantPlan`, so this model
holds the same int8 weights as the int8 ONNX export. TFLite rules this writer follows: buffer 0
is empty, file identifier ``TFL3``, schema version 3, FULLY_CONNECTED weights are ``[out, in]``,
operator codes carry both ``deprecated_builtin_code`` (``min(code, 127)``) and
``builtin_code``, constant buffers are 16-byte aligned, int8 tensors have per-tensor scales,
biases are int32 with scale = input scale x weight scale. A ``serving_default`` signature maps
``features`` and ``probabilities``.

Flatbuffer building is deterministic (no timestamps, fixed order). This module writes no files.
"""

from __future__ import annotations

from dataclasses import dataclass

import flatbuffers
import numpy as np
import tflite

from models.mlp import MLP
from models.quantize import QParams, QuantPlan, quantize_bias, quantize_weights

SCHEMA_VERSION = 3
FILE_IDENTIFIER = b"TFL3"
INPUT_NAME = "features"
OUTPUT_NAME = "probabilities"
SIGNATURE_KEY = "serving_default"

_T = tflite.TensorType
_OP = tflite.BuiltinOperator
# (builtin code, operator version for the tensor types used here; see TFLite's op versioning)
_OP_VERSIONS = {
    _OP.MUL: 1,  # float32
    _OP.ADD: 1,  # float32
    _OP.QUANTIZE: 2,  # float32 -> int8
    _OP.FULLY_CONNECTED: 4,  # int8
    _OP.SOFTMAX: 2,  # int8
    _OP.DEQUANTIZE: 2,  # int8 -> float32
}


@dataclass(frozen=True)
class _Tensor:
    name: str
    dtype: int  # tflite.TensorType
    shape: tuple[int, ...]
    signature: tuple[int, ...] | None  # shape_signature; None for constants
    buffer: int
    quant: tuple[float, int] | None  # (scale, zero point), per tensor


@dataclass(frozen=True)
class _Op:
    code: int
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    options: str  # "", "fc_relu", "fc", "softmax", "mul", "add"


class _Graph:
    def __init__(self) -> None:
        self.buffers: list[bytes] = [b""]  # buffer 0 stays empty
        self.tensors: list[_Tensor] = []
        self.ops: list[_Op] = []

    def constant(
        self, name: str, array: np.ndarray, dtype: int, quant: tuple[float, int] | None = None
    ) -> int:
        self.buffers.append(np.ascontiguousarray(array).tobytes())
        return self._tensor(name, dtype, tuple(array.shape), None, len(self.buffers) - 1, quant)

    def activation(self, name: str, width: int, dtype: int, quant: QParams | None = None) -> int:
        q = None if quant is None else (quant.scale, quant.zero_point)
        return self._tensor(name, dtype, (1, width), (-1, width), 0, q)

    def _tensor(
        self,
        name: str,
        dtype: int,
        shape: tuple[int, ...],
        signature: tuple[int, ...] | None,
        buffer: int,
        quant: tuple[float, int] | None,
    ) -> int:
        self.tensors.append(_Tensor(name, dtype, shape, signature, buffer, quant))
        return len(self.tensors) - 1

    def op(self, code: int, inputs: tuple[int, ...], output: int, options: str = "") -> int:
        self.ops.append(_Op(code, inputs, (output,), options))
        return output


def build(mlp: MLP, qplan: QuantPlan, description: str) -> bytes:
    """The int8 ``.tflite`` bytes of ``mlp`` quantized with ``qplan``."""
    f, c = mlp.n_features, mlp.n_classes
    g = _Graph()
    x = g.activation(INPUT_NAME, f, _T.FLOAT32)
    inv_std = g.constant("standardise.inv_std", mlp.inv_std.astype(np.float32), _T.FLOAT32)
    offset = g.constant("standardise.offset", mlp.offset.astype(np.float32), _T.FLOAT32)
    scaled = g.op(_OP.MUL, (x, inv_std), g.activation("scaled", f, _T.FLOAT32), "mul")
    std = g.op(_OP.ADD, (scaled, offset), g.activation("standardised", f, _T.FLOAT32), "add")
    h = g.op(_OP.QUANTIZE, (std,), g.activation("standardised_int8", f, _T.INT8, qplan.input))
    in_scale = qplan.input.scale
    n_layers = len(mlp.layers)
    for i, layer in enumerate(mlp.layers):
        w_scale = qplan.weight_scales[i]
        w = g.constant(
            f"dense_{i}.weight",
            quantize_weights(layer.w, w_scale).T,  # TFLite FULLY_CONNECTED wants [out, in]
            _T.INT8,
            (w_scale, 0),
        )
        b = g.constant(
            f"dense_{i}.bias",
            quantize_bias(layer.b, in_scale, w_scale),
            _T.INT32,
            (float(np.float32(in_scale) * np.float32(w_scale)), 0),
        )
        out_q = qplan.outputs[i]
        name = "logits" if i == n_layers - 1 else f"hidden_{i}"
        out = g.activation(name, int(layer.b.shape[0]), _T.INT8, out_q)
        h = g.op(_OP.FULLY_CONNECTED, (h, w, b), out, "fc_relu" if layer.relu else "fc")
        in_scale = out_q.scale
    probs_q = g.op(
        _OP.SOFTMAX, (h,), g.activation("probabilities_int8", c, _T.INT8, qplan.softmax), "softmax"
    )
    probs = g.op(_OP.DEQUANTIZE, (probs_q,), g.activation(OUTPUT_NAME, c, _T.FLOAT32))
    return _serialise(g, inputs=(x,), outputs=(probs,), description=description)


def _int_vector(b: flatbuffers.Builder, values: tuple[int, ...] | list[int]) -> int:
    return int(b.CreateNumpyVector(np.asarray(values, dtype=np.int32)))


def _buffer_data(b: flatbuffers.Builder, data: bytes) -> int:
    # constant data 16-byte aligned, as TFLite's own converter writes it
    b.StartVector(1, len(data), 16)
    b.head = b.head - len(data)
    b.Bytes[b.head : b.head + len(data)] = data
    return int(b.EndVector())


def _options(b: flatbuffers.Builder, kind: str) -> tuple[int, int]:
    """(builtin options type, options table offset) for an operator."""
    act = tflite.ActivationFunctionType
    if kind in ("fc", "fc_relu"):
        tflite.FullyConnectedOptionsStart(b)
        tflite.FullyConnectedOptionsAddFusedActivationFunction(
            b, act.RELU if kind == "fc_relu" else act.NONE
        )
        tflite.FullyConnectedOptionsAddWeightsFormat(
            b, tflite.FullyConnectedOptionsWeightsFormat.DEFAULT
        )
        return tflite.BuiltinOptions.FullyConnectedOptions, tflite.FullyConnectedOptionsEnd(b)
    if kind == "softmax":
        tflite.SoftmaxOptionsStart(b)
        tflite.SoftmaxOptionsAddBeta(b, 1.0)
        return tflite.BuiltinOptions.SoftmaxOptions, tflite.SoftmaxOptionsEnd(b)
    if kind == "mul":
        tflite.MulOptionsStart(b)
        tflite.MulOptionsAddFusedActivationFunction(b, act.NONE)
        return tflite.BuiltinOptions.MulOptions, tflite.MulOptionsEnd(b)
    if kind == "add":
        tflite.AddOptionsStart(b)
        tflite.AddOptionsAddFusedActivationFunction(b, act.NONE)
        return tflite.BuiltinOptions.AddOptions, tflite.AddOptionsEnd(b)
    if kind == "":
        return tflite.BuiltinOptions.NONE, 0
    raise ValueError(f"unknown operator options {kind!r}")


def _tensor_map(b: flatbuffers.Builder, name: str, index: int) -> int:
    name_off = b.CreateString(name)
    tflite.TensorMapStart(b)
    tflite.TensorMapAddName(b, name_off)
    tflite.TensorMapAddTensorIndex(b, index)
    return int(tflite.TensorMapEnd(b))


def _vector_of_tables(b: flatbuffers.Builder, offsets: list[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return int(b.EndVector())


def _serialise(
    g: _Graph, inputs: tuple[int, ...], outputs: tuple[int, ...], description: str
) -> bytes:
    b = flatbuffers.Builder(4096)

    buffers = []
    for data in g.buffers:
        data_off = _buffer_data(b, data) if data else 0
        tflite.BufferStart(b)
        if data:
            tflite.BufferAddData(b, data_off)
        buffers.append(tflite.BufferEnd(b))

    tensors = []
    for t in g.tensors:
        name = b.CreateString(t.name)
        shape = _int_vector(b, t.shape)
        signature = None if t.signature is None else _int_vector(b, t.signature)
        quant = None
        if t.quant is not None:
            scale = b.CreateNumpyVector(np.asarray([t.quant[0]], dtype=np.float32))
            zero = b.CreateNumpyVector(np.asarray([t.quant[1]], dtype=np.int64))
            tflite.QuantizationParametersStart(b)
            tflite.QuantizationParametersAddScale(b, scale)
            tflite.QuantizationParametersAddZeroPoint(b, zero)
            tflite.QuantizationParametersAddQuantizedDimension(b, 0)
            quant = tflite.QuantizationParametersEnd(b)
        tflite.TensorStart(b)
        tflite.TensorAddShape(b, shape)
        if signature is not None:
            tflite.TensorAddShapeSignature(b, signature)
        tflite.TensorAddType(b, t.dtype)
        tflite.TensorAddBuffer(b, t.buffer)
        tflite.TensorAddName(b, name)
        if quant is not None:
            tflite.TensorAddQuantization(b, quant)
        tensors.append(tflite.TensorEnd(b))

    codes = sorted({op.code for op in g.ops}, key=[op.code for op in g.ops].index)
    code_offsets = []
    for code in codes:
        tflite.OperatorCodeStart(b)
        tflite.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, 127))
        tflite.OperatorCodeAddBuiltinCode(b, code)
        tflite.OperatorCodeAddVersion(b, _OP_VERSIONS[code])
        code_offsets.append(tflite.OperatorCodeEnd(b))

    op_offsets = []
    for op in g.ops:
        ins = _int_vector(b, op.inputs)
        outs = _int_vector(b, op.outputs)
        opt_type, opt = _options(b, op.options)
        tflite.OperatorStart(b)
        tflite.OperatorAddOpcodeIndex(b, codes.index(op.code))
        tflite.OperatorAddInputs(b, ins)
        tflite.OperatorAddOutputs(b, outs)
        if opt_type != tflite.BuiltinOptions.NONE:
            tflite.OperatorAddBuiltinOptionsType(b, opt_type)
            tflite.OperatorAddBuiltinOptions(b, opt)
        op_offsets.append(tflite.OperatorEnd(b))

    sg_tensors = _vector_of_tables(b, tensors)
    sg_ops = _vector_of_tables(b, op_offsets)
    sg_in = _int_vector(b, inputs)
    sg_out = _int_vector(b, outputs)
    sg_name = b.CreateString("main")
    tflite.SubGraphStart(b)
    tflite.SubGraphAddTensors(b, sg_tensors)
    tflite.SubGraphAddInputs(b, sg_in)
    tflite.SubGraphAddOutputs(b, sg_out)
    tflite.SubGraphAddOperators(b, sg_ops)
    tflite.SubGraphAddName(b, sg_name)
    subgraph = tflite.SubGraphEnd(b)

    sig_in = _vector_of_tables(b, [_tensor_map(b, INPUT_NAME, i) for i in inputs])
    sig_out = _vector_of_tables(b, [_tensor_map(b, OUTPUT_NAME, o) for o in outputs])
    sig_key = b.CreateString(SIGNATURE_KEY)
    tflite.SignatureDefStart(b)
    tflite.SignatureDefAddInputs(b, sig_in)
    tflite.SignatureDefAddOutputs(b, sig_out)
    tflite.SignatureDefAddSignatureKey(b, sig_key)
    tflite.SignatureDefAddSubgraphIndex(b, 0)
    signature_def = tflite.SignatureDefEnd(b)

    m_codes = _vector_of_tables(b, code_offsets)
    m_subgraphs = _vector_of_tables(b, [subgraph])
    m_buffers = _vector_of_tables(b, buffers)
    m_sigs = _vector_of_tables(b, [signature_def])
    m_desc = b.CreateString(description)
    tflite.ModelStart(b)
    tflite.ModelAddVersion(b, SCHEMA_VERSION)
    tflite.ModelAddOperatorCodes(b, m_codes)
    tflite.ModelAddSubgraphs(b, m_subgraphs)
    tflite.ModelAddDescription(b, m_desc)
    tflite.ModelAddBuffers(b, m_buffers)
    tflite.ModelAddSignatureDefs(b, m_sigs)
    model = tflite.ModelEnd(b)
    b.Finish(model, file_identifier=FILE_IDENTIFIER)
    return bytes(b.Output())
