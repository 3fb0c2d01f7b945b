"""Admin endpoints for plugins: their state, turning one on or off in the running server,
and the endpoints plugins contribute (`register_admin_routes`), under
`/admin/plugins/<plugin>/<path>`."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, get, post
from litestar.params import FromPath

from appliance.api.context import admin_actor, request_context
from appliance.api.responses import PluginInfo, PluginList, errors
from appliance.api.security import roles
from appliance.api.services import Services, ServicesDep
from appliance.api.strict_bodies import not_utf8
from appliance.auth import Principal, Role
from appliance.errors import AuditUnavailable, InvalidRequest, StoreError
from appliance.hookspecs import HOOKSPEC_VERSION

ADMIN = roles(Role.ADMIN)
_ROUTE_ERRORS = errors(404, 503)
_POST_ROUTE_ERRORS = errors(404, 413, 503)  # it reads a body the document cannot describe


def plugin_list(services: Services) -> PluginList:
    return PluginList(
        object="list", hookspec=HOOKSPEC_VERSION, data=[msgspec.convert(s, PluginInfo) for s in services.plugins.states()]
    )


@get("/admin/plugins", opt=roles(Role.OPERATOR), name="plugins:list", responses=errors())
async def list_plugins(services: ServicesDep) -> PluginList:
    """Every plugin found: version, source, hooks, state and last error."""
    return plugin_list(services)


async def _switch(request: Request[Principal, Any, Any], services: Services, name: str, on: bool) -> PluginInfo:
    """Turn the plugin on or off, and audit it; if the record cannot be written, the change
    is undone, so the running state never differs from what the log says."""
    plugin = services.plugins.get(name)
    before = services.plugins.state(name)
    saved = (plugin.enabled, plugin.status, plugin.last_error)
    if on:
        services.plugins.enable(name)
    else:
        services.plugins.disable(name)
    after = services.plugins.state(name)
    fields = ("enabled", "status", "last_error")
    record = services.audit.admin_fn(
        admin_actor(request),
        "plugins.enable" if on else "plugins.disable",
        name,
        before={k: before[k] for k in fields},
        after={k: after[k] for k in fields},
    )
    try:
        await services.store.write(record)
    except StoreError as exc:
        services.plugins.restore(name, *saved)
        raise AuditUnavailable(f"the audit record could not be written: {exc.message}") from exc
    request_context(request.scope).recorded = True
    return msgspec.convert(after, PluginInfo)


@post("/admin/plugins/{name:str}/enable", opt=ADMIN, name="plugins:enable", status_code=200, responses=errors(404, 409))
async def enable_plugin(request: Request[Principal, Any, Any], name: FromPath[str], services: ServicesDep) -> PluginInfo:
    """Turn a loaded plugin on in the running server, clearing its failure (until restart:
    `[plugins.<name>] enabled` in the config is what lasts)."""
    return await _switch(request, services, name, True)


@post("/admin/plugins/{name:str}/disable", opt=ADMIN, name="plugins:disable", status_code=200, responses=errors(404))
async def disable_plugin(request: Request[Principal, Any, Any], name: FromPath[str], services: ServicesDep) -> PluginInfo:
    """Stop calling a plugin in the running server (until enabled again, or a restart)."""
    return await _switch(request, services, name, False)


@get("/admin/plugins/{name:str}/routes/{path:path}", opt=ADMIN, name="plugins:route-get", responses=_ROUTE_ERRORS)
async def plugin_route_get(request: Request[Principal, Any, Any], name: FromPath[str], path: FromPath[str], services: ServicesDep) -> dict[str, Any]:
    """An endpoint a plugin contributed; what it returns is the plugin's own JSON object."""
    query = {k: v for k, v in request.query_params.items()}
    return dict(await services.plugins.call_admin_route(name, "GET", path, query, None))


@post("/admin/plugins/{name:str}/routes/{path:path}", opt=ADMIN, name="plugins:route-post", status_code=200, responses=_POST_ROUTE_ERRORS)
async def plugin_route_post(request: Request[Principal, Any, Any], name: FromPath[str], path: FromPath[str], services: ServicesDep) -> dict[str, Any]:
    """An endpoint a plugin contributed, with a JSON body (the plugin checks it)."""
    raw = await request.body()
    try:
        body = msgspec.json.decode(raw) if raw else None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"the body is not JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"the body is not JSON: {not_utf8(exc)}") from None
    query = {k: v for k, v in request.query_params.items()}
    return dict(await services.plugins.call_admin_route(name, "POST", path, query, body))


ROUTES = [list_plugins, enable_plugin, disable_plugin, plugin_route_get, plugin_route_post]
