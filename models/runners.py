"""Run a model artifact on the bare runtimes (onnxruntime, LiteRT) for builds and checks.

One function, :func:`predict`, feeds raw features [n, F] to an artifact held in memory and
returns its ``probabilities`` [n, C] as float32. It is what the build uses to record the int8
artifacts' own outputs and what ``fleet models check`` uses to replay golden sets. It is not the
agent's runtime layer (``agent/runtimes.py``): no thread pinning per profile, no latency
accounting, no error counting.
"""

from __future__ import annotations

import numpy as np

RUNTIMES = ("onnxruntime", "litert")


class RunnerError(RuntimeError):
    """The runtime refused the artifact or the inputs; the message says which and why."""


def predict(runtime: str, model: bytes, x: np.ndarray, threads: int = 1) -> np.ndarray:
    """``probabilities`` of ``model`` on ``x`` [n, F] with ``runtime`` ("onnxruntime"/"litert")."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise RunnerError(f"inputs have shape {x.shape}; pass a 2-D [rows, features] array")
    if runtime == "onnxruntime":
        return _onnxruntime(model, x, threads)
    if runtime == "litert":
        return _litert(model, x, threads)
    raise RunnerError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")


def _onnxruntime(model: bytes, x: np.ndarray, threads: int) -> np.ndarray:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise RunnerError(f"onnxruntime is not installed here ({exc})") from exc

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        (out,) = session.run(["probabilities"], {"features": x})
    except Exception as exc:  # onnxruntime raises its own exception types
        raise RunnerError(f"onnxruntime could not run the model: {exc}") from exc
    return np.asarray(out, dtype=np.float32)


def _litert(model: bytes, x: np.ndarray, threads: int) -> np.ndarray:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise RunnerError(f"LiteRT (ai-edge-litert) is not installed here ({exc})") from exc

    try:
        interpreter = Interpreter(model_content=model, num_threads=threads)
        (inp,) = interpreter.get_input_details()
        (out,) = interpreter.get_output_details()
        interpreter.resize_tensor_input(inp["index"], list(x.shape))
        interpreter.allocate_tensors()
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        result = interpreter.get_tensor(out["index"])
    except (ValueError, RuntimeError) as exc:
        raise RunnerError(f"LiteRT could not run the model: {exc}") from exc
    return np.array(result, dtype=np.float32)
