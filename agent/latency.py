"""Latency recording cheap enough for the inference hot path.

:class:`LatencyRecorder` keeps the last ``window`` latencies in a ring buffer (quantiles of
recent traffic: p50/p95/p99 for the health page, the heartbeat and an update's trial) and a
cumulative fixed-bucket histogram since start (Prometheus' ``_bucket``/``_sum``/``_count``).
Recording is a list store and an index bump; samples are binned into the histogram (and
counted and summed) when the ring wraps or someone reads the figures, and sorting happens only
on a read. Not thread-safe on its own: the caller records under its lock.

:func:`new_recorder` gives the recorder the inference service uses: where :mod:`agent.fastpath`
has the C extension, one whose ``record`` (and the service's C predict) stores into the ring in
C; :class:`LatencyRecorder` is its pure-Python twin, the same in every figure.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

from agent import fastpath

# upper bounds in seconds (Prometheus ``le``); the last, implicit bucket is +Inf
BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


@dataclass(frozen=True)
class LatencyStats:
    """A read of a :class:`LatencyRecorder`; quantiles are None until something was recorded."""

    count: int  # since start
    total_seconds: float  # since start
    buckets: tuple[tuple[float, int], ...]  # (le, cumulative count), +Inf excluded (= count)
    window: int  # how many recent samples the quantiles are over
    p50: float | None
    p95: float | None
    p99: float | None


def quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of an ascending, non-empty list."""
    index = min(len(sorted_values) - 1, max(0, int(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


class Recorder:
    """The read side of a recorder, shared by both record sides: a subclass's ``record`` fills
    ``_ring[_next]``, bumps ``_next`` and calls ``_fold(_size)`` when the ring wraps."""

    _ring: list[float]
    _size: int
    _next: int
    _folded: int  # ring[_folded:_next] are not in the histogram, count and total yet

    def __init__(self, window: int = 2048) -> None:
        self._setup(window)

    def _setup(self, window: int) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self._ring = [0.0] * window
        self._size = window
        self._next = 0
        self._folded = 0
        self._count = 0
        self._total = 0.0
        self._buckets = [0] * (len(BUCKETS) + 1)

    def record(self, seconds: float) -> None:
        raise NotImplementedError

    def _fold(self, end: int) -> None:
        new = self._ring[self._folded : end]
        for seconds in new:
            self._buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
        self._count += len(new)
        self._total += sum(new)
        self._folded = end

    def stats(self) -> LatencyStats:
        self._fold(self._next)
        n = min(self._count, len(self._ring))
        recent = sorted(self._ring[:n]) if n else []
        cumulative = []
        running = 0
        for le, c in zip(BUCKETS, self._buckets, strict=False):
            running += c
            cumulative.append((le, running))
        return LatencyStats(
            count=self._count,
            total_seconds=self._total,
            buckets=tuple(cumulative),
            window=n,
            p50=quantile(recent, 0.50) if n else None,
            p95=quantile(recent, 0.95) if n else None,
            p99=quantile(recent, 0.99) if n else None,
        )


class LatencyRecorder(Recorder):
    """Recent latencies and a histogram since start, recorded in Python."""

    def record(self, seconds: float) -> None:
        i = self._next
        self._ring[i] = seconds
        i += 1
        if i == self._size:  # the ring wraps: bin what it holds before it is overwritten
            self._fold(i)
            i = self._folded = 0
        self._next = i


_native_class: dict[Any, type[Recorder]] = {}


def _native_recorder_class(native: Any) -> type[Recorder]:
    """The recorder whose ``record`` is the extension's (the same steps, in C)."""
    cls = _native_class.get(native)
    if cls is None:

        class NativeLatencyRecorder(native.LatencyRing, Recorder):
            """:class:`LatencyRecorder` with its ``record`` in C."""

        cls = _native_class[native] = NativeLatencyRecorder
    return cls


def new_recorder(window: int = 2048) -> Recorder:
    """A latency recorder: the C-backed one where :func:`agent.fastpath.native` has it."""
    native = fastpath.native()
    if native is None:
        return LatencyRecorder(window)
    return _native_recorder_class(native)(window)
