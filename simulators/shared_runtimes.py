"""Model runtimes shared by the agents of one simulator process, and a faulty one.

A device loads its model in its own process; a simulator hosting hundreds of agents in one process
must not load the same 6 KiB model (and its runtime's thread pools) hundreds of times.
:class:`SharedRuntimes` is an :data:`agent.runtimes.RuntimeLoader` that loads each artifact once
per ``(sha256, runtime, threads)`` and hands every caller a borrowed view of it: ``close()`` on
a view does nothing, the cache closes the runtimes when the process is done. Sharing is safe:
ONNX Runtime sessions are thread-safe for ``run``, and :class:`agent.runtimes.LiteRtRuntime`
runs its (not thread-safe) interpreter under its own lock.

:class:`BrokenAccelerator` is a loader for a device whose hardware corrupts the outputs of every
model but the ones it was shipped with: the agent's real health check (golden outputs) then
fails on any new release, and the device keeps serving its factory model.

It does not choose artifacts or verify them (the agent does, as on a device).
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np

from agent.runtimes import Runtime, RuntimeLoader, load_runtime
from protocol.bundle import TensorSpec


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class _Borrowed:
    """One agent's view of a shared runtime: its own path, a ``close`` that does nothing."""

    def __init__(self, runtime: Runtime, path: Path) -> None:
        self._runtime = runtime
        self._path = Path(path)
        self._run = getattr(runtime, "run", runtime.predict)

    @property
    def name(self) -> str:
        return self._runtime.name

    @property
    def path(self) -> Path:
        return self._path

    @property
    def input(self) -> TensorSpec:
        return self._runtime.input

    @property
    def output(self) -> TensorSpec:
        return self._runtime.output

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self._runtime.predict(batch)

    def run(self, batch: np.ndarray) -> np.ndarray:
        out: np.ndarray = self._run(batch)
        return out

    def close(self) -> None:
        """The cache owns the runtime."""


class SharedRuntimes:
    """A :data:`~agent.runtimes.RuntimeLoader` that loads each artifact once (see the module
    docstring). ``loads`` counts the runtimes really loaded, ``borrows`` the calls."""

    def __init__(self, load: RuntimeLoader = load_runtime) -> None:
        self._load = load
        self._lock = threading.Lock()
        self._runtimes: dict[tuple[str, str, int], Runtime] = {}
        self.loads = 0
        self.borrows = 0

    def __call__(self, path: Path, runtime: str, threads: int) -> Runtime:
        key = (file_sha256(path), runtime, threads)
        with self._lock:  # loads are rare and short: one at a time keeps it simple
            shared = self._runtimes.get(key)
            if shared is None:
                shared = self._runtimes[key] = self._load(path, runtime, threads)
                self.loads += 1
            self.borrows += 1
        return _Borrowed(shared, path)

    def close(self) -> None:
        with self._lock:
            runtimes, self._runtimes = list(self._runtimes.values()), {}
        for runtime in runtimes:
            runtime.close()


class _Corrupted(_Borrowed):
    """A runtime whose outputs are off by ``error`` (its ``close`` closes it: it is not shared)."""

    def __init__(self, runtime: Runtime, error: float) -> None:
        super().__init__(runtime, runtime.path)
        self._error = np.float32(error)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self._runtime.predict(batch) + self._error

    def run(self, batch: np.ndarray) -> np.ndarray:
        out: np.ndarray = self._run(batch) + self._error
        return out

    def close(self) -> None:
        self._runtime.close()


class BrokenAccelerator:
    """A loader whose runtimes add ``error`` to every output of any artifact not in ``good``
    (sha256 digests: the models the device shipped with)."""

    def __init__(self, load: RuntimeLoader, good: frozenset[str], error: float = 0.5) -> None:
        self._load = load
        self._good = good
        self._error = error

    def __call__(self, path: Path, runtime: str, threads: int) -> Runtime:
        loaded = self._load(path, runtime, threads)
        if file_sha256(path) in self._good:
            return loaded
        return _Corrupted(loaded, self._error)
