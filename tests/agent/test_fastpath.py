"""agent.fastpath: the C extension is built where a compiler is, checks numpy's array layout
before it is used, can be turned off, and its lock behaves as threading.Lock."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import fastpath

REPO = Path(__file__).resolve().parents[2]


def _fresh_native(env: dict[str, str] | None = None) -> str:
    """What a new process says ``fastpath.native()`` is (None or the module's name)."""
    code = "from agent import fastpath; m = fastpath.native(); print(m and m.__name__)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    )
    return out.stdout.strip()


def test_fastpath_is_built() -> None:
    """Where a C compiler exists (every development and CI machine) the install built the
    extension: a silent fall-back there would hide a broken build behind slower serving."""
    if not (shutil.which("cc") or shutil.which("gcc")) or os.environ.get(fastpath.PURE_PYTHON_ENV):
        pytest.skip("no C compiler here: the pure-Python path is the expected one")
    assert _fresh_native({fastpath.PURE_PYTHON_ENV: ""}) == "agent._fastpath", (
        "agent._fastpath is not built: run `.venv/bin/pip install -e . --no-deps` (or "
        "./scripts/setup) and look for its compiler errors"
    )


def test_pure_python_can_be_forced() -> None:
    assert _fresh_native({fastpath.PURE_PYTHON_ENV: "1"}) == "None"


def test_a_layout_it_does_not_read_right_turns_it_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    native = fastpath.native()
    if native is None:
        pytest.skip("agent._fastpath is not built here")
    real = native.layout

    def shifted(arr: np.ndarray) -> tuple[Any, ...]:
        data, shape, strides, dtype, flags = real(arr)
        return data + 8, shape, strides, dtype, flags  # as if numpy had moved its fields

    monkeypatch.setattr(native, "layout", shifted)
    monkeypatch.setattr(fastpath, "_native", fastpath._UNSET)
    assert fastpath.native() is None
    assert "reads numpy" in caplog.text and "pure Python" in caplog.text
    monkeypatch.setattr(native, "layout", real)
    monkeypatch.setattr(fastpath, "_native", fastpath._UNSET)
    assert fastpath.native() is native


def test_a_stale_build_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    native = fastpath.native()
    if native is None:
        pytest.skip("agent._fastpath is not built here")
    monkeypatch.setattr(native, "INTERFACE", fastpath.INTERFACE - 1)
    monkeypatch.setattr(fastpath, "_native", fastpath._UNSET)
    assert fastpath.native() is None


@pytest.fixture
def lock() -> Any:
    native = fastpath.native()
    if native is None:
        pytest.skip("agent._fastpath is not built here")
    return native.Lock()


def test_lock_acquire_release_like_threading_lock(lock: Any) -> None:
    assert lock.acquire() is True and lock.locked()
    assert lock.acquire(False) is False
    assert lock.acquire(timeout=0.05) is False
    lock.release()
    assert not lock.locked()
    with pytest.raises(RuntimeError, match="release unlocked lock"):
        lock.release()
    with pytest.raises(ValueError, match="non-blocking"):
        lock.acquire(False, 1.0)
    with lock:
        assert lock.locked()
    assert not lock.locked()


def test_lock_excludes_other_threads_and_waits_without_the_gil(lock: Any) -> None:
    """A thread waiting for the lock lets the holder run Python code (the C predict waits
    this way while the holder flushes drift rows in Python)."""
    counter = [0]

    def worker() -> None:
        for _ in range(2000):
            with lock:
                value = counter[0]
                if value % 50 == 0:
                    time.sleep(0)  # hand the GIL over while holding the lock
                counter[0] = value + 1

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert counter[0] == 8000
    held = threading.Event()
    done = threading.Event()

    def holder() -> None:
        with lock:
            held.set()
            done.wait(5)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)
    started = time.monotonic()
    assert lock.acquire(timeout=0.2) is False
    assert 0.15 < time.monotonic() - started < 2
    done.set()
    t.join(5)
    assert lock.acquire(timeout=5) is True
    lock.release()
