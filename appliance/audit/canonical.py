"""The canonical JSON encoding that audit hashes and checkpoint signatures are computed over.

Rules (stable across Python versions, reproducible by an external verifier):

- objects with string keys only, keys sorted by code point, no whitespace (`,` and `:`);
- UTF-8 bytes, non-ASCII characters written as themselves (`ensure_ascii=False`), the JSON
  escapes `\\"`, `\\\\`, `\\n`, `\\r`, `\\t`, `\\b`, `\\f` and `\\u00XX` for other control characters;
- integers in decimal, floats as Python's `repr` (the shortest text that reads back as the
  same double, e.g. `1712345678.123456`, `0.1`, `1e-07`); `true`, `false`, `null`;
- NaN, infinities, non-string keys, lone surrogates and any other type are refused with
  `ValueError`, so two different values can never encode to the same bytes.
"""

from __future__ import annotations

import json
import math
from typing import Any

_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":"))


def _check(value: Any, path: str) -> None:
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{path}: {value!r} cannot be encoded canonically (NaN and infinity are refused)")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{path}: object keys must be strings, got {type(key).__name__} {key!r}")
            _check(item, f"{path}.{key}")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check(item, f"{path}[{i}]")
        return
    raise ValueError(f"{path}: {type(value).__name__} cannot be encoded canonically")


def canonical_json(value: Any) -> str:
    """The canonical text of `value` (see the module docstring). Raises `ValueError`."""
    _check(value, "$")
    text = _ENCODER.encode(value)
    text.encode("utf-8")  # lone surrogates raise UnicodeEncodeError, a ValueError
    return text


def canonical_json_unchecked(value: Any) -> str:
    """`canonical_json` without the type walk, for values the caller has already checked."""
    return _ENCODER.encode(value)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} cannot be encoded canonically")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a canonical float")
    return value


def recanonicalize(text: str) -> str:
    """Parse JSON `text` and return its canonical form (fast: JSON can only hold encodable
    types, so only NaN/infinity need refusing). Raises `ValueError`."""
    value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    return _ENCODER.encode(value)


def canonical_bytes(value: Any) -> bytes:
    """The canonical UTF-8 bytes of `value`. Raises `ValueError`."""
    _check(value, "$")
    return _ENCODER.encode(value).encode("utf-8")
