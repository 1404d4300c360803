"""Golden sets: parsing, exact round trips, and the pass/fail rule of check_golden."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protocol.errors import ProtocolError
from protocol.golden import FORMAT, GoldenSet, GoldenSetError, check_golden


def _golden(
    n: int = 4, f: int = 3, c: int = 3, atol: float = 0.05, agree: float = 1.0
) -> GoldenSet:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(n, c)) * 3
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return GoldenSet(
        inputs=rng.normal(size=(n, f)).astype(np.float32),
        expected=expected.astype(np.float32),
        atol=atol,
        min_agreement=agree,
    )


# --- the file format ---------------------------------------------------------------------------


def test_round_trip_is_exact_and_stable() -> None:
    g = _golden()
    data = g.to_json()
    back = GoldenSet.from_json(data)
    assert back.inputs.dtype == np.float32 and back.expected.dtype == np.float32
    assert np.array_equal(back.inputs, g.inputs) and np.array_equal(back.expected, g.expected)
    assert (back.atol, back.min_agreement) == (g.atol, g.min_agreement)
    assert back.to_json() == data
    assert json.loads(data)["format"] == FORMAT


finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@given(
    inputs=hnp.arrays(
        np.float32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=6), elements=finite_f32
    )
)
def test_any_float32_survives_the_round_trip_bit_for_bit(inputs: np.ndarray) -> None:
    g = GoldenSet(
        inputs=inputs,
        expected=np.zeros((inputs.shape[0], 2), np.float32),
        atol=0.1,
        min_agreement=1.0,
    )
    back = GoldenSet.from_json(g.to_json())
    assert back.inputs.tobytes() == inputs.tobytes()  # -0.0, subnormals and extremes included


def test_arrays_are_private_read_only_copies() -> None:
    inputs = np.ones((2, 3), np.float32)
    g = GoldenSet(inputs=inputs, expected=np.ones((2, 2), np.float32), atol=0.1, min_agreement=1.0)
    inputs[0, 0] = 5.0
    assert g.inputs[0, 0] == 1.0
    with pytest.raises(ValueError):
        g.inputs[0, 0] = 7.0


def _doc(**changes: object) -> bytes:
    doc: dict[str, object] = {
        "format": FORMAT,
        "atol": 0.05,
        "min_agreement": 1.0,
        "inputs": [[1.0, 2.0], [3.0, 4.0]],
        "expected": [[0.1, 0.9], [0.8, 0.2]],
    }
    for key, value in changes.items():
        if value is None:
            doc.pop(key)
        else:
            doc[key] = value
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00not json", "not JSON"),
        (b"[1, 2]", "format"),
        (_doc(format="edgefleet-golden/0"), "edgefleet-golden/0"),
        (_doc(expected=None), "lacks expected"),
        (_doc(inputs=[]), "non-empty list"),
        (_doc(inputs=[[1.0, 2.0], [3.0]]), "row 1 has 1 values"),
        (_doc(inputs=[[1.0, "2"], [3.0, 4.0]]), "not a number"),
        (_doc(inputs=[[1.0, True], [3.0, 4.0]]), "not a number"),
        (_doc(expected=[[0.1, 0.9]]), "2 input rows but 1 expected"),
        (
            b'{"format": "edgefleet-golden/1", "atol": 0.05, "min_agreement": 1, '
            b'"inputs": [[NaN, 1]], "expected": [[1, 0]]}',
            "NaN or infinity",
        ),
        (_doc(inputs=[[1e39, 0.0], [0.0, 0.0]]), "overflow float32"),
        (_doc(atol=0), "atol must be a positive number"),
        (_doc(atol="0.05"), "atol must be a positive number"),
        (_doc(min_agreement=1.5), "min_agreement must be a share"),
    ],
)
def test_malformed_golden_sets_are_refused_clearly(data: bytes, message: str) -> None:
    with pytest.raises(GoldenSetError, match=message) as info:
        GoldenSet.from_json(data)
    assert isinstance(info.value, ProtocolError)  # the CLIs turn it into one clear line


def test_constructor_refuses_wrong_arrays() -> None:
    with pytest.raises(GoldenSetError, match="2-D"):
        GoldenSet(np.ones(3, np.float32), np.ones((3, 2), np.float32), 0.1, 1.0)
    with pytest.raises(GoldenSetError, match="numpy array"):
        GoldenSet([[1.0]], np.ones((1, 2), np.float32), 0.1, 1.0)


# --- check_golden ----------------------------------------------------------------------------


def test_exact_outputs_pass() -> None:
    g = _golden()
    result = check_golden(g, g.expected.copy())
    assert result.passed and result.reason == ""
    assert result.max_abs_error == 0.0 and result.agreement == 1.0


def test_error_beyond_atol_fails_naming_row_and_output() -> None:
    g = _golden()
    out = g.expected.astype(np.float64)
    out[2, 1] += 0.2
    result = check_golden(g, out)
    assert not result.passed
    assert result.max_abs_error == pytest.approx(0.2)
    assert "> atol 0.05" in result.reason and "row 2, output 1" in result.reason


def test_flipped_argmax_within_atol_fails_on_agreement() -> None:
    g = GoldenSet(
        inputs=np.zeros((2, 1), np.float32),
        expected=np.array([[0.51, 0.49], [0.9, 0.1]], np.float32),
        atol=0.05,
        min_agreement=1.0,
    )
    result = check_golden(g, np.array([[0.49, 0.51], [0.9, 0.1]]))
    assert not result.passed
    assert result.agreement == 0.5
    assert "1 of 2 rows" in result.reason
    relaxed = GoldenSet(g.inputs, g.expected, atol=0.05, min_agreement=0.5)
    assert check_golden(relaxed, np.array([[0.49, 0.51], [0.9, 0.1]])).passed


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        (np.zeros((4, 2)), "shape (4, 2), expected (4, 3)"),
        (np.zeros((3, 3)), "shape (3, 3)"),
        (np.full((4, 3), np.nan), "NaN or infinity in 4 rows"),
        ([["a", "b", "c"]] * 4, "not numeric"),
    ],
)
def test_uncomparable_outputs_fail_with_reason(outputs: object, message: str) -> None:
    result = check_golden(_golden(), outputs)
    assert not result.passed
    assert math.isinf(result.max_abs_error)
    assert message in result.reason


golden_sets = st.builds(
    lambda n, f, c, seed, atol: _random_golden(n, f, c, seed, atol),
    st.integers(1, 12),
    st.integers(1, 6),
    st.integers(2, 6),
    st.integers(0, 2**32 - 1),
    st.floats(1e-4, 0.5),
)


def _random_golden(n: int, f: int, c: int, seed: int, atol: float) -> GoldenSet:
    rng = np.random.default_rng(seed)
    return GoldenSet(
        inputs=(rng.normal(size=(n, f)) * 100).astype(np.float32),
        expected=rng.random((n, c)).astype(np.float32),
        atol=atol,
        min_agreement=1.0,
    )


@settings(max_examples=200)
@given(g=golden_sets)
def test_property_outputs_equal_to_expected_always_pass(g: GoldenSet) -> None:
    for outputs in (g.expected, g.expected.astype(np.float64), g.expected.tolist()):
        result = check_golden(g, outputs)
        assert result.passed, result.reason
        assert result.max_abs_error == 0.0 and result.agreement == 1.0


@settings(max_examples=300)
@given(
    g=golden_sets,
    where=st.tuples(st.integers(0, 2**16), st.integers(0, 2**16)),
    excess=st.floats(1.001, 1e3),
    sign=st.sampled_from((-1.0, 1.0)),
)
def test_property_any_perturbation_beyond_atol_fails(
    g: GoldenSet, where: tuple[int, int], excess: float, sign: float
) -> None:
    row, col = where[0] % g.n, where[1] % g.n_classes
    outputs = g.expected.astype(np.float64)
    outputs[row, col] += sign * g.atol * excess
    result = check_golden(g, outputs)
    assert not result.passed
    assert result.max_abs_error > g.atol
    assert f"> atol {g.atol:g}" in result.reason


@settings(max_examples=200)
@given(g=golden_sets, shrink=st.floats(0.0, 0.999))
def test_property_perturbation_within_atol_that_keeps_argmax_passes(
    g: GoldenSet, shrink: float
) -> None:
    # the same offset on every value of a row keeps its argmax and stays within atol
    outputs = g.expected.astype(np.float64) + g.atol * shrink
    result = check_golden(g, outputs)
    assert result.passed, result.reason
