"""Request bodies decoded as strictly as the OpenAPI document says.

Litestar converts a decoded body into the handler's msgspec Struct with `strict=False`, so
`"stream": 0` or `"max_tokens": "8"` would be taken as `false` and `8`: accepted, although
the document (msgspec's own schema) says boolean and integer. This hook decodes the body
once more, strictly, into the same Struct before the handler runs; a mismatch is the same
400 naming the field that litestar's own validation gives. As in JSON Schema, a number with
no fractional part (`8.0`) is an integer. A body that is not UTF-8 is refused here too:
msgspec raises `UnicodeDecodeError` for it, which is neither of its own errors."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request
from litestar.exceptions import ValidationException

_UNTYPED = msgspec.json.Decoder(float_hook=lambda text: _integral(text))
_BODY_TYPES: dict[int, type[Any] | None] = {}


def _integral(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() else value


def _body_type(handler: Any) -> type[Any] | None:
    """The Struct the body converts to; `object` for a body of another type (a union), which is
    only checked for UTF-8; None for a handler that takes no body."""
    key = id(handler)
    if key not in _BODY_TYPES:
        field = handler.parsed_fn_signature.parameters.get("data")
        annotation = getattr(field, "annotation", None)
        struct = isinstance(annotation, type) and issubclass(annotation, msgspec.Struct)
        _BODY_TYPES[key] = annotation if struct else (object if field is not None else None)
    return _BODY_TYPES[key]


def not_utf8(exc: UnicodeDecodeError) -> str:
    return f"JSON is malformed: the body is not valid UTF-8 (byte {exc.start})"


async def strict_body(request: Request[Any, Any, Any]) -> None:
    body_type = _body_type(request.route_handler)
    if body_type is None:
        return
    try:
        # A float hook applies to untyped decoding only: decode, then convert strictly.
        decoded = _UNTYPED.decode(await request.body())
        if body_type is not object:
            msgspec.convert(decoded, body_type, strict=True)
    except msgspec.ValidationError as exc:
        raise ValidationException(extra=[{"message": str(exc), "key": "data", "source": "body"}]) from None
    except UnicodeDecodeError as exc:
        raise ValidationException(extra=[{"message": not_utf8(exc), "key": "data", "source": "body"}]) from None
    except msgspec.DecodeError:
        return  # malformed JSON: litestar's own decoding reports it
