"""Authentication (bearer key -> principal) and the role guard every route goes through."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult
from litestar.types import ASGIApp, Receive, Scope, Send

from appliance.auth import Principal, Role
from appliance.errors import PermissionDenied

PUBLIC: dict[str, Any] = {"exclude_from_auth": True, "public": True}
ROLES_KEY = "roles"


def roles(*allowed: Role) -> dict[str, Any]:
    """Route `opt` declaring which roles may call it. Admin may call everything."""
    return {ROLES_KEY: frozenset(allowed) | {Role.ADMIN}}


ANY_ROLE = roles(*Role)


class KeyAuthMiddleware(AbstractAuthenticationMiddleware):
    async def authenticate_request(self, connection: ASGIConnection[Any, Any, Any, Any]) -> AuthenticationResult:
        header = connection.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        presented = key.strip() if scheme.lower() == "bearer" else None
        principal = connection.app.state.services.keys.authenticate(presented)
        return AuthenticationResult(user=principal, auth=None)


def role_guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """Fail closed: a route that declares no roles is refused to everyone."""
    if handler.opt.get("public"):
        return
    allowed: Collection[Role] | None = handler.opt.get(ROLES_KEY)
    principal: Principal = connection.user
    if allowed is None:
        raise PermissionDenied("This endpoint declares no roles and is closed.")
    if principal.role not in allowed:
        raise PermissionDenied(f"The '{principal.role}' role may not use this endpoint.")


class UngovernedMiddleware:
    """Every request acts as one admin principal, with no key. Benchmark builds only."""

    _PRINCIPAL = Principal(key_id="ungoverned", name="ungoverned", role=Role.ADMIN)

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["user"] = self._PRINCIPAL
        await self.app(scope, receive, send)
