"""On-device drift accumulation: every prediction's inputs and output, binned into window counts.

:class:`DriftAccumulator` keeps, for the active model's reference profile, the per-bin counts,
sums, sums of squares and missing counts of each input feature and the predicted-class counts of
the current window. Raw inputs are copied into a preallocated block only until the block is
binned; they are never kept beyond that, stored or sent. At the window's end
:meth:`DriftAccumulator.close_window` returns a scored :class:`protocol.drift.DriftSummary` and
starts a new window; :class:`WindowPolicy` says when that is.

How binning stays fast (no per-sample Python loop): small batches are buffered into a
preallocated float32 block; a full block (or a flush) is binned in one vectorised pass over all
features. The reference's edges are rounded *up* to float32 (the smallest float32 not below each
edge), so for float32 values ``x >= edge32`` is exactly ``x >= edge``, and a value's bin is the
number of edges it reaches (one ``>=`` pass per edge rank over the whole block), minus one where
it equals the last edge (the binning rule of :mod:`protocol.reference`). Per-feature offsets turn
bins into slots of one flat array (each feature has one extra slot for NaN/inf), so a single
``np.bincount`` updates every feature. Values are binned as float32, the models' input type.
Where :func:`agent.fastpath.native` has the C extension, its ``bin_counts`` does the counting
part (the same comparisons in one pass per feature, the same integer counts, ~5x faster); sums
and sums of squares stay numpy's in both.

This module does not decide when to publish, does not publish, and does not persist counts; the
agent's service loop does that with the summary it gets back.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass

import numpy as np

from agent import fastpath
from protocol.drift import (
    DriftSummary,
    DriftThresholds,
    WindowCounts,
    check_predicted,
    summarize,
)
from protocol.errors import DriftError
from protocol.reference import ReferenceProfile

log = logging.getLogger(__name__)

DEFAULT_BLOCK_ROWS = 1024  # ~0.7 MB of scratch for 32 features; larger blocks bin a bit faster


@dataclass(frozen=True)
class WindowPolicy:
    """When a drift window closes.

    A window closes once it is at least ``window_seconds`` old *and* holds ``min_rows`` rows (the
    verdict's floors assume ~1,000 rows); a quiet device still reports once the window is
    ``max_window_seconds`` old, with however many rows it has, and the verdict's bounds widen to
    match.

    Privacy floor: no window of fewer than ``min_report_rows`` rows ever leaves the device (a
    one-row window's per-feature sums *are* that row's inputs). A quiet device's window stays
    open past ``max_window_seconds`` until it has that many; a window cut short by a model
    change or by the agent stopping (:meth:`may_report` false) is dropped instead of sent.
    """

    window_seconds: float = 300.0
    min_rows: int = 1000
    max_window_seconds: float = 86400.0
    min_report_rows: int = 20

    def __post_init__(self) -> None:
        if not (math.isfinite(self.window_seconds) and self.window_seconds > 0):
            raise DriftError(f"window_seconds={self.window_seconds}: use a positive duration")
        if self.min_rows < 1:
            raise DriftError(f"min_rows={self.min_rows}: use at least 1 row")
        if self.min_report_rows < 2:
            raise DriftError(
                f"min_report_rows={self.min_report_rows}: use at least 2 rows (one row's sums "
                "are its raw inputs)"
            )
        if not self.max_window_seconds >= self.window_seconds:
            raise DriftError(
                f"max_window_seconds={self.max_window_seconds} must be >= window_seconds="
                f"{self.window_seconds}"
            )

    def may_report(self, rows: int) -> bool:
        """Whether a window of ``rows`` rows may be sent at all (the privacy floor)."""
        return rows >= self.min_report_rows

    def should_close(self, now: float, window_start: float, rows: int) -> bool:
        """True when the window that began at ``window_start`` and holds ``rows`` should close."""
        age = now - window_start
        if not self.may_report(rows):
            return False
        if age >= self.max_window_seconds:
            return True
        return age >= self.window_seconds and rows >= self.min_rows


class DriftAccumulator:
    """Window counts of one reference profile; ``add`` is thread-safe.

    One accumulator serves one active model: when the model (and its reference profile) changes,
    close the window and make a new accumulator.
    """

    def __init__(
        self,
        reference: ReferenceProfile,
        block_rows: int = DEFAULT_BLOCK_ROWS,
        thresholds: DriftThresholds | None = None,
    ) -> None:
        if block_rows < 1:
            raise DriftError(f"block_rows={block_rows}: use at least 1 (default 1024)")
        reference.validate()
        self.reference = reference
        self.thresholds = thresholds or DriftThresholds()
        self.block_rows = block_rows
        self._lock = threading.Lock()
        f = reference.n_features
        self._n_features = f
        self._n_classes = len(reference.classes)
        if f == 0 or self._n_classes == 0:
            raise DriftError("the reference profile has no features or no classes")
        self._bins = tuple(len(ft.edges) + 1 for ft in reference.features)

        # edge ranks x features, padded with +inf (never reached by a finite value)
        k = max(len(ft.edges) for ft in reference.features)
        self._edges32 = np.full((k, f), np.inf, dtype=np.float32)
        self._last32 = np.full(f, np.nan, dtype=np.float32)  # NaN never equals anything
        for j, ft in enumerate(reference.features):
            e = np.asarray(ft.edges, dtype=np.float64)
            self._edges32[: len(e), j] = _ceil_float32(e)
            with np.errstate(over="ignore"):
                last = np.float32(e[-1])
            if float(last) == e[-1]:
                self._last32[j] = last  # only a representable last edge can be equalled

        # slots: a feature's bins, then its missing slot; offsets index the flat slot array
        slots = np.asarray(self._bins) + 1
        self._offsets = np.zeros(f, dtype=np.intp)
        np.cumsum(slots[:-1], out=self._offsets[1:])
        self._missing_slot = self._offsets + slots - 1
        self._bin_slots = np.concatenate(
            [np.arange(o, o + b) for o, b in zip(self._offsets, self._bins, strict=True)]
        )
        self._n_slots = int(slots.sum())
        # the extension's bin_counts needs ascending edges (ceil keeps the reference's order)
        ascending = bool(np.all(self._edges32[1:] >= self._edges32[:-1]))
        self._native = fastpath.native() if k <= 255 and ascending else None
        self._offsets64 = self._offsets.astype(np.int64)  # intp is 32 bits on armv7l
        self._missing64 = self._missing_slot.astype(np.int64)

        # the block buffer (rows x features: a served row is one contiguous store) and the
        # scratch arrays of one binning pass, which runs transposed (features x rows): each
        # comparison then broadcasts one edge over a long contiguous row, not a short one
        r = block_rows
        self._block = np.empty((r, f), dtype=np.float32)
        self._block_pred = np.empty(r, dtype=np.int64)
        self._fill = 0
        self._xt = np.empty((f, r), dtype=np.float32)
        self._ge = np.empty((f, r), dtype=np.bool_)
        self._nonfinite = np.empty((f, r), dtype=np.bool_)
        self._rank = np.empty((f, r), dtype=np.int8 if k < 127 else np.int16)
        self._slot = np.empty((f, r), dtype=np.intp)
        self._x64 = np.empty((f, r), dtype=np.float64)
        self._ones = np.ones(r, dtype=np.float64)
        # the same per-feature constants as columns, to broadcast along a transposed row
        self._edges_col = np.ascontiguousarray(self._edges32[:, :, None])  # ranks x f x 1
        self._last_col = self._last32[:, None]
        self._offsets_col = self._offsets[:, None]
        self._missing_col = self._missing_slot[:, None]

        # the window's totals
        self._slot_counts = np.zeros(self._n_slots, dtype=np.int64)
        self._sums = np.zeros(f, dtype=np.float64)
        self._sumsqs = np.zeros(f, dtype=np.float64)
        self._class_counts = np.zeros(self._n_classes, dtype=np.int64)
        self._rows = 0

    @property
    def rows(self) -> int:
        """Rows added to the current window (buffered ones included)."""
        return self._rows

    def add(self, inputs: np.ndarray, predicted: np.ndarray) -> None:
        """Add a batch: ``inputs`` [n, features] (binned as float32) and class ids [n].

        Refuses a batch of the wrong shape or with class ids outside the reference's classes
        (:class:`DriftError`) before touching the counts, so a refused batch leaves no trace.
        """
        x = np.asarray(inputs)
        if x.ndim != 2 or x.shape[1] != self._n_features:
            raise DriftError(
                f"inputs have shape {x.shape}, expected [n, {self._n_features}] as in the "
                "active model's reference profile"
            )
        if x.dtype.kind not in "fiu":
            raise DriftError(f"inputs must be numbers, got dtype {x.dtype}")
        pred = np.asarray(predicted)
        check_predicted(pred, x.shape[0], self._n_classes)
        self.add_trusted(x, pred)

    def add_trusted(self, inputs: np.ndarray, predicted: np.ndarray) -> None:
        """``add`` without its checks, for a caller that made both arrays itself: ``inputs``
        a numeric ndarray [n, features], ``predicted`` integer class ids [n] within the
        reference's classes (the inference service's own argmax). Wrong arrays here corrupt the
        window's counts or raise from numpy; anything else goes through :meth:`add`."""
        x, pred = inputs, predicted
        n = x.shape[0]
        with self._lock:
            fill = self._fill
            if fill + n < self.block_rows:  # the common case: fits in the block, no binning
                self._block[fill : fill + n] = x
                self._block_pred[fill : fill + n] = pred
                self._fill = fill + n
                self._rows += n
                return
            done = 0
            while done < n:  # one iteration per block, not per sample
                take = min(n - done, self.block_rows - self._fill)
                self._block[self._fill : self._fill + take] = x[done : done + take]
                self._block_pred[self._fill : self._fill + take] = pred[done : done + take]
                self._fill += take
                done += take
                if self._fill == self.block_rows:
                    self._bin_block()
            self._rows += n

    def flush(self) -> None:
        """Bin the buffered rows now (``close_window`` does this itself)."""
        with self._lock:
            self._bin_block()

    def close_window(
        self,
        start: float,
        end: float,
        model_name: str,
        model_version: int,
        reference_sha256: str,
    ) -> DriftSummary:
        """Flush, score the window against the reference, and start a new, empty window."""
        with self._lock:
            self._bin_block()
            counts = WindowCounts(
                model_name=model_name,
                model_version=model_version,
                reference_sha256=reference_sha256,
                start=start,
                end=end,
                n=self._rows,
                feature_names=tuple(ft.name for ft in self.reference.features),
                bins=self._bins,
                counts=self._slot_counts[self._bin_slots],
                sums=self._sums,
                sumsqs=self._sumsqs,
                missing=self._slot_counts[self._missing_slot],
                class_counts=self._class_counts,
            )  # copies the arrays, so resetting below leaves it intact
            self._slot_counts[:] = 0
            self._sums[:] = 0.0
            self._sumsqs[:] = 0.0
            self._class_counts[:] = 0
            self._rows = 0
        summary = summarize(counts, self.reference, self.thresholds)
        log.debug(
            "drift window closed: n=%d drifted=%s features=%s",
            counts.n,
            summary.verdict.drifted,
            summary.verdict.drifted_features,
        )
        return summary

    def _bin_block(self) -> None:
        # caller holds the lock
        r = self._fill
        if r == 0:
            return
        x = self._xt[:, :r]
        np.copyto(x, self._block[:r].T)  # features x rows: ~15% faster binning than row-major
        nonfinite = self._nonfinite[:, :r]
        np.isfinite(x, out=nonfinite)
        np.logical_not(nonfinite, out=nonfinite)
        if self._native is not None:
            self._native.bin_counts(
                self._xt,
                r,
                self._edges32,
                self._last32,
                self._offsets64,
                self._missing64,
                self._slot_counts,
            )
        else:
            self._count_slots(x, nonfinite)

        x64 = self._x64[:, :r]
        np.copyto(x64, x)
        np.copyto(x64, 0.0, where=nonfinite)
        ones = self._ones[:r]
        self._sums += x64 @ ones
        np.multiply(x64, x64, out=x64)
        self._sumsqs += x64 @ ones

        self._class_counts += np.bincount(self._block_pred[:r], minlength=self._n_classes)
        self._fill = 0

    def _count_slots(self, x: np.ndarray, nonfinite: np.ndarray) -> None:
        """Add the block's bin counts in numpy (``bin_counts`` of the extension does the same)."""
        r = x.shape[1]
        ge, rank, slot = self._ge[:, :r], self._rank[:, :r], self._slot[:, :r]
        ge_int = ge.view(np.int8)
        edges = self._edges_col
        # rank = number of edges reached; NaN reaches none, +inf all (both go to missing below)
        np.greater_equal(x, edges[0], out=ge)
        rank[...] = ge_int
        for e in edges[1:]:
            np.greater_equal(x, e, out=ge)
            np.add(rank, ge_int, out=rank)
        np.equal(x, self._last_col, out=ge)  # x == last edge: last inner bin, not overflow
        np.subtract(rank, ge_int, out=rank)
        np.add(rank, self._offsets_col, out=slot)
        np.copyto(slot, self._missing_col, where=nonfinite)
        self._slot_counts += np.bincount(slot.ravel(), minlength=self._n_slots)


def _ceil_float32(edges: np.ndarray) -> np.ndarray:
    """The smallest float32 >= each edge, so ``float32 x >= result`` iff ``x >= edge``."""
    with np.errstate(over="ignore"):
        e32 = edges.astype(np.float32)  # nearest; may round down (or overflow to +-inf)
    down = e32.astype(np.float64) < edges
    e32[down] = np.nextafter(e32[down], np.float32(np.inf))
    return e32
