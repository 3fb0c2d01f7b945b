"""`create_app(settings)`: all wiring of the HTTP application in one place."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar, Router
from litestar.datastructures import State
from litestar.di import Provide
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.types import Message, Scope

from appliance.api import (
    audit_routes,
    health_routes,
    keys_routes,
    models_routes,
    openai_routes,
    plugins_routes,
    teams_routes,
)
from appliance.api.audit_middleware import AuditMiddleware
from appliance.api.context import assign_request_id
from appliance.api.errors import EXCEPTION_HANDLERS
from appliance.api.network import HostCheckMiddleware, TrustedProxies, allowed_hosts
from appliance.api.openapi import ExactJsonRenderPlugin
from appliance.api.options import allow_handlers
from appliance.api.security import ANY_ROLE, KeyAuthMiddleware, UngovernedMiddleware, role_guard, trusted_local_uids
from appliance.api.services import Services
from appliance.audit import AuditLog
from appliance.auth import KeyService, load_or_create_server_secret
from appliance.auth.failures import FailedAuthCounter
from appliance.config import Settings
from appliance.engine_pool import EnginePool, load_local_engines
from appliance.governance import Governance
from appliance.inference import InferenceService
from appliance.metering import BudgetService, CostModel, RateLimiter
from appliance.model_registry import ModelRegistry
from appliance.plugin_manager import PluginManager
from appliance.plugin_wiring import connect_plugins, plugin_app_info
from appliance.store import Store
from appliance.teams import TeamService
from appliance.work import WorkPool
from runtime.gpu import read_power_watts

log = logging.getLogger(__name__)
ROUTES = [
    *health_routes.ROUTES,
    *openai_routes.ROUTES,
    *keys_routes.ROUTES,
    *teams_routes.ROUTES,
    *audit_routes.ROUTES,
    *models_routes.ROUTES,
    *plugins_routes.ROUTES,
]


def build_services(settings: Settings, pool: EnginePool | None = None, *, governed: bool = True) -> Services:
    """Open the store and build every service except the engines (loaded in the lifespan)."""
    paths = settings.paths
    paths.ensure()
    store = Store(paths.database, backups_dir=paths.backups).open()
    pool = pool if pool is not None else EnginePool()
    audit = AuditLog.from_settings(store, settings)
    budgets = BudgetService(store, audit, currency=settings.costs.currency)
    budgets.load()
    costs = CostModel(settings.costs, settings.upstream_prices, power_watts_source=read_power_watts)
    auth = settings.auth
    work = WorkPool()
    plugins = PluginManager(settings.plugins, only=settings.plugin_filter).load()
    governance = Governance(settings, store, audit, costs, budgets, RateLimiter(), enabled=governed, work=work)
    connect_plugins(plugins, store, audit, governance)
    return Services(
        settings=settings,
        store=store,
        keys=KeyService(
            store, load_or_create_server_secret(paths.server_secret), audit, expiry_warning_days=auth.expiry_warning_days
        ),
        models=ModelRegistry(store, paths.models, audit),
        pool=pool,
        inference=InferenceService(pool, default_max_tokens=settings.runtime.default_max_tokens, work=work),
        teams=TeamService(store, audit),
        budgets=budgets,
        audit=audit,
        governance=governance,
        auth_failures=FailedAuthCounter(audit, window_seconds=auth.failure_window_seconds, limit=auth.failure_limit),
        trusted_proxies=TrustedProxies(settings.server.trusted_proxies),
        local_uids=trusted_local_uids(settings.server.admin_group),
        plugins=plugins,
    )


def create_app(settings: Settings, *, pool: EnginePool | None = None, governed: bool = True) -> Litestar:
    """The appliance's HTTP app. With `pool` given, its engines are served instead of
    loading the registered models (benchmarks and fault-injection tests use this).

    `governed=False` builds the same app with authentication, metering and audit switched
    off. It exists only so `bench/gateway.py` can measure what they cost; the CLI never
    builds it."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        services = build_services(settings, pool, governed=governed)
        if pool is None:
            loaded = await load_local_engines(settings, services.models)
            for engine in loaded.engines():
                services.pool.add(engine)
            services.pool.failures.update(loaded.failures)
        app.state.services = services
        await services.plugins.broadcast("startup", plugin_app_info(settings))
        background = [
            asyncio.create_task(services.audit.run_periodic_checkpoints()),
            asyncio.create_task(services.auth_failures.run()),
        ]
        log.info("serving models: %s", ", ".join(services.pool.names()) or "none")
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await services.pool.close()
            await services.governance.drain()
            await services.plugins.broadcast("shutdown", plugin_app_info(settings))
            services.plugins.close()
            with contextlib.suppress(Exception):
                await services.auth_failures.flush(everything=True)
            try:
                await services.audit.checkpoint_if_due(force=True)
            except Exception:
                log.exception("final audit checkpoint failed")
            services.store.close()

    openapi = OpenAPIConfig(
        title="Appliance API",
        version="1",
        path="/schema",
        render_plugins=[ExactJsonRenderPlugin()],
        openapi_router=Router(path="/schema", route_handlers=[], opt=dict(ANY_ROLE), include_in_schema=False),
    )
    auth = DefineMiddleware(KeyAuthMiddleware) if governed else UngovernedMiddleware
    return Litestar(
        route_handlers=[*allow_handlers(ROUTES), *ROUTES],
        lifespan=[lifespan],
        dependencies={"services": Provide(_services, sync_to_thread=False)},
        middleware=[DefineMiddleware(HostCheckMiddleware, hosts=allowed_hosts(settings)), AuditMiddleware, auth],
        guards=[role_guard],
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        before_send=[_add_request_id],
        request_max_body_size=settings.server.max_body_bytes,
        openapi_config=openapi,
        logging_config=None,
        debug=False,
    )


def _services(state: State) -> Services:
    return state.services  # type: ignore[no-any-return]


async def _add_request_id(message: Message, scope: Scope) -> None:
    if message["type"] != "http.response.start":
        return
    headers = list(message.get("headers", []))
    headers.append((b"x-request-id", assign_request_id(scope).encode()))
    message["headers"] = headers  # type: ignore[typeddict-unknown-key]
