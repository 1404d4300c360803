"""Model runtimes behind one interface: load a model file, report its signature, predict a batch.

:class:`Runtime` is the interface the rest of the agent uses; :class:`OnnxRuntime` (onnxruntime)
and :class:`LiteRtRuntime` (``ai_edge_litert``, falling back to ``tflite_runtime`` where LiteRT
has no wheel, e.g. armv7l) implement it, and :func:`load_runtime` picks one by the runtime name
a bundle's ``ArtifactInfo.runtime`` carries. Each runtime library is imported lazily by the one
implementation that needs it: a LiteRT-only device never imports onnxruntime (it has no wheel
on armv7l, and it would cost tens of MiB of the agent's memory budget).

Loading checks the file before the runtime sees it (missing, empty, the other runtime's format)
and turns every failure inside the runtime into :class:`~agent.errors.ModelLoadError` naming the
file. Models take one float32 input ``(batch, features)`` and give one float32 output
``(batch, classes)``; quantization lives inside the graph.

``predict`` checks the batch (a float32 ``(rows, features)`` ndarray passes four identity/
attribute checks; anything else takes a slow path that converts it or says what is wrong with it)
and calls ``run``, the agent's hot path, which takes a batch its caller has checked already (the
inference service validates every request itself) and calls the runtime the cheapest way it
offers: onnxruntime's session binding directly with one reused ``RunOptions`` (the public
``InferenceSession.run`` re-checks the feed in Python and builds default run options on every
call, ~4 µs of a ~15 µs call on the sample model). Where :func:`agent.fastpath.native` has
the C extension, LiteRT's ``run`` is its ``LiteRtRunner``: the same SetTensor/Invoke/GetTensor
calls on the interpreter wrapper under the same lock, made from C for a batch of the size the
interpreter is allocated for; other sizes and a closed runtime take the Python ``run``.

This module does not verify bundle hashes (:mod:`protocol.bundle`), compare golden outputs
(:mod:`protocol.golden`) or choose the artifact (:mod:`protocol.profiles`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, Protocol

import numpy as np

from agent import fastpath
from agent.errors import BatchError, InferenceError, ModelLoadError, RuntimeUnavailableError
from protocol.bundle import TensorSpec

RUNTIMES = ("onnxruntime", "litert")
EXTENSIONS = {".onnx": "onnxruntime", ".tflite": "litert"}

_F32 = np.dtype(np.float32)
_NDARRAY = np.ndarray
_TFLITE_IDENTIFIER = b"TFL3"  # flatbuffer file identifier at bytes 4..8 of every .tflite


class Runtime(Protocol):
    """A loaded model. ``predict`` takes ``(rows, features)`` float32 and returns
    ``(rows, classes)`` float32 as a new array the caller owns."""

    @property
    def name(self) -> str: ...  # "onnxruntime" | "litert"

    @property
    def path(self) -> Path: ...

    @property
    def input(self) -> TensorSpec: ...

    @property
    def output(self) -> TensorSpec: ...

    def predict(self, batch: np.ndarray) -> np.ndarray: ...

    def run(self, batch: np.ndarray) -> np.ndarray:
        """``predict`` for a batch the caller has checked already: a float32 ndarray of shape
        ``(rows, features)`` with at least one row (the inference service's hot path)."""
        ...

    def close(self) -> None: ...


# how a model file becomes a Runtime: ``load_runtime`` on a device; a simulator hosting many
# agents in one process passes a loader that shares one runtime per artifact among them
RuntimeLoader = Callable[[Path, str, int], Runtime]


def runtime_for_path(path: str | Path) -> str:
    """The runtime a file's extension calls for (``.onnx`` → onnxruntime, ``.tflite`` → litert)."""
    suffix = Path(path).suffix.lower()
    if suffix not in EXTENSIONS:
        raise ModelLoadError(
            path,
            f"cannot tell the runtime from the extension {suffix!r}; name the runtime "
            f"({' or '.join(RUNTIMES)})",
        )
    return EXTENSIONS[suffix]


def load_runtime(
    path: str | Path,
    runtime: str,
    threads: int,
    *,
    expect_input: TensorSpec | None = None,
    expect_output: TensorSpec | None = None,
) -> Runtime:
    """Load ``path`` with ``runtime`` ("onnxruntime" | "litert") using ``threads`` threads.

    With ``expect_input`` / ``expect_output`` (the bundle's signature) the model's own signature
    must match them. Raises :class:`ModelLoadError` naming the file for every kind of bad file,
    :class:`RuntimeUnavailableError` when the runtime is not installed here.
    """
    if runtime == "onnxruntime":
        rt: Runtime = OnnxRuntime(path, threads)
    elif runtime == "litert":
        rt = LiteRtRuntime(path, threads)
    else:
        raise ModelLoadError(path, f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    try:
        _expect(rt, "input", rt.input, expect_input)
        _expect(rt, "output", rt.output, expect_output)
    except ModelLoadError:
        rt.close()
        raise
    return rt


# --- runtime libraries, imported only when a model needs them -----------------------------------


def import_onnxruntime() -> Any:
    """The ``onnxruntime`` module, or a clear error where it is not installed."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise RuntimeUnavailableError(
            f"onnxruntime is not installed on this device ({exc}); install the agent's extras "
            "(`pip install edgefleet[agent]`) or use a .tflite artifact with runtime 'litert' "
            "(armv7l has no onnxruntime wheels)"
        ) from exc
    return onnxruntime


def import_litert_interpreter() -> Any:
    """LiteRT's ``Interpreter`` class (``ai_edge_litert``, else ``tflite_runtime``)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError as exc:
            raise RuntimeUnavailableError(
                "no LiteRT runtime is installed on this device; install ai-edge-litert "
                "(or tflite-runtime on armv7l), e.g. `pip install edgefleet[agent]`"
            ) from exc
    return Interpreter


def onnx_session_options(threads: int) -> Any:
    """The ``SessionOptions`` every ONNX model is loaded with (the benchmark reuses them)."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return options


# --- implementations ----------------------------------------------------------------------------


class OnnxRuntime:
    """An ONNX model in an onnxruntime ``InferenceSession`` on the CPU.

    ``predict`` may be called from several threads at once (``InferenceSession.run`` is
    thread-safe).
    """

    name = "onnxruntime"

    def __init__(self, path: str | Path, threads: int) -> None:
        self.path = Path(path)
        _check_threads(self.path, threads)
        _check_file(self.path, "onnxruntime")
        ort = import_onnxruntime()
        try:
            session = ort.InferenceSession(
                str(self.path),
                sess_options=onnx_session_options(threads),
                providers=["CPUExecutionProvider"],
            )
            # Names are decoded here: a corrupt name fails now, not on the first predict.
            inputs = [_onnx_spec(i) for i in session.get_inputs()]
            outputs = [_onnx_spec(o) for o in session.get_outputs()]
        except Exception as exc:  # every onnxruntime failure is a bad file here
            raise ModelLoadError(
                self.path,
                f"not a valid ONNX model for onnxruntime ({_first_line(exc)}); rebuild the "
                "artifact or re-download the bundle",
            ) from exc
        self.input = _single_spec(self.path, "input", inputs)
        self.output = _single_spec(self.path, "output", outputs)
        self.threads = threads
        self._session: Any = session
        self._input_name = self.input.name
        self._output_names = [self.output.name]  # cached: run() takes a list every call
        self._features = int(self.input.shape[1] or 0)
        self._classes = int(self.output.shape[1] or 0)
        self._fixed_rows = self.input.shape[0]  # None: any batch size
        # The session's C++ binding, called as InferenceSession.run calls it, minus that
        # method's Python-side feed checks (our callers pass exactly the one float32 input)
        # and with one RunOptions for all calls (``None`` makes the binding build a default
        # one per call). Only read during a run, so concurrent runs may share it.
        binding = getattr(session, "_sess", None)
        self._run: Any = session.run if binding is None else binding.run
        self._run_options = ort.RunOptions()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Run ``batch`` (rows, features) through the model; returns (rows, classes)."""
        if batch.__class__ is not _NDARRAY or batch.dtype is not _F32:
            batch = _coerce(self, batch, self._features)
        else:
            shape = batch.shape  # a new tuple on every access: fetch it once
            if len(shape) != 2 or shape[1] != self._features:
                _coerce(self, batch, self._features)  # raises, saying what is wrong
        return self.run(batch)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """``predict`` without its checks, for a float32 (rows, features) ndarray."""
        try:
            return self._run(self._output_names, {self._input_name: batch}, self._run_options)[0]
        except Exception as exc:
            # A fixed-batch model refuses other batch sizes itself; say so in our words.
            if self._fixed_rows is not None and batch.shape[0] != self._fixed_rows:
                raise _rows_error(self, batch.shape[0], self._fixed_rows) from None
            raise _inference_error(self, self._session is None, exc) from exc

    def close(self) -> None:
        self._session = None
        self._run = _closed

    def __enter__(self) -> OnnxRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OnnxRuntime({str(self.path)!r}, threads={self.threads})"


class LiteRtRuntime:
    """A ``.tflite`` model in a LiteRT interpreter.

    LiteRT interpreters are not thread-safe: ``predict`` holds a lock for the whole
    resize/set/invoke/get sequence, so concurrent callers are served one after another. The
    input tensor is resized (and tensors re-allocated) only when the batch size changes.
    """

    name = "litert"

    def __init__(self, path: str | Path, threads: int) -> None:
        self.path = Path(path)
        _check_threads(self.path, threads)
        _check_file(self.path, "litert")
        interpreter_class = import_litert_interpreter()
        try:
            interpreter = interpreter_class(model_path=str(self.path), num_threads=threads)
            interpreter.allocate_tensors()
            input_details = interpreter.get_input_details()
            output_details = interpreter.get_output_details()
            inputs = [_tflite_spec(d) for d in input_details]
            outputs = [_tflite_spec(d) for d in output_details]
        except Exception as exc:  # every LiteRT failure is a bad file here
            raise ModelLoadError(
                self.path,
                f"not a valid TFLite model for LiteRT ({_first_line(exc)}); rebuild the "
                "artifact or re-download the bundle",
            ) from exc
        self.input = _single_spec(self.path, "input", inputs)
        self.output = _single_spec(self.path, "output", outputs)
        self.threads = threads
        self._interpreter: Any = interpreter
        self._input_index: int = input_details[0]["index"]
        self._output_index: int = output_details[0]["index"]
        self._features = int(self.input.shape[1] or 0)
        self._classes = int(self.output.shape[1] or 0)
        self._fixed_rows = self.input.shape[0]  # None: any batch size
        self._allocated_rows = int(input_details[0]["shape"][0])  # the batch size tensors fit now
        native = fastpath.native()
        self._lock: Any = threading.Lock() if native is None else native.Lock()
        # Bound once: on a small model each attribute lookup is a visible share of a call.
        self._acquire, self._release = self._lock.acquire, self._lock.release
        if native is not None:  # the same run in C for the common call, the rest to this one
            self.run = native.LiteRtRunner(  # type: ignore[method-assign]
                self,
                LiteRtRuntime.run.__get__(self),
                self._lock,
                self._input_index,
                self._output_index,
            )

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Run ``batch`` (rows, features) through the model; returns (rows, classes)."""
        if batch.__class__ is not _NDARRAY or batch.dtype is not _F32:
            batch = _coerce(self, batch, self._features)
        shape = batch.shape  # a new tuple on every access: fetch it once
        if len(shape) != 2 or shape[1] != self._features:
            _coerce(self, batch, self._features)  # raises, saying what is wrong
        return self.run(batch)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """``predict`` without its checks, for a float32 (rows, features) ndarray."""
        rows = batch.shape[0]
        self._acquire()  # acquire/release, not `with`: measurably cheaper per call
        try:
            if rows != self._allocated_rows:  # rare: the batch size changed
                if self._fixed_rows is not None and rows != self._fixed_rows:
                    raise _rows_error(self, rows, self._fixed_rows)
                if not rows:  # LiteRT cannot size a tensor to 0 rows
                    return np.empty((0, self._classes), dtype=_F32)
                self._resize(rows)
            # The interpreter's C++ wrapper, fetched per call: the Python methods around it
            # re-check on every invoke that nobody holds a view of the tensors (we never do),
            # by the wrapper's reference count, so no reference to it may outlive a call.
            raw = self._interpreter._interpreter
            raw.SetTensor(self._input_index, batch)
            raw.Invoke()
            return raw.GetTensor(self._output_index)  # a copy
        except BatchError:
            raise
        except Exception as exc:
            # the traceback keeps this frame alive: drop its reference to the wrapper, or
            # LiteRT refuses to resize while the exception lives
            raw = None
            self._run_failed(exc)
        finally:
            self._release()

    def _run_failed(self, exc: Exception) -> NoReturn:
        """Raise the error for a failed run (called under the lock, by the C runner too)."""
        self._allocated_rows = -1  # resize again on the next call
        raise _inference_error(self, self._interpreter is None, exc) from exc

    def _resize(self, rows: int) -> None:
        self._interpreter.resize_tensor_input(self._input_index, (rows, self._features))
        self._interpreter.allocate_tensors()
        self._allocated_rows = rows

    def close(self) -> None:
        with self._lock:
            self._interpreter = None

    def __enter__(self) -> LiteRtRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LiteRtRuntime({str(self.path)!r}, threads={self.threads})"


# --- checks shared by both ----------------------------------------------------------------------


def _check_threads(path: Path, threads: int) -> None:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ModelLoadError(path, f"threads must be a positive integer, got {threads!r}")


def _check_file(path: Path, runtime: str) -> None:
    """Refuse what no runtime should be handed: no file, an empty file, the other format."""
    if not path.exists():
        raise ModelLoadError(path, "no such file; check the path or re-download the bundle")
    if not path.is_file():
        raise ModelLoadError(path, "is not a regular file; pass the model file itself")
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise ModelLoadError(
            path, f"cannot be read ({exc.strerror}); check its permissions"
        ) from exc
    if not head:
        raise ModelLoadError(path, "is empty; the download or build was cut short — fetch it again")
    expected = EXTENSIONS.get(path.suffix.lower())
    if expected is not None and expected != runtime:
        raise ModelLoadError(
            path,
            f"the file name says {path.suffix} (runtime {expected!r}) but runtime {runtime!r} "
            f"was asked; load it with runtime {expected!r}",
        )
    is_tflite = head[4:8] == _TFLITE_IDENTIFIER
    if runtime == "onnxruntime" and is_tflite:
        raise ModelLoadError(
            path, "is a TFLite flatbuffer, not an ONNX model; load it with runtime 'litert'"
        )
    if runtime == "litert" and not is_tflite:
        hint = (
            "it looks like an ONNX model; load it with runtime 'onnxruntime'"
            if head[:1] == b"\x08"  # ModelProto field 1 (ir_version), varint
            else "the file is corrupt or not a model; rebuild it or re-download the bundle"
        )
        raise ModelLoadError(path, f"is not a TFLite flatbuffer (no 'TFL3' identifier); {hint}")


_ONNX_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(string)": "string",
}


def _onnx_spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in (arg.shape or ()))
    return TensorSpec(name=arg.name, dtype=_ONNX_DTYPES.get(arg.type, arg.type), shape=shape)


def _tflite_spec(details: dict[str, Any]) -> TensorSpec:
    signature = details.get("shape_signature")
    dims = signature if signature is not None and len(signature) else details["shape"]
    shape = tuple(int(d) if d >= 0 else None for d in dims)
    return TensorSpec(name=details["name"], dtype=np.dtype(details["dtype"]).name, shape=shape)


def _single_spec(path: Path, kind: str, specs: list[TensorSpec]) -> TensorSpec:
    """The model's one input (or output), which must be float32 and 2-D with known width."""
    if len(specs) != 1:
        names = ", ".join(s.name for s in specs) or "none"
        raise ModelLoadError(
            path,
            f"has {len(specs)} {kind}s ({names}); the agent serves models with exactly one "
            f"{kind} — export the model with a single {kind} tensor",
        )
    spec = specs[0]
    if spec.dtype != "float32":
        raise ModelLoadError(
            path,
            f"{kind} {spec.name!r} is {spec.dtype}; the agent exchanges float32 — export the "
            "model with float32 input/output and quantize inside the graph",
        )
    if len(spec.shape) != 2 or not spec.shape[1]:  # a width of None or 0 cannot be fed
        raise ModelLoadError(
            path,
            f"{kind} {spec.name!r} has shape {_shape(spec.shape)}; the agent serves models of "
            "shape (batch, width) with a fixed width",
        )
    return spec


def _expect(rt: Runtime, kind: str, actual: TensorSpec, expected: TensorSpec | None) -> None:
    if expected is None or actual == expected:
        return
    diffs = [
        f"{field} {getattr(actual, field)!r} (expected {getattr(expected, field)!r})"
        for field in ("name", "dtype", "shape")
        if getattr(actual, field) != getattr(expected, field)
    ]
    raise ModelLoadError(
        rt.path,
        f"{kind} signature does not match the bundle: {', '.join(diffs)}; this file belongs to "
        "another model or version — use the artifact the bundle lists",
    )


def _coerce(rt: Runtime, batch: object, features: int) -> np.ndarray:
    """The slow path of ``predict``: say what is wrong with ``batch``, or convert it to float32.

    Both runtimes accept non-contiguous arrays themselves, so layout is left alone.
    """
    if not isinstance(batch, np.ndarray):
        raise BatchError(
            f"{rt.path.name}: batch is a {type(batch).__name__}; pass a numpy array of shape "
            f"(rows, {features})"
        )
    shape = batch.shape
    if len(shape) != 2 or shape[1] != features:
        raise BatchError(
            f"{rt.path.name}: batch has shape {_shape(shape)}; the model takes (rows, {features})"
            + (" — wrap a single row as batch[None, :]" if shape == (features,) else "")
        )
    if batch.dtype.kind not in "fiu":
        raise BatchError(f"{rt.path.name}: batch has dtype {batch.dtype}; pass float32 numbers")
    return np.asarray(batch, dtype=_F32)  # copies only for another dtype or byte order


def _rows_error(rt: Runtime, rows: int, fixed: int) -> BatchError:
    return BatchError(
        f"{rt.path.name}: batch has {rows} rows; this model takes exactly {fixed} per call"
    )


def _closed(*args: object) -> Any:
    raise InferenceError("the model was closed")  # predict turns this into the full message


def _inference_error(rt: Runtime, closed: bool, exc: Exception) -> InferenceError:
    if closed:
        return InferenceError(f"{rt.path}: the model was closed; load it again to predict")
    return InferenceError(f"{rt.path}: {rt.name} failed to run the batch ({_first_line(exc)})")


def _shape(shape: tuple[int | None, ...]) -> str:
    dims = ["?" if d is None else str(d) for d in shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
