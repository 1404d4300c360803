"""The predict path's drift feed: the accumulator's unchecked ``add_trusted`` and the service's
block buffer count exactly what the checked ``add`` counts, for any mix of batch sizes; on the
C extension's buffer, row block and binning and on their pure-Python twins."""

from __future__ import annotations

import numpy as np
import pytest

from agent.drift import DriftAccumulator
from agent.inference import DriftBuffer, new_drift_buffer
from protocol.reference import ReferenceProfile, build_reference_profile

SHA = "0" * 64
META = ("m", 1, SHA)

pytestmark = pytest.mark.usefixtures("implementation")


def _reference(features: int = 5) -> ReferenceProfile:
    rng = np.random.default_rng(3)
    train = rng.normal(size=(2000, features))
    return build_reference_profile(
        train, (train[:, 0] > 0).astype(np.int64), [f"f{j}" for j in range(features)], ["a", "b"]
    )


def _data(rows: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(rows, 5)).astype(np.float32)
    x[::17, 2] = np.nan
    x[::29, 1] = np.inf
    outputs = rng.random(size=(rows, 2)).astype(np.float32)
    return x, outputs


def _summary(acc: DriftAccumulator) -> dict[str, object]:
    return acc.close_window(0.0, 1.0, *META).to_dict()


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("sizes", [[1] * 300, [64] * 9, [1, 7, 256, 3, 300, 1, 50], [1000]])
def test_buffered_trusted_feed_counts_what_add_counts(sizes: list[int], strided: bool) -> None:
    ref = _reference()
    x, outputs = _data(sum(sizes))
    checked = DriftAccumulator(ref, block_rows=128)
    trusted = DriftAccumulator(ref, block_rows=128)
    buffer = new_drift_buffer(trusted, limit=64)
    start = 0
    for n in sizes:
        batch = x[start : start + n].copy()
        out = outputs[start : start + n].copy()
        if strided:  # views without a flat buffer (a column slice, a transpose) are copied too
            batch = np.repeat(batch, 2, axis=1)[:, ::2]
            out = np.ascontiguousarray(out.T).T
        checked.add(batch, out.argmax(1))
        buffer.add(batch, out)
        batch[:] = 99.0  # the caller reuses its arrays: the buffer kept a copy
        out[:] = 0.0
        start += n
        assert buffer.rows == checked.rows == start
    buffer.flush()
    assert buffer.rows == start and buffer.fill == 0
    if isinstance(buffer, DriftBuffer):
        assert not buffer.inputs and not buffer.outputs
    assert _summary(trusted) == _summary(checked)


def test_buffer_kind_follows_the_implementation(implementation: str) -> None:
    buffer = new_drift_buffer(None)
    assert isinstance(buffer, DriftBuffer) == (implementation == "python")


@pytest.mark.parametrize("limit", [1, 5, 64])
def test_blocks_reach_the_sink_as_with_the_python_buffer(limit: int) -> None:
    """The same blocks (sizes and rows) reach the sink from both buffers, whatever mix of
    batch sizes and layouts comes in (some go through the C copy, some do not)."""
    received: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"python": [], "this": []}

    class Sink:
        rows = 0

        def __init__(self, name: str) -> None:
            self.name = name

        def add(self, inputs: np.ndarray, predicted: np.ndarray) -> None:
            received[self.name].append((inputs.copy(), predicted.copy()))

    reference = DriftBuffer(Sink("python"), limit=limit)  # type: ignore[arg-type]
    buffer = new_drift_buffer(Sink("this"), limit=limit)  # type: ignore[arg-type]
    x, outputs = _data(400)
    start = 0
    for i, n in enumerate([1, 3, 31, 32, 1, 64, 2, 7, 1, 1, 30, 100, 5, 1]):
        batch, out = x[start : start + n], outputs[start : start + n]
        if i % 3 == 1:  # a strided view: not the C copy's kind of array
            batch = np.repeat(batch, 2, axis=1)[:, ::2]
        if i % 4 == 2:
            out = np.asfortranarray(out)
        for b in (reference, buffer):
            b.add(batch, out)
        start += n
    for b in (reference, buffer):
        b.flush()
    assert len(received["this"]) == len(received["python"]) > 1
    for (xa, pa), (xb, pb) in zip(received["this"], received["python"], strict=True):
        assert xa.dtype == xb.dtype == np.float32
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(pa, pb)


def test_add_trusted_matches_add_across_blocks() -> None:
    ref = _reference()
    x, outputs = _data(700)
    pred = outputs.argmax(1)
    a, b = DriftAccumulator(ref, block_rows=100), DriftAccumulator(ref, block_rows=100)
    for s in range(0, 700, 70):
        a.add(x[s : s + 70], pred[s : s + 70])
        b.add_trusted(x[s : s + 70], pred[s : s + 70])
    assert a.rows == b.rows == 700
    assert _summary(a) == _summary(b)
