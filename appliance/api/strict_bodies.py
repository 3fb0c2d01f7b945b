"""Request bodies decoded as strictly as the OpenAPI document says.

Litestar converts a decoded body into the handler's msgspec Struct with `strict=False`, so
`"stream": 0` or `"max_tokens": "8"` would be taken as `false` and `8`: accepted, although
the document (msgspec's own schema) says boolean and integer. This hook decodes the body
once more, strictly, into the same Struct before the handler runs; a mismatch is the same
400 naming the field that litestar's own validation gives. As in JSON Schema, a number with
no fractional part (`8.0`) is an integer."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request
from litestar.exceptions import ValidationException

_UNTYPED = msgspec.json.Decoder(float_hook=lambda text: _integral(text))
_BODY_TYPES: dict[int, type[msgspec.Struct] | None] = {}


def _integral(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() else value


def _body_type(handler: Any) -> type[msgspec.Struct] | None:
    key = id(handler)
    if key not in _BODY_TYPES:
        field = handler.parsed_fn_signature.parameters.get("data")
        annotation = getattr(field, "annotation", None)
        _BODY_TYPES[key] = annotation if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct) else None
    return _BODY_TYPES[key]


async def strict_body(request: Request[Any, Any, Any]) -> None:
    body_type = _body_type(request.route_handler)
    if body_type is None:
        return
    try:
        # A float hook applies to untyped decoding only: decode, then convert strictly.
        msgspec.convert(_UNTYPED.decode(await request.body()), body_type, strict=True)
    except msgspec.ValidationError as exc:
        raise ValidationException(extra=[{"message": str(exc), "key": "data", "source": "body"}]) from None
    except msgspec.DecodeError:
        return  # malformed JSON: litestar's own decoding reports it
