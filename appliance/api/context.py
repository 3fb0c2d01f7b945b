"""Per-request values kept in the ASGI scope: the request id and the governance context."""

from __future__ import annotations

import re
import secrets
from typing import Any

from litestar.types import Scope

from appliance.governance import RequestContext

CONTEXT_KEY = "appliance.ctx"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def assign_request_id(scope: Scope) -> str:
    """The client's `x-request-id` when it is sane, else a new random id; kept in scope state."""
    state: dict[str, Any] = scope.setdefault("state", {})  # type: ignore[assignment]
    request_id = state.get("request_id")
    if request_id is None:
        incoming = dict(scope.get("headers", [])).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID.match(incoming) else secrets.token_hex(12)
        state["request_id"] = request_id
    return str(request_id)


def request_context(scope: Scope) -> RequestContext:
    return scope["state"][CONTEXT_KEY]  # type: ignore[no-any-return]


def find_context(scope: Scope) -> RequestContext | None:
    return scope.get("state", {}).get(CONTEXT_KEY)  # type: ignore[no-any-return]
