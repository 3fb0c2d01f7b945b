"""Authentication (bearer key, or the peer's uid on the local admin socket -> principal) and
the role check every route goes through."""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Collection
from typing import Any

from litestar.handlers.base import BaseRouteHandler
from litestar.types import ASGIApp, Receive, Scope, Send

from appliance.api.context import find_context
from appliance.api.network import local_uid
from appliance.auth import Principal, Role, local_admin
from appliance.errors import AuthenticationFailed, PermissionDenied, RateLimited

PUBLIC: dict[str, Any] = {"public": True}  # no key asked for, no role checked
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


class KeyAuthMiddleware:
    """Authenticates every request to a route that is not public (every method, OPTIONS
    included: no CORS is served), then checks the route's roles (`authorize`). A failure is
    counted for its client address (`auth.failures`) rather than recorded on its own.

    The role check is here rather than in a litestar guard because litestar hands each guard
    a copy of the route handler, made anew for every request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler: BaseRouteHandler = scope["route_handler"]  # type: ignore[typeddict-item]
        if scope["type"] == "http" and not handler.opt.get("public"):
            principal = self._authenticate(scope)
            scope["user"] = principal
            authorize(principal, handler, scope)
        await self.app(scope, receive, send)

    @staticmethod
    def _authenticate(scope: Scope) -> Principal:
        services = scope["app"].state.services
        uid = local_uid(scope)
        if uid is not None:
            if uid not in services.local_uids:
                raise PermissionDenied(f"uid {uid} may not use the admin socket.")
            return local_admin(uid, _user_name(uid))
        header = next((value for name, value in scope["headers"] if name == b"authorization"), b"").decode("latin-1")
        scheme, _, key = header.partition(" ")
        presented = key.strip() if scheme.lower() == "bearer" else None
        try:
            return services.keys.authenticate(presented)  # type: ignore[no-any-return]
        except AuthenticationFailed as exc:
            ctx = find_context(scope)
            client = ctx.client if ctx else ""
            if ctx is not None:
                ctx.auth_failed = True
            wait = services.auth_failures.record(client, exc.reason)
            if wait is not None:
                raise RateLimited("Too many failed authentication attempts from this address.", retry_after=wait) from None
            raise


def authorize(principal: Principal, handler: BaseRouteHandler, scope: Scope) -> None:
    """Fail closed: a route that declares no roles is refused to everyone, except the OPTIONS
    answer litestar adds to every path, which any authenticated principal may read."""
    allowed: Collection[Role] | None = handler.opt.get(ROLES_KEY)
    if allowed is None:
        if scope.get("method") == "OPTIONS":
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
        handler: BaseRouteHandler = scope["route_handler"]  # type: ignore[typeddict-item]
        if scope["type"] == "http" and not handler.opt.get("public"):
            scope["user"] = self._PRINCIPAL
            authorize(self._PRINCIPAL, handler, scope)
        await self.app(scope, receive, send)
