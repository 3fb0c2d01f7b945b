"""Authentication (bearer key, or the peer's uid on the local admin socket -> principal) and
the role guard every route goes through."""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Collection
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult
from litestar.types import ASGIApp, Receive, Scope, Send

from appliance.api.context import find_context
from appliance.api.network import local_uid
from appliance.auth import Principal, Role, local_admin
from appliance.errors import AuthenticationFailed, PermissionDenied, RateLimited

PUBLIC: dict[str, Any] = {"exclude_from_auth": True, "public": True}
ROLES_KEY = "roles"


def roles(*allowed: Role) -> dict[str, Any]:
    """Route `opt` declaring which roles may call it. Admin may call everything."""
    return {ROLES_KEY: frozenset(allowed) | {Role.ADMIN}}


ANY_ROLE = roles(*Role)


def trusted_local_uids(admin_group: str) -> frozenset[int]:
    """Who may use the admin socket: root, the service's own user, and `admin_group`'s members."""
    uids = {0, os.getuid()}
    if admin_group:
        try:
            group = grp.getgrnam(admin_group)
        except KeyError:
            return frozenset(uids)
        for name in group.gr_mem:
            try:
                uids.add(pwd.getpwnam(name).pw_uid)
            except KeyError:
                continue
        uids.update(u.pw_uid for u in pwd.getpwall() if u.pw_gid == group.gr_gid)
    return frozenset(uids)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


class KeyAuthMiddleware(AbstractAuthenticationMiddleware):
    """Every method is authenticated, OPTIONS included (no CORS is served). A failure is
    counted for its client address (`auth.failures`) rather than recorded on its own."""

    def __init__(self, app: ASGIApp, **kwargs: Any) -> None:
        super().__init__(app, exclude_http_methods=[], **kwargs)

    async def authenticate_request(self, connection: ASGIConnection[Any, Any, Any, Any]) -> AuthenticationResult:
        services = connection.app.state.services
        uid = local_uid(connection.scope)
        if uid is not None:
            if uid not in services.local_uids:
                raise PermissionDenied(f"uid {uid} may not use the admin socket.")
            return AuthenticationResult(user=local_admin(uid, _user_name(uid)), auth=None)
        header = connection.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        presented = key.strip() if scheme.lower() == "bearer" else None
        try:
            principal = services.keys.authenticate(presented)
        except AuthenticationFailed as exc:
            ctx = find_context(connection.scope)
            client = ctx.client if ctx else ""
            if ctx is not None:
                ctx.auth_failed = True
            wait = services.auth_failures.record(client, exc.reason)
            if wait is not None:
                raise RateLimited("Too many failed authentication attempts from this address.", retry_after=wait) from None
            raise
        return AuthenticationResult(user=principal, auth=None)


async def role_guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """Fail closed: a route that declares no roles is refused to everyone, except the OPTIONS
    answer litestar adds to every path, which any authenticated principal may read. Async
    although it never waits: litestar runs a sync guard on a worker thread, a hop per request."""
    if handler.opt.get("public"):
        return
    principal: Principal = connection.user
    allowed: Collection[Role] | None = handler.opt.get(ROLES_KEY)
    if allowed is None:
        if connection.scope.get("method") == "OPTIONS":
            return
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
