"""Whether the predict path's C helpers (:mod:`agent._fastpath`) are used in this process.

The extension is built by ``pip install`` (``setup.py``) where a C compiler and the Python
headers exist; without them the install goes on and every piece keeps its pure-Python twin
(:mod:`agent.inference`, :mod:`agent.latency`, :mod:`agent.runtimes`), which behaves the same.
:func:`native` says which is in use: the extension once it has checked that it reads numpy
arrays the way numpy lays them out, else None. ``EDGEFLEET_PURE_PYTHON=1`` in the environment
forces the pure-Python path (to compare, or to rule the extension out).

Objects choose once, when they are built (a model's state and runtime at load, a service at
construction), so a process never mixes the two within one model. This module does nothing
else: no I/O beyond the import, no settings.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

PURE_PYTHON_ENV = "EDGEFLEET_PURE_PYTHON"
INTERFACE = 1  # agent/_fastpath.c's FASTPATH_INTERFACE this code is written against

_UNSET: Any = object()
_native: Any = _UNSET


def _load() -> Any:
    if os.environ.get(PURE_PYTHON_ENV, "") not in ("", "0"):
        log.info("%s is set: the predict path runs in pure Python", PURE_PYTHON_ENV)
        return None
    try:
        from agent import _fastpath  # type: ignore[attr-defined]
    except ImportError as exc:
        log.info("agent._fastpath is not built (%s): the predict path runs in pure Python", exc)
        return None
    if getattr(_fastpath, "INTERFACE", None) != INTERFACE:
        log.warning(
            "agent._fastpath is a build of another version (interface %s, expected %s): the "
            "predict path runs in pure Python; rebuild it with `pip install -e . --no-deps`",
            getattr(_fastpath, "INTERFACE", None),
            INTERFACE,
        )
        return None
    # the extension reads ndarrays through numpy's PyArrayObject_fields layout: check it here
    # on arrays of every kind it meets before trusting it with a request
    f32 = np.dtype(np.float32)
    probes: list[np.ndarray] = [
        np.arange(24, dtype=np.float32).reshape(2, 12),
        np.arange(24, dtype=np.float32).reshape(6, 4)[::2],
        np.zeros((1, 3), dtype=np.float64),
        np.frombuffer(bytearray(48), dtype=np.float32).reshape(3, 4),
    ]
    for probe in probes:
        data, shape, strides, dtype, flags = _fastpath.layout(probe)
        seen = (data, shape, strides, dtype is probe.dtype, flags & 0x0001, flags & 0x0100)
        expected = (
            probe.__array_interface__["data"][0],
            probe.shape,
            probe.strides,
            True,
            0x0001 if probe.flags.c_contiguous else 0,
            0x0100 if probe.flags.aligned else 0,
        )
        if seen != expected:
            log.warning(
                "agent._fastpath reads numpy %s arrays differently from numpy (%r, not %r): "
                "the predict path runs in pure Python; rebuild the agent for this numpy",
                np.__version__,
                seen,
                expected,
            )
            return None
    _fastpath.configure(np.ndarray, f32)
    return _fastpath


def native() -> Any:
    """The checked :mod:`agent._fastpath` module, or None where the pure-Python path runs."""
    global _native
    if _native is _UNSET:
        _native = _load()
    return _native


def use_native(enabled: bool) -> None:
    """Choose the implementation for objects built from now on (the tests and the benchmark
    compare both in one process); ``True`` only where the extension is available."""
    global _native
    if not enabled:
        _native = None
        return
    _native = _UNSET
    if native() is None:
        raise RuntimeError(
            "agent._fastpath is not available here; build it with `pip install -e .` (needs a C "
            f"compiler and the Python headers) and unset {PURE_PYTHON_ENV}"
        )
