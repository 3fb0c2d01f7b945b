"""The one place where errors become HTTP responses in the OpenAI error shape."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from appliance.api.context import find_context
from appliance.errors import (
    ApplianceError,
    ContextLengthExceeded,
    InvalidRequest,
    Overloaded,
    ServiceUnavailable,
)
from runtime.errors import (
    ContextOverflow,
    EngineOverloaded,
    EngineUnavailable,
    GrammarDeadEnd,
    InvalidGenerationRequest,
    ModelFileError,
    RuntimeFault,
)

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "permission_denied"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    409: ("invalid_request_error", "conflict"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    422: ("invalid_request_error", "unprocessable_entity"),
    429: ("rate_limit_exceeded", "rate_limit_exceeded"),
}


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def from_runtime(exc: RuntimeFault) -> ApplianceError:
    """Translate the runtime's errors into the control plane's."""
    if isinstance(exc, ContextOverflow):
        return ContextLengthExceeded(
            f"This model's maximum context length is {exc.limit} tokens; the request needs more "
            f"({exc.prompt_tokens} in the prompt). Please reduce the length of the messages or completion.",
            param="messages",
        )
    if isinstance(exc, EngineOverloaded):
        return Overloaded(f"The model is busy: {exc}. Retry shortly.", retry_after=exc.retry_after)
    if isinstance(exc, GrammarDeadEnd):
        return InvalidRequest(f"response_format cannot be met: {exc}.", param="response_format")
    if isinstance(exc, InvalidGenerationRequest | ModelFileError):
        return InvalidRequest(str(exc))
    if isinstance(exc, EngineUnavailable):
        return ServiceUnavailable(f"The model is unavailable: {exc}")
    return ServiceUnavailable("The model failed to serve the request.")


def _response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response[bytes]:
    return Response(
        content=msgspec.json.encode(body),
        status_code=status,
        media_type="application/json",
        headers=headers or {},
    )


def _note_error(request: Request[Any, Any, Any], code: str | None) -> None:
    """Tell the audit record which error this request ended with."""
    ctx = find_context(request.scope)
    if ctx is not None and ctx.error_code is None:
        ctx.error_code = code


def handle_appliance_error(request: Request[Any, Any, Any], exc: ApplianceError) -> Response[bytes]:
    _note_error(request, exc.code)
    return _response(exc.status, error_body(exc.message, exc.type, exc.code, exc.param), exc.headers)


def handle_runtime_error(request: Request[Any, Any, Any], exc: RuntimeFault) -> Response[bytes]:
    return handle_appliance_error(request, from_runtime(exc))


def handle_http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    type_, code = _HTTP_CODES.get(status, ("server_error", None))
    _note_error(request, code)
    message = exc.detail
    param = None
    if isinstance(exc, ValidationException):
        message, param = _validation_message(exc)
    elif status == 413:
        message = "Request body is larger than this server accepts."
    elif status == 404:
        message = "Unknown endpoint."
    headers = {k: v for k, v in (exc.headers or {}).items() if k.lower() in ("allow", "retry-after")}
    return _response(status, error_body(message, type_, code, param), headers)


def handle_too_deep(request: Request[Any, Any, Any], exc: RecursionError) -> Response[bytes]:
    """JSON nested deeper than the decoder recurses (litestar passes msgspec's RecursionError through)."""
    _note_error(request, "invalid_request_error")
    log.warning("refused a request nested too deeply on %s %s", request.method, request.url.path)
    return _response(400, error_body("Request is nested too deeply.", "invalid_request_error", "invalid_request_error"))


def handle_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return _response(
        HTTP_500_INTERNAL_SERVER_ERROR,
        error_body("The server had an error while processing your request.", "server_error", None),
    )


def _validation_message(exc: ValidationException) -> tuple[str, str | None]:
    """Litestar wraps msgspec's message; unwrap it into `field: problem`."""
    extra = exc.extra if isinstance(exc.extra, list) else []
    for item in extra:
        if not (isinstance(item, dict) and item.get("message")):
            continue
        text = str(item["message"])
        raw, sep, where = text.rpartition(" - at `")
        key = where.rstrip("`").removeprefix("$").lstrip(".") if sep else str(item.get("key") or "")
        key = "" if key == "data" else key  # litestar names the whole body "data"
        text = (raw if sep else text).replace("`", "")
        if text.startswith("JSON is malformed"):
            return "We could not parse the JSON body of your request: " + text, None
        missing = text.partition("missing required field ")[2]
        if missing:
            field = f"{key}.{missing}" if key else missing
            return f"Missing required parameter: '{field}'.", field
        unknown = text.partition("unknown field ")[2]
        if unknown:
            field = f"{key}.{unknown}" if key else unknown
            return f"Unrecognized request argument supplied: {field}", field
        text = text[:1].lower() + text[1:]
        return (f"{key}: {text}" if key else text), key or None
    return "Invalid request body.", None


EXCEPTION_HANDLERS = {
    ApplianceError: handle_appliance_error,
    RuntimeFault: handle_runtime_error,
    HTTPException: handle_http_exception,
    RecursionError: handle_too_deep,
    Exception: handle_unexpected,
}
