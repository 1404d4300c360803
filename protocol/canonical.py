"""Canonical JSON: the one byte form of a document that gets signed.

TUF's canonical JSON (securesystemslib's ``encode_canonical``): keys sorted, no whitespace, only
quote and backslash escaped, UTF-8, and no floats (a float has no single spelling). Signed
documents therefore carry floats as decimal strings (:func:`float_to_wire`) and read them back
with :func:`float_from_wire`.

This module encodes and decodes values; it signs nothing and reads no files.
"""

from __future__ import annotations

import math
from typing import Any

from securesystemslib.exceptions import FormatError
from securesystemslib.formats import encode_canonical

from protocol.errors import ProtocolError


def canonical_json(value: Any) -> bytes:
    """Encode ``value`` (dicts, lists, str, int, bool, None) as canonical JSON bytes.

    Raises :class:`ProtocolError` for anything else (floats included).
    """
    try:
        text = encode_canonical(value)
    except FormatError as exc:
        raise ProtocolError(
            f"cannot encode as canonical JSON ({exc}); signed documents carry floats as "
            "decimal strings (protocol.canonical.float_to_wire)"
        ) from exc
    if not isinstance(text, str):  # encode_canonical returns str when no output function
        raise ProtocolError("canonical JSON encoder returned no text")
    return text.encode("utf-8")


def float_to_wire(value: float) -> str:
    """A float as the shortest decimal string that reads back to the same float."""
    value = float(value)
    if not math.isfinite(value):
        raise ProtocolError(f"{value!r} cannot be signed: only finite numbers are allowed")
    return repr(value)


def float_from_wire(text: object) -> float:
    """Read back a :func:`float_to_wire` string; :class:`ProtocolError` if it is not one."""
    if not isinstance(text, str):
        raise ProtocolError(f"expected a decimal string, got {type(text).__name__} {text!r}")
    try:
        value = float(text)
    except ValueError as exc:
        raise ProtocolError(f"{text!r} is not a decimal number") from exc
    if not math.isfinite(value) or repr(value) != text:
        raise ProtocolError(f"{text!r} is not a canonical decimal number (expected {value!r})")
    return value
