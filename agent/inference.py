"""The local inference service: the active model, input validation, counters, drift feeding.

:class:`InferenceService` holds the active model as one immutable :class:`LoadedModel` (runtime,
release, drift accumulator, its own counters) and swaps it by replacing one reference, so an
update (issue 5) changes models without failing a request: a request that picked up the old model
finishes on it, and :meth:`InferenceService.retire` closes the old runtime only once its last
request is done.

``predict`` validates the batch (2-D, the model's feature count, numbers only, finite unless the
NaN policy allows otherwise, at most ``max_rows``), runs the runtime, feeds the drift
accumulator (through a small buffer that takes the argmax once per block) and records counts and
latency. Bad input raises :class:`InputError` carrying the HTTP status that describes it (400,
413, 422); no model raises :class:`NoModelError` (503).

A :class:`BatchTap` attached with :meth:`InferenceService.add_tap` gets copies of a model's
served rows with their predicted classes in the same blocks as the drift accumulator (the update
engine's shadow step uses this to run a candidate on live inputs); the request path never calls
it.

Where :func:`agent.fastpath.native` has the C extension, ``predict`` is its ``Predictor``,
which serves the common request (a C-contiguous float32 batch of the model's width, finite
unless allowed) in one C call with the same steps: the validation, the counters under the
model's lock, the drift rows copied into a preallocated block (:class:`NativeDriftBuffer`) and
the latency; every other call it hands to the Python ``predict`` before counting anything. The
pure-Python path (:class:`ModelState`, :class:`DriftBuffer`) is the reference and the fallback
where the extension is not built; the tests run both.

It does not speak HTTP (:mod:`agent.http_server`), choose or verify artifacts (:mod:`agent.slots`
and the installers), or close drift windows on a schedule (:mod:`agent.main`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, NamedTuple, Protocol

import numpy as np

from agent import fastpath
from agent.errors import AgentError, ModelLoadError
from agent.latency import BUCKETS, LatencyStats, Recorder, new_recorder
from agent.runtimes import Runtime, RuntimeLoader, load_runtime
from agent.slots import InstalledRelease, Release
from protocol.drift import DriftSummary
from protocol.reference import ReferenceProfile

log = logging.getLogger(__name__)

NAN_POLICIES = ("reject", "allow")
_F32 = np.dtype(np.float32)
_NUMBER_TYPES = {int, float}
_SUM = np.add.reduce
_DOT = np.vdot
_clock = time.perf_counter
_new_tuple = tuple.__new__
_NDARRAY = np.ndarray
_SMALL_BATCH_VALUES = 48  # up to this many values the finiteness check sums a Python list
_DIRECT_ROWS = 128  # the drift buffer hands batches of this many rows on without holding them
_MAX_ROWS_NAMED = 10  # an error names at most this many offending rows


class InputError(AgentError):
    """A batch the model cannot take; ``status`` is the HTTP status that says so."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


class NoModelError(AgentError):
    """No model is active on this device (HTTP 503)."""

    status = 503


class DriftSink(Protocol):
    """What the service feeds every served batch to: :class:`agent.drift.DriftAccumulator`,
    thread-safe on its own; the agent's main closes its windows."""

    @property
    def rows(self) -> int: ...

    def add(self, inputs: np.ndarray, predicted: np.ndarray) -> None: ...

    def close_window(
        self, start: float, end: float, model_name: str, model_version: int, reference_sha256: str
    ) -> DriftSummary: ...


DriftFactory = Callable[[ReferenceProfile], DriftSink]


class BatchTap(Protocol):
    """Wants a model's served rows too (the update engine's shadow step). ``add`` is called
    under the model's lock with arrays that are reused afterwards: copy what you keep, and keep
    it short (copy into a bounded buffer; do the work elsewhere)."""

    def add(self, inputs: np.ndarray, predicted: np.ndarray) -> None: ...


class _BlockHandOver:
    """What both drift buffers share: the sink and taps a full block goes to."""

    sink: DriftSink | None
    taps: tuple[BatchTap, ...]
    fill: int
    limit: int

    def __init__(self, sink: DriftSink | None, limit: int = 256) -> None:
        self._setup(sink, limit)

    def _setup(self, sink: DriftSink | None, limit: int) -> None:
        self.sink = sink  # None: a buffer that only feeds taps (a model without drift)
        self.fill = 0  # rows held
        self.limit = limit
        self.taps = ()  # get each block after the sink
        self._sink_add: Callable[[np.ndarray, np.ndarray], None] | None = (
            None if sink is None else getattr(sink, "add_trusted", sink.add)
        )

    @property
    def rows(self) -> int:
        """Rows in the current window: the accumulator's and the ones still buffered here."""
        if self.sink is None:
            return 0
        return self.sink.rows + self.fill

    def add(self, inputs: np.ndarray, outputs: np.ndarray) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        raise NotImplementedError

    def _hand_over(self, inputs: np.ndarray, outputs: np.ndarray) -> None:
        predicted = outputs.argmax(1)
        if self._sink_add is not None:
            try:
                self._sink_add(inputs, predicted)
            except Exception:  # drift is a report about serving, never a reason to fail serving
                log.exception("the drift accumulator refused %d rows; not counted", len(inputs))
        for tap in self.taps:
            try:
                tap.add(inputs, predicted)
            except Exception:  # same: a tap observes serving, it never fails it
                log.exception("a batch tap refused %d rows; not passed on", len(inputs))


class DriftBuffer(_BlockHandOver):
    """Served batches on their way to the drift accumulator, handed over in blocks.

    The accumulator's ``add`` costs microseconds per call whatever the batch size (its checks,
    its lock, a copy into its block), which at batch 1 would be most of the agent's overhead.
    Here a served batch costs two ``tobytes`` copies kept in lists (measured cheaper on the hot
    path than ``ndarray.copy``, than appending to a ``bytearray`` through the buffer protocol,
    and about as cheap as keeping references, which would leave the caller unable to reuse its
    array). Once ``limit`` rows are held they are joined, viewed as arrays again and go to the
    sink in one call, with the predicted classes (the outputs' argmax) taken once for
    the block, through the sink's unchecked ``add_trusted`` where it has one (validated float32
    rows, argmax ids). Not thread-safe: the service uses it under the model's lock.
    :class:`NativeDriftBuffer` is the same with its rows copied in C into preallocated blocks.
    """

    def __init__(self, sink: DriftSink | None, limit: int = 256) -> None:
        self._setup(sink, limit)
        self.inputs: list[bytes] = []  # each held batch's float32 bytes
        self.outputs: list[bytes] = []  # and its outputs'

    def add(self, inputs: np.ndarray, outputs: np.ndarray) -> None:
        """Keep a copy of a served batch: float32 ``inputs`` [n, features] and ``outputs``
        [n, classes]; the caller may reuse both arrays afterwards."""
        n = inputs.shape[0]
        if n >= _DIRECT_ROWS:  # a batch this large is a block of its own: no copy into a buffer
            self.flush()
            self._hand_over(inputs, outputs)
            return
        self.inputs.append(inputs.tobytes())
        self.outputs.append(outputs.tobytes())
        self.fill += n
        if self.fill >= self.limit:
            self.flush()

    def flush(self) -> None:
        fill = self.fill
        if not fill:
            return
        inputs = np.frombuffer(b"".join(self.inputs), dtype=_F32).reshape(fill, -1)
        outputs = np.frombuffer(b"".join(self.outputs), dtype=_F32).reshape(fill, -1)
        self.inputs, self.outputs, self.fill = [], [], 0
        self._hand_over(inputs, outputs)


def _native_drift_buffer_class(native: Any) -> type[_BlockHandOver]:
    cls = _NATIVE_CLASSES.get(native)
    if cls is not None:
        return cls

    class NativeDriftBuffer(native.RowBlock, _BlockHandOver):
        """:class:`DriftBuffer` whose rows are copied into two preallocated blocks (float32
        inputs and outputs, ``limit + 127`` rows: a buffer below its limit takes any batch of
        fewer than 128 rows), by the extension's ``add_fast`` in the C predict path. The same
        blocks go to the sink as with :class:`DriftBuffer`."""

        _in_width: int  # the row block's fields (agent._fastpath.RowBlock)
        _out_width: int
        _capacity: int
        _direct: int
        _in_block: bytearray
        _out_block: bytearray

        def __init__(self, sink: DriftSink | None, limit: int = 256) -> None:
            self._setup(sink, limit)
            self._direct = _DIRECT_ROWS
            self._capacity = limit + _DIRECT_ROWS - 1

        def add(self, inputs: np.ndarray, outputs: np.ndarray) -> None:
            """Keep a copy of a served batch (the C predict copies most batches itself)."""
            if inputs.shape[0] >= _DIRECT_ROWS:  # a block of its own, as in DriftBuffer
                self.flush()
                self._hand_over(inputs, outputs)
                return
            if self.add_fast(inputs, outputs):
                return
            # the first batch (no blocks yet), or arrays add_fast does not read (another
            # dtype or layout): as float32 C-contiguous copies, into blocks of their widths
            x = np.ascontiguousarray(inputs, dtype=_F32)
            y = np.ascontiguousarray(outputs, dtype=_F32)
            if (x.shape[1], y.shape[1]) != (self._in_width, self._out_width):
                self.flush()
                self._in_width, self._out_width = x.shape[1], y.shape[1]
                self._in_block = bytearray(self._capacity * x.shape[1] * 4)
                self._out_block = bytearray(self._capacity * y.shape[1] * 4)
            if not self.add_fast(x, y):
                raise AssertionError("the drift block refused a float32 batch that fits it")

        def flush(self) -> None:
            fill = self.fill
            if not fill:
                return
            inputs = np.frombuffer(self._in_block, _F32, fill * self._in_width)
            outputs = np.frombuffer(self._out_block, _F32, fill * self._out_width)
            self.fill = 0
            # views of the blocks: the sink and taps copy what they keep (see BatchTap)
            self._hand_over(inputs.reshape(fill, -1), outputs.reshape(fill, -1))

    _NATIVE_CLASSES[native] = NativeDriftBuffer
    return NativeDriftBuffer


_NATIVE_CLASSES: dict[Any, type[_BlockHandOver]] = {}


def new_drift_buffer(sink: DriftSink | None, limit: int = 256) -> _BlockHandOver:
    """A drift buffer for a model's state: the C-backed one where the extension is in use."""
    native = fastpath.native()
    if native is None:
        return DriftBuffer(sink, limit)
    return _native_drift_buffer_class(native)(sink, limit)


class ModelState:
    """The mutable side of one loaded model, guarded by ``lock`` (held for microseconds)."""

    __slots__ = (
        "lock",
        "requests",
        "rows",
        "rejected",
        "errors",
        "latency",
        "in_flight",
        "retiring",
        "drift",
    )

    def __init__(self, drift: _BlockHandOver | None) -> None:
        self.lock = threading.Lock()
        self.requests = 0  # served batches
        self.rows = 0
        self.rejected = 0  # batches refused for bad input (4xx)
        self.errors = 0  # batches the runtime failed on (5xx)
        self.latency: Recorder = new_recorder()
        self.in_flight = 0
        self.retiring = False
        self.drift = drift


def new_model_state(drift: _BlockHandOver | None) -> ModelState:
    """A model's state: the extension's ``ModelState`` (the same fields, readable from C, and
    a lock C takes without a call) where it is in use, else :class:`ModelState`."""
    native = fastpath.native()
    if native is None:
        return ModelState(drift)
    state: ModelState = native.ModelState(native.Lock(), new_recorder(), drift)
    return state


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """One model ready to serve: swapped as a whole, never modified in place."""

    installed: InstalledRelease
    runtime: Runtime
    drift: DriftSink | None
    loaded_at: float  # wall clock
    state: ModelState = field(init=False)
    n_features: int = field(init=False)
    run: Callable[[np.ndarray], np.ndarray] = field(init=False)
    labels: tuple[str, int, tuple[str, ...]] = field(init=False)  # an InferenceResult's tail

    def __post_init__(self) -> None:
        buffer = None if self.drift is None else new_drift_buffer(self.drift)
        object.__setattr__(self, "state", new_model_state(buffer))
        object.__setattr__(self, "n_features", len(self.installed.release.feature_names))
        object.__setattr__(self, "run", self.runtime.run)  # bound once: called per request
        r = self.installed.release
        object.__setattr__(self, "labels", (r.name, r.version, r.class_names))

    @property
    def release(self) -> Release:
        return self.installed.release


def load_model(
    installed: InstalledRelease,
    threads: int,
    drift_factory: DriftFactory | None = None,
    now: float | None = None,
    loader: RuntimeLoader = load_runtime,
) -> LoadedModel:
    """Load a slot's artifact in its runtime (and a drift accumulator on its reference profile).

    ``loader`` turns the file into a runtime (a simulator shares one runtime per artifact).
    Raises :class:`~agent.errors.ModelLoadError` when the artifact does not fit the release's
    feature and class counts.
    """
    release = installed.release
    path = installed.artifact_path
    drift = None
    if drift_factory is not None:
        reference = ReferenceProfile.from_json(installed.file(release.reference).read_bytes())
        if reference.n_features != len(release.feature_names):
            raise ModelLoadError(
                installed.file(release.reference),
                f"reference profile has {reference.n_features} features, the release "
                f"{len(release.feature_names)}; reinstall the model",
            )
        drift = drift_factory(reference)
    runtime = loader(path, release.runtime, threads)
    widths = (runtime.input.shape[1], runtime.output.shape[1])
    if widths != (len(release.feature_names), len(release.class_names)):
        runtime.close()
        raise ModelLoadError(
            path,
            f"model takes {widths[0]} features and gives {widths[1]} outputs, release.json says "
            f"{len(release.feature_names)} and {len(release.class_names)}; reinstall the model",
        )
    return LoadedModel(installed, runtime, drift, time.time() if now is None else now)


class InferenceResult(NamedTuple):
    """One served batch (a NamedTuple: built on every request, it must be cheap)."""

    outputs: np.ndarray  # (rows, classes) float32
    model_name: str
    model_version: int
    class_names: tuple[str, ...]

    @property
    def predicted(self) -> np.ndarray:
        """The predicted class id of each row (the outputs' argmax)."""
        return self.outputs.argmax(1)

    @property
    def classes(self) -> list[str]:
        """The predicted class name of each row."""
        names = self.class_names
        return [names[i] for i in self.predicted.tolist()]


@dataclass(frozen=True)
class InferenceStats:
    """Totals since the agent started (all models) and the active model's recent latency."""

    requests: int
    rows: int
    rejected: int
    errors: int
    latency_count: int
    latency_seconds_total: float
    latency_buckets: tuple[tuple[float, int], ...]  # cumulative, Prometheus ``le``
    p50: float | None  # seconds, over the active model's recent requests
    p95: float | None
    p99: float | None


def _bad_rows(mask: np.ndarray) -> str:
    rows = np.flatnonzero(mask)
    named = ", ".join(str(r) for r in rows[:_MAX_ROWS_NAMED].tolist())
    more = f" and {len(rows) - _MAX_ROWS_NAMED} more" if len(rows) > _MAX_ROWS_NAMED else ""
    return f"row{'s' if len(rows) > 1 else ''} {named}{more}"


def batch_from_json(inputs: object) -> np.ndarray:
    """The ``inputs`` of a JSON request (a list of rows of numbers) as an array.

    Refuses (400) anything that is not a non-empty list of equally long lists of numbers:
    strings, booleans and nulls are not numbers here.
    """
    if not isinstance(inputs, list) or not inputs:
        raise InputError(
            400, '"inputs" must be a non-empty list of rows, e.g. {"inputs": [[0.1, 0.2, ...]]}'
        )
    try:
        # map/set run in C: a type check of every value costs far less than parsing the JSON
        if set(map(type, chain.from_iterable(inputs))) <= _NUMBER_TYPES:
            return np.asarray(inputs, dtype=_F32)
    except (TypeError, ValueError):  # a row that is not a list; ragged rows
        pass
    for i, row in enumerate(inputs):
        if not isinstance(row, list):
            raise InputError(400, f'"inputs" row {i} is not a list of numbers')
        for j, value in enumerate(row):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InputError(
                    400,
                    f'"inputs" row {i} column {j} is {type(value).__name__} {value!r}; only '
                    "numbers are allowed",
                )
    lengths = sorted({len(row) for row in inputs if isinstance(row, list)})
    raise InputError(400, f'"inputs" rows have different lengths {lengths}; send equal rows')


class InferenceService:
    """Serves the active model; safe to call from many threads."""

    def __init__(self, nan_policy: str = "reject", max_rows: int = 4096) -> None:
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy {nan_policy!r}: use one of {', '.join(NAN_POLICIES)}")
        self.nan_policy = nan_policy
        self.max_rows = max_rows
        self._model: LoadedModel | None = None
        self._lock = threading.Lock()  # swaps, retired totals, counts without a model
        self._no_model_count = 0
        self._reject_nan = nan_policy == "reject"
        self._retired = [0, 0, 0, 0, 0]  # requests, rows, rejected, errors, latency count
        self._retired_seconds = 0.0
        self._retired_buckets = [0] * len(BUCKETS)
        native = fastpath.native()
        # the C predict serves the common request and hands the rest to the Python one
        self._native: Any = None
        if native is not None:
            self._native = native.Predictor(
                InferenceService.predict.__get__(self),
                InferenceResult,
                InputError,
                max_rows,
                self._reject_nan,
            )
            self.predict = self._native  # type: ignore[method-assign]

    # --- the model ---------------------------------------------------------------------------

    def current(self) -> LoadedModel | None:
        return self._model

    def swap(self, model: LoadedModel | None) -> LoadedModel | None:
        """Make ``model`` the one new requests get; returns the previous one (still open —
        pass it to :meth:`retire`)."""
        with self._lock:
            old, self._model = self._model, model
            if self._native is not None:
                if model is None:
                    self._native.set_model(None)
                else:
                    self._native.set_model(
                        model, model.state, model.run, model.labels, model.n_features
                    )
        return old

    def retire(self, model: LoadedModel, timeout: float = 10.0) -> bool:
        """Close a swapped-out model once its in-flight requests are done (at most ``timeout``
        seconds); its counts join the totals and its buffered drift rows reach its accumulator.
        False if requests were still running at the timeout."""
        st = model.state
        with st.lock:
            st.retiring = True
        deadline = time.monotonic() + timeout
        while st.in_flight and time.monotonic() < deadline:
            time.sleep(0.001)  # swaps are rare: polling keeps the hot path free of notify
        with st.lock:
            drained = not st.in_flight
            if st.drift is not None:
                st.drift.flush()
            stats = st.latency.stats()
            with self._lock:
                for i, v in enumerate((st.requests, st.rows, st.rejected, st.errors, stats.count)):
                    self._retired[i] += v
                self._retired_seconds += stats.total_seconds
                for i, (_, c) in enumerate(stats.buckets):
                    self._retired_buckets[i] += c
            st.requests = st.rows = st.rejected = st.errors = 0
            st.latency = new_recorder()
        model.runtime.close()
        return drained

    def close(self, timeout: float = 10.0) -> None:
        """Stop serving and close the model's runtime."""
        old = self.swap(None)
        if old is not None:
            self.retire(old, timeout)

    def add_tap(self, model: LoadedModel, tap: BatchTap) -> None:
        """From now on also hand ``model``'s served rows to ``tap``, in the drift buffer's
        blocks (a buffer is added for a model without drift accumulation). Rows already
        buffered go to the accumulator alone: they were served before the tap."""
        st = model.state
        with st.lock:
            if st.drift is None:
                st.drift = new_drift_buffer(None)
            else:
                st.drift.flush()
            st.drift.taps = (*st.drift.taps, tap)

    def flush_taps(self, model: LoadedModel) -> None:
        """Hand ``model``'s buffered rows on now (to its accumulator and taps)."""
        st = model.state
        with st.lock:
            if st.drift is not None:
                st.drift.flush()

    def remove_tap(self, model: LoadedModel, tap: BatchTap) -> None:
        """Stop handing ``model``'s rows to ``tap`` (a tap-only buffer goes again)."""
        st = model.state
        with st.lock:
            buffer = st.drift
            if buffer is None:
                return
            buffer.flush()
            buffer.taps = tuple(t for t in buffer.taps if t is not tap)
            if buffer.sink is None and not buffer.taps:
                st.drift = None

    def drift_rows(self, model: LoadedModel | None = None) -> int:
        """Rows in the current drift window of ``model`` (default: the active one; 0 without)."""
        model = model or self._model
        if model is None or model.state.drift is None:
            return 0
        with model.state.lock:
            return model.state.drift.rows

    def close_drift_window(
        self, start: float, end: float, model: LoadedModel | None = None
    ) -> DriftSummary | None:
        """Close the drift window ``[start, end]`` of ``model`` (default: the active one) and
        start a new one; None when there is no model or it has no accumulator."""
        model = model or self._model
        if model is None or model.drift is None or model.state.drift is None:
            return None
        with model.state.lock:
            model.state.drift.flush()
        r = model.release
        # scored outside the model's lock: requests keep flowing (into the next window)
        return model.drift.close_window(start, end, r.name, r.version, r.files[r.reference])

    # --- serving ------------------------------------------------------------------------------

    def _no_model(self) -> NoModelError:
        with self._lock:
            self._no_model_count += 1
        return NoModelError(
            "no model is installed on this device yet; install one with `edge-agent model "
            "install BUNDLE_DIR`, or wait for the fleet's first release"
        )

    def _validate_fully(self, model: LoadedModel, batch: np.ndarray) -> np.ndarray:
        if not isinstance(batch, np.ndarray):
            raise InputError(400, f"batch is a {type(batch).__name__}; pass rows of numbers")
        n = model.n_features
        shape = batch.shape
        if len(shape) != 2 or shape[1] != n:
            raise InputError(
                400,
                f"inputs have shape {list(shape)}; model {model.release.name} "
                f"v{model.release.version} takes rows of {n} features: [rows, {n}]",
            )
        if not shape[0]:
            raise InputError(400, "inputs hold no rows; send at least one row")
        if shape[0] > self.max_rows:
            raise InputError(
                413,
                f"batch of {shape[0]} rows is over the limit of {self.max_rows}; "
                "split it into smaller batches",
            )
        if batch.dtype is not _F32:
            if batch.dtype.kind not in "fiu":
                raise InputError(400, f"inputs are {batch.dtype}, not numbers")
            batch = batch.astype(_F32)
        # the sum is finite iff every value is (one reduction); an overflowing sum of finite
        # values is told apart by the exact check, which also names the rows
        if self._reject_nan and not math.isfinite(_SUM(batch, axis=None)):
            bad = ~np.isfinite(batch).all(axis=1)
            if bad.any():
                raise InputError(
                    422,
                    f"{_bad_rows(bad)} of the batch hold NaN or infinite values, which this "
                    "device's policy rejects; drop or impute them before sending",
                )
        return batch

    def predict(self, batch: np.ndarray, owned: bool = False) -> InferenceResult:
        """Run ``batch`` [rows, features] through the active model. ``owned`` (the caller hands
        the array over) is accepted and changes nothing: the drift feed copies every batch's
        bytes, which costs less than keeping references would (see :class:`DriftBuffer`)."""
        start = _clock()
        while True:
            model = self._model
            if model is None:
                raise self._no_model()
            st = model.state
            with st.lock:
                if not st.retiring:
                    st.in_flight += 1
                    break
            # swapped out a moment ago: the new model is already in self._model
        try:
            # The common request inline (a method call is a visible share of a batch-1 call):
            # a float32 ndarray of the right width and size, finite (or allowed not to be).
            # Everything else, a failed finiteness check included, takes the full checks.
            x = batch
            shape = batch.shape if batch.__class__ is _NDARRAY and batch.dtype is _F32 else ()
            if not (
                len(shape) == 2
                and shape[1] == model.n_features
                and 0 < shape[0] <= self.max_rows
                and (
                    not self._reject_nan
                    # float64 sum of float32 values cannot overflow: finite iff all are; for
                    # a few values a Python sum beats any numpy call, for more a BLAS dot
                    # (its float32 sum of squares may overflow: the full check tells apart)
                    or math.isfinite(
                        sum(batch.ravel().tolist())
                        if batch.size <= _SMALL_BATCH_VALUES
                        else _DOT(batch, batch)
                    )
                )
            ):
                x = self._validate_fully(model, batch)
            outputs = model.run(x)
        except InputError:
            with st.lock:
                st.rejected += 1
                st.in_flight -= 1
            raise
        except BaseException:
            with st.lock:
                st.errors += 1
                st.in_flight -= 1
            raise
        with st.lock:
            st.requests += 1
            st.rows += x.shape[0]
            st.in_flight -= 1
            if st.drift is not None:
                st.drift.add(x, outputs)
            st.latency.record(_clock() - start)
        # tuple.__new__ directly: a NamedTuple's own __new__ is a Python function
        return _new_tuple(InferenceResult, (outputs, *model.labels))

    def predict_json(self, inputs: object) -> InferenceResult:
        """``predict`` for the ``inputs`` of a JSON request (see :func:`batch_from_json`)."""
        try:
            batch = batch_from_json(inputs)
        except InputError:
            model = self._model
            if model is not None:
                with model.state.lock:
                    model.state.rejected += 1
            raise
        return self.predict(batch)

    # --- figures ------------------------------------------------------------------------------

    def stats(self) -> InferenceStats:
        model = self._model
        # lock order as in retire(): the model's, then the service's, so a model retired
        # meanwhile is counted exactly once
        st = model.state if model is not None else new_model_state(None)
        with st.lock, self._lock:
            requests, rows, rejected, errors, count = self._retired
            seconds = self._retired_seconds
            buckets = list(self._retired_buckets)
            rejected += self._no_model_count
            requests += st.requests
            rows += st.rows
            rejected += st.rejected
            errors += st.errors
            latency: LatencyStats | None = st.latency.stats() if model is not None else None
        if latency is not None:
            count += latency.count
            seconds += latency.total_seconds
            buckets = [b + c for b, (_, c) in zip(buckets, latency.buckets, strict=True)]
        return InferenceStats(
            requests=requests,
            rows=rows,
            rejected=rejected,
            errors=errors,
            latency_count=count,
            latency_seconds_total=seconds,
            latency_buckets=tuple(zip(BUCKETS, buckets, strict=True)),
            p50=latency.p50 if latency else None,
            p95=latency.p95 if latency else None,
            p99=latency.p99 if latency else None,
        )
