"""Golden sets: known inputs and the outputs an artifact must reproduce on a device.

A golden set ships with every artifact of a bundle (``golden/<artifact file>.json``). Before a
device activates a model it runs the golden inputs through its runtime and checks the outputs
with :func:`check_golden`: every value within ``atol`` of the expected one, and the argmax (the
predicted class) matching on at least ``min_agreement`` of the rows. A runtime that mis-loads
weights, a wrong quantization kernel or a corrupt file fails here before it serves traffic.

The file format (``edgefleet-golden/1``) is JSON with float32 values written as the shortest
decimal that reads back to the same float32, so a golden set round-trips bit for bit.

This module parses, serialises and checks; it reads no files and runs no model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocol.errors import ProtocolError

FORMAT = "edgefleet-golden/1"


class GoldenSetError(ProtocolError):
    """A golden set is malformed (shape, dtype, values or fields)."""


@dataclass(frozen=True, eq=False)
class GoldenSet:
    inputs: np.ndarray  # [n, F] float32, raw features as the device feeds them
    expected: np.ndarray  # [n, C] float32, the artifact's own outputs
    atol: float  # max |output - expected| per value
    min_agreement: float  # share of rows whose argmax must match, in [0, 1]

    def __post_init__(self) -> None:
        inputs = _matrix("inputs", self.inputs)
        expected = _matrix("expected", self.expected)
        if inputs.shape[0] != expected.shape[0]:
            raise GoldenSetError(
                f"golden set has {inputs.shape[0]} input rows but {expected.shape[0]} expected "
                "rows; rebuild it with `fleet models build`"
            )
        if isinstance(self.atol, bool) or not (
            isinstance(self.atol, int | float) and math.isfinite(self.atol) and self.atol > 0
        ):
            raise GoldenSetError(f"golden atol must be a positive number, got {self.atol!r}")
        if isinstance(self.min_agreement, bool) or not (
            isinstance(self.min_agreement, int | float) and 0.0 <= self.min_agreement <= 1.0
        ):
            raise GoldenSetError(
                f"golden min_agreement must be a share in [0, 1], got {self.min_agreement!r}"
            )
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "expected", expected)
        object.__setattr__(self, "atol", float(self.atol))
        object.__setattr__(self, "min_agreement", float(self.min_agreement))

    @property
    def n(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.inputs.shape[1])

    @property
    def n_classes(self) -> int:
        return int(self.expected.shape[1])

    def to_json(self) -> bytes:
        head = json.dumps(
            {"format": FORMAT, "atol": self.atol, "min_agreement": self.min_agreement},
            sort_keys=True,
        )
        body = (
            f'"inputs": {_rows_text(self.inputs)},\n "expected": {_rows_text(self.expected)}\n}}\n'
        )
        return (head[:-1] + ",\n " + body).encode()

    @classmethod
    def from_json(cls, data: bytes) -> GoldenSet:
        """Parse a golden set; raises :class:`GoldenSetError` saying what is wrong."""
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise GoldenSetError(
                f"golden set is not JSON ({exc}); rebuild it with `fleet models build`"
            ) from exc
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise GoldenSetError(
                f"golden set format is {found!r}, expected {FORMAT!r}; rebuild it with "
                "`fleet models build`"
            )
        missing = [k for k in ("inputs", "expected", "atol", "min_agreement") if k not in doc]
        if missing:
            raise GoldenSetError(f"golden set lacks {', '.join(missing)}; rebuild the bundle")
        return cls(
            inputs=_parse_matrix("inputs", doc["inputs"]),
            expected=_parse_matrix("expected", doc["expected"]),
            atol=doc["atol"],
            min_agreement=doc["min_agreement"],
        )


@dataclass(frozen=True)
class GoldenResult:
    passed: bool
    max_abs_error: float  # inf when the outputs could not be compared at all
    agreement: float  # share of rows whose argmax matches the expected argmax
    reason: str  # what failed; "" when passed


def check_golden(golden: GoldenSet, outputs: Any) -> GoldenResult:
    """Compare a runtime's ``outputs`` [n, C] on ``golden.inputs`` with the expected ones."""
    try:
        out = np.asarray(outputs, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        return GoldenResult(False, math.inf, 0.0, f"outputs are not numeric ({exc})")
    want = golden.expected.astype(np.float64)
    if out.shape != want.shape:
        return GoldenResult(
            False,
            math.inf,
            0.0,
            f"outputs have shape {out.shape}, expected {want.shape} "
            "(wrong model for this golden set, or wrong output tensor)",
        )
    if not np.all(np.isfinite(out)):
        bad = int(np.count_nonzero(~np.isfinite(out).all(axis=1)))
        return GoldenResult(False, math.inf, 0.0, f"outputs hold NaN or infinity in {bad} rows")
    err = np.abs(out - want)
    max_err = float(err.max())
    agree = float(np.mean(np.argmax(out, axis=1) == np.argmax(want, axis=1)))
    reasons = []
    if max_err > golden.atol:
        row, col = np.unravel_index(int(np.argmax(err)), err.shape)
        over = int(np.count_nonzero((err > golden.atol).any(axis=1)))
        reasons.append(
            f"max |output - expected| = {max_err:.6g} > atol {golden.atol:g} "
            f"(row {row}, output {col}; {over} of {golden.n} rows off)"
        )
    if agree < golden.min_agreement:
        matched = round(agree * golden.n)
        reasons.append(
            f"predicted class matches on {matched} of {golden.n} rows ({agree:.3f}), "
            f"needs {golden.min_agreement:.3f}"
        )
    return GoldenResult(not reasons, max_err, agree, "; ".join(reasons))


def _matrix(name: str, value: Any) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise GoldenSetError(f"golden {name} must be a numpy array, got {type(value).__name__}")
    if value.ndim != 2 or value.shape[0] < 1 or value.shape[1] < 1:
        raise GoldenSetError(f"golden {name} must be a non-empty 2-D array, got {value.shape}")
    if value.dtype.kind not in "fiu":
        raise GoldenSetError(f"golden {name} must be numeric, got dtype {value.dtype}")
    with np.errstate(over="ignore"):  # overflow becomes inf, refused just below
        arr = np.array(value, dtype=np.float32)  # a private copy, read-only below
    if not np.all(np.isfinite(arr)):
        raise GoldenSetError(f"golden {name} hold NaN or infinity (or overflow float32)")
    arr.flags.writeable = False
    return arr


def _parse_matrix(name: str, rows: Any) -> np.ndarray:
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
        raise GoldenSetError(f"golden {name} must be a non-empty list of rows")
    width = len(rows[0])
    for i, row in enumerate(rows):
        if len(row) != width:
            raise GoldenSetError(f"golden {name} row {i} has {len(row)} values, row 0 {width}")
        for v in row:
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise GoldenSetError(f"golden {name} row {i} holds {v!r}, not a number")
    return np.asarray(rows, dtype=np.float64)


def _number(v: np.float32) -> str:
    text = str(v)  # numpy's shortest repr that identifies this float32
    if np.float32(float(text)) != v:  # decimal -> float64 -> float32 rounded twice: be exact
        text = repr(float(v))
    return text


def _rows_text(matrix: np.ndarray) -> str:
    rows: Sequence[str] = [
        "[" + ", ".join(_number(v) for v in row) + "]" for row in matrix.astype(np.float32)
    ]
    return "[\n  " + ",\n  ".join(rows) + "\n ]"
