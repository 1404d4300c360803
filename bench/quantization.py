"""Quantization choices for the sample model: held-out accuracy and batch-1 latency, side by side.

Builds v1's network once, then compares, against the fp32 ONNX model on onnxruntime (the
baseline, ratio 1.00):

* ``int8 static QDQ`` — what the bundles ship (standardisation in float32, shared plan),
* ``int8 static, raw input`` — the same but quantizing the raw features with one scale,
* ``int8 dynamic`` — onnxruntime's dynamic quantization (weights int8, activations per batch),
* ``int8 TFLite`` on LiteRT — what the bundles ship for LiteRT devices.

For each: held-out accuracy, argmax agreement with fp32, whether a row's output depends on its
batch (it must not, for golden checks), and median batch-1 latency (1 thread).

Run: ``.venv/bin/python -m bench.quantization [--quick]`` (or ``bench/quantization.py``).
Latencies depend on the machine and its load; compare the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if not __package__:  # run as a file: make the repository importable
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import onnx

from models import build, mlp, onnx_export, pdm_data, quantize, tflite_export


def _ort_session(model: bytes) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return lambda x: np.asarray(session.run(None, {"features": x})[0])


def _litert(model: bytes) -> Callable[[np.ndarray], np.ndarray]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model, num_threads=1)
    inp = interpreter.get_input_details()[0]["index"]
    out = interpreter.get_output_details()[0]["index"]
    shape: list[tuple[int, ...]] = [()]

    def run(x: np.ndarray) -> np.ndarray:
        if x.shape != shape[0]:
            interpreter.resize_tensor_input(inp, list(x.shape))
            interpreter.allocate_tensors()
            shape[0] = x.shape
        interpreter.set_tensor(inp, x)
        interpreter.invoke()
        return np.array(interpreter.get_tensor(out))

    return run


def _latency_us(run: Callable[[np.ndarray], np.ndarray], rows: np.ndarray, n: int) -> float:
    samples = []
    for i in range(n):
        x = rows[i % len(rows)][None, :]
        t = time.perf_counter()
        run(x)
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1e6


def _variants(version: int) -> tuple[dict[str, Callable[[np.ndarray], np.ndarray]], mlp.MLP]:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    recipe = build.RECIPES[version]
    train = pdm_data.generate(recipe.train_rows, recipe.data_seed)
    model = mlp.train(train.x, train.y, len(pdm_data.CLASS_NAMES), recipe.training)
    calibration = train.x[: recipe.calibration_rows]
    qplan = quantize.plan(model, calibration)
    fp32 = onnx_export.serialise(onnx_export.fp32_model(model, "bench"))
    shipped = onnx_export.serialise(onnx_export.int8_model(fp32, model, qplan, calibration))
    with tempfile.TemporaryDirectory() as tmp:
        src, dyn, raw = Path(tmp) / "fp32.onnx", Path(tmp) / "dyn.onnx", Path(tmp) / "raw.onnx"
        src.write_bytes(fp32)
        quantize_dynamic(src, dyn, weight_type=QuantType.QInt8)
        quantize_static(
            onnx.load_from_string(fp32),
            raw,
            onnx_export._Rows(calibration),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
        )
        variants = {
            "fp32 onnxruntime (baseline)": _ort_session(fp32),
            "int8 static QDQ (shipped)": _ort_session(shipped),
            "int8 static, raw input": _ort_session(raw.read_bytes()),
            "int8 dynamic": _ort_session(dyn.read_bytes()),
            "int8 TFLite LiteRT (shipped)": _litert(tflite_export.build(model, qplan, "bench")),
        }
    return variants, model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer latency samples")
    parser.add_argument("--version", type=int, default=1, choices=sorted(build.RECIPES))
    args = parser.parse_args(argv)
    n = 500 if args.quick else 5000

    heldout = pdm_data.generate(build.HELDOUT_ROWS, build.HELDOUT_SEED)
    variants, model = _variants(args.version)
    reference = np.argmax(mlp.forward(model, heldout.x), axis=1)
    print(f"pdm-classifier v{args.version}: {len(heldout.y)} held-out rows, batch-1 latency")
    head = ("variant", "accuracy", "agree", "batch-dep", "median us", "ratio")
    print(f"{head[0]:<30} {head[1]:>8} {head[2]:>7} {head[3]:>9} {head[4]:>10} {head[5]:>6}")
    baseline = None
    for name, run in variants.items():
        probs = run(heldout.x)
        single = np.concatenate([run(heldout.x[i : i + 1]) for i in range(200)])
        batch_dependent = not np.array_equal(single, probs[:200])
        us = _latency_us(run, heldout.x, n)
        baseline = baseline or us
        print(
            f"{name:<30} {mlp.accuracy(probs, heldout.y):>8.4f} "
            f"{np.mean(np.argmax(probs, 1) == reference):>7.4f} "
            f"{'yes' if batch_dependent else 'no':>9} {us:>10.1f} {us / baseline:>6.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
