"""The OpenAPI document, made exact. Client generators and the console's typed client rely on
it, so it must describe what is accepted and sent, byte for byte:

- The JSON Schema of every request and response body is msgspec's own, from the same Struct
  that decodes or encodes it. Litestar's generator drops constraints inside unions (a list's
  `minItems` when it may also be a string) and exclusive bounds (`top_p > 0`), so a client
  built from it would send requests the server refuses.
- The media types a handler's signature does not show: the event streams of the generation
  endpoints (`stream: true`) and the audit export's JSON lines or CSV.
- The 413 on every operation that takes a body: the server's body limit applies to each, and a
  schema's string length cannot bound the bytes (one character JSON-escapes to up to 12).
"""

from __future__ import annotations

import copy
import inspect
from types import ModuleType
from typing import Any

import msgspec
from litestar import Request
from litestar.openapi.plugins import JsonRenderPlugin

from appliance.api import responses, routing_routes, schemas, upstreams_routes
from appliance.api.responses import error_response_schema
from appliance.routing import routes

_TEXT = {"schema": {"type": "string"}}
# Every module whose msgspec Structs are request or response bodies.
BODY_MODULES: list[ModuleType] = [schemas, responses, routing_routes, upstreams_routes, routes]
_STREAMING = ("/v1/chat/completions", "/v1/completions")
_EXPORT = "/admin/audit/export"


def _structs(*modules: ModuleType) -> list[type[msgspec.Struct]]:
    return [
        obj
        for module in modules
        for _, obj in inspect.getmembers(module, inspect.isclass)
        if issubclass(obj, msgspec.Struct) and obj.__module__ == module.__name__
    ]


def exact(document: dict[str, Any]) -> dict[str, Any]:
    """`document` (litestar's) with msgspec's body schemas and the other media types."""
    out = copy.deepcopy(document)
    _, components = msgspec.json.schema_components(
        _structs(*BODY_MODULES), ref_template="#/components/schemas/{name}"
    )
    out.setdefault("components", {}).setdefault("schemas", {}).update(components)
    for path in _STREAMING:
        content = out["paths"][path]["post"]["responses"]["200"].setdefault("content", {})
        content["text/event-stream"] = _TEXT
    out["paths"][_EXPORT]["get"]["responses"]["200"]["content"] = {"application/x-ndjson": _TEXT, "text/csv": _TEXT}
    for operations in out["paths"].values():
        for operation in operations.values():
            if isinstance(operation, dict) and "requestBody" in operation:
                operation["responses"].setdefault("413", error_response_schema(413))
    return out


class ExactJsonRenderPlugin(JsonRenderPlugin):
    """Serves `exact(...)` of litestar's document at /schema/openapi.json, built once."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._document: dict[str, Any] | None = None

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        if self._document is None:
            self._document = exact(openapi_schema)
        return self.render_json(request, self._document)
