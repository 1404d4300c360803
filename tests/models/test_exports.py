"""The ONNX and TFLite exports: file-format rules, signatures, and one shared int8 network."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
import tflite
from onnx import numpy_helper

from models import mlp, onnx_export, quantize, runners, tflite_export

_OP = tflite.BuiltinOperator


def _tiny_mlp(seed: int = 0) -> tuple[mlp.MLP, np.ndarray]:
    """A small random network over raw features of very different scales."""
    rng = np.random.default_rng(seed)
    scales = np.array([1e-2, 1.0, 50.0, 1500.0], np.float32)
    x = (rng.normal(size=(500, 4)) * scales + scales).astype(np.float32)
    mean, std = x.mean(axis=0), x.std(axis=0)
    layers = (
        mlp.Dense(
            rng.normal(size=(4, 6)).astype(np.float32), rng.normal(size=6).astype(np.float32), True
        ),
        mlp.Dense(
            rng.normal(size=(6, 3)).astype(np.float32) * 2,
            rng.normal(size=3).astype(np.float32),
            False,
        ),
    )
    model = mlp.MLP((1 / std).astype(np.float32), (-mean / std).astype(np.float32), layers)
    return model, x


@pytest.fixture(scope="module")
def tiny() -> dict[str, Any]:
    model, x = _tiny_mlp()
    qplan = quantize.plan(model, x)
    fp32 = onnx_export.serialise(onnx_export.fp32_model(model, "tiny"))
    return {
        "mlp": model,
        "x": x,
        "plan": qplan,
        "fp32": fp32,
        "int8": onnx_export.serialise(onnx_export.int8_model(fp32, model, qplan, x)),
        "tflite": tflite_export.build(model, qplan, "tiny"),
    }


def test_fp32_onnx_matches_the_float64_reference(tiny: dict[str, Any]) -> None:
    out = runners.predict("onnxruntime", tiny["fp32"], tiny["x"])
    assert np.abs(out - mlp.forward(tiny["mlp"], tiny["x"])).max() < 1e-5


@pytest.mark.parametrize(("runtime", "key"), [("onnxruntime", "int8"), ("litert", "tflite")])
def test_int8_exports_track_fp32(tiny: dict[str, Any], runtime: str, key: str) -> None:
    out = runners.predict(runtime, tiny[key], tiny["x"])
    ref = mlp.forward(tiny["mlp"], tiny["x"])
    assert np.mean(np.argmax(out, 1) == np.argmax(ref, 1)) >= 0.97
    assert np.abs(out - ref).mean() < 0.02
    assert np.all(np.round(out * 256) == out * 256)  # int8 softmax: a 1/256 grid


def test_int8_onnx_and_tflite_compute_the_same(tiny: dict[str, Any]) -> None:
    a = runners.predict("onnxruntime", tiny["int8"], tiny["x"])
    b = runners.predict("litert", tiny["tflite"], tiny["x"])
    assert np.abs(a - b).max() <= 2**-8


def test_exports_are_deterministic(tiny: dict[str, Any]) -> None:
    model, qplan, x = tiny["mlp"], tiny["plan"], tiny["x"]
    fp32 = onnx_export.serialise(onnx_export.fp32_model(model, "tiny"))
    assert fp32 == tiny["fp32"]
    assert onnx_export.serialise(onnx_export.int8_model(fp32, model, qplan, x)) == tiny["int8"]
    assert tflite_export.build(model, qplan, "tiny") == tiny["tflite"]


# --- the committed artifacts -------------------------------------------------------------------


def test_onnx_signature_and_header(committed: dict[int, Any]) -> None:
    for version, bundle in committed.items():
        for file in ("model.fp32.onnx", "model.int8.onnx"):
            model = onnx.load_from_string(bundle.files[file])
            onnx.checker.check_model(model, full_check=True)
            assert (model.ir_version, model.opset_import[0].version) == (8, 17)
            assert (model.producer_name, model.producer_version) == ("edgefleet-models", "1")
            assert model.model_version == version
            (inp,), (out,) = model.graph.input, model.graph.output
            assert inp.name == "features" and out.name == "probabilities"
            for value, width in ((inp, 24), (out, 5)):
                dims = value.type.tensor_type.shape.dim
                assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
                assert dims[0].dim_param == "batch" and dims[1].dim_value == width


def test_int8_onnx_keeps_standardisation_in_float(committed: dict[int, Any]) -> None:
    model = onnx.load_from_string(committed[1].files["model.int8.onnx"])
    nodes = list(model.graph.node)
    ops = [n.op_type for n in nodes if n.op_type not in ("DequantizeLinear", "QuantizeLinear")]
    assert ops == ["Mul", "Add", "Gemm", "Gemm", "Gemm", "Softmax"]  # Relu folded into ranges
    first_q = next(n for n in nodes if n.op_type == "QuantizeLinear")
    assert first_q.input[0] == "standardised"
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert inits["standardise.inv_std"].dtype == np.float32
    for i in range(3):
        assert inits[f"dense_{i}.weight_quantized"].dtype == np.int8
        assert inits[f"dense_{i}.weight_scale"].shape == ()  # per tensor
        assert inits[f"dense_{i}.bias_quantized"].dtype == np.int32


def _tflite(data: bytes) -> Any:
    return tflite.Model.GetRootAs(data, 0)


@pytest.mark.parametrize("version", [1, 2])
def test_tflite_follows_the_schema_rules(committed: dict[int, Any], version: int) -> None:
    data = committed[version].files["model.int8.tflite"]
    model = _tflite(data)
    assert data[4:8] == b"TFL3" and model.Version() == 3
    assert model.Buffers(0).DataLength() == 0  # buffer 0 is the empty sentinel
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        assert code.DeprecatedBuiltinCode() == min(code.BuiltinCode(), 127)
    for i in range(1, model.BuffersLength()):
        buf = model.Buffers(i)
        if buf.DataLength():
            tab = buf._tab
            start = tab.Vector(tab.Offset(4))
            assert start % 16 == 0, f"buffer {i} data at {start} is not 16-byte aligned"
    sig = model.SignatureDefs(0)
    assert sig.SignatureKey() == b"serving_default"


def test_tflite_graph_shapes_and_quantization(committed: dict[int, Any]) -> None:
    data = committed[1].files["model.int8.tflite"]
    model = _tflite(data)
    g = model.Subgraphs(0)
    ops = [
        model.OperatorCodes(g.Operators(i).OpcodeIndex()).BuiltinCode()
        for i in range(g.OperatorsLength())
    ]
    assert ops == [_OP.MUL, _OP.ADD, _OP.QUANTIZE] + [_OP.FULLY_CONNECTED] * 3 + [
        _OP.SOFTMAX,
        _OP.DEQUANTIZE,
    ]
    inp, out = g.Tensors(g.Inputs(0)), g.Tensors(g.Outputs(0))
    assert (inp.Name(), out.Name()) == (b"features", b"probabilities")
    assert inp.Type() == out.Type() == tflite.TensorType.FLOAT32
    assert list(inp.ShapeAsNumpy()) == [1, 24] and list(inp.ShapeSignatureAsNumpy()) == [-1, 24]
    assert list(out.ShapeAsNumpy()) == [1, 5] and list(out.ShapeSignatureAsNumpy()) == [-1, 5]
    tensors = {g.Tensors(i).Name().decode(): g.Tensors(i) for i in range(g.TensorsLength())}
    widths = [24, 32, 16, 5]
    for i in range(3):
        w, b = tensors[f"dense_{i}.weight"], tensors[f"dense_{i}.bias"]
        assert w.Type() == tflite.TensorType.INT8 and b.Type() == tflite.TensorType.INT32
        assert list(w.ShapeAsNumpy()) == [widths[i + 1], widths[i]]  # [out, in]
        assert w.Quantization().ZeroPoint(0) == 0 and w.Quantization().ScaleLength() == 1
    soft = tensors["probabilities_int8"].Quantization()
    assert (soft.Scale(0), soft.ZeroPoint(0)) == (1 / 256, -128)


def test_tflite_and_onnx_int8_hold_identical_weights(committed: dict[int, Any]) -> None:
    for bundle in committed.values():
        onnx_model = onnx.load_from_string(bundle.files["model.int8.onnx"])
        inits = {i.name: numpy_helper.to_array(i) for i in onnx_model.graph.initializer}
        model = _tflite(bundle.files["model.int8.tflite"])
        g = model.Subgraphs(0)
        tensors = {g.Tensors(i).Name().decode(): g.Tensors(i) for i in range(g.TensorsLength())}
        for i in range(3):
            t = tensors[f"dense_{i}.weight"]
            raw = model.Buffers(t.Buffer()).DataAsNumpy().tobytes()
            weights = np.frombuffer(raw, np.int8).reshape(list(t.ShapeAsNumpy()))
            assert np.array_equal(weights.T, inits[f"dense_{i}.weight_quantized"])
            assert np.float32(t.Quantization().Scale(0)) == inits[f"dense_{i}.weight_scale"]
            b = tensors[f"dense_{i}.bias"]
            bias = np.frombuffer(model.Buffers(b.Buffer()).DataAsNumpy().tobytes(), np.int32)
            assert np.array_equal(bias, inits[f"dense_{i}.bias_quantized"])


def test_litert_resizes_the_batch(committed: dict[int, Any]) -> None:
    model = committed[2].files["model.int8.tflite"]
    rng = np.random.default_rng(3)
    x = committed[2].meta  # signature from bundle.json
    width = x.input.shape[-1]
    rows = rng.normal(size=(7, width)).astype(np.float32)
    out = runners.predict("litert", model, rows)
    assert out.shape == (7, x.output.shape[-1])
