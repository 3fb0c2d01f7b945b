"""`create_app(settings)`: all wiring of the HTTP application in one place."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar, Router
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.types import Message, Scope

from appliance.api import admin_routes, governance_routes, health_routes, openai_routes
from appliance.api.audit_middleware import AuditMiddleware
from appliance.api.context import assign_request_id
from appliance.api.errors import EXCEPTION_HANDLERS
from appliance.api.security import ANY_ROLE, KeyAuthMiddleware, UngovernedMiddleware, role_guard
from appliance.api.services import Services
from appliance.audit import AuditLog
from appliance.auth import KeyService, load_or_create_server_secret
from appliance.config import Settings
from appliance.engine_pool import EnginePool, load_local_engines
from appliance.governance import Governance
from appliance.inference import InferenceService
from appliance.metering import BudgetService, CostModel, RateLimiter
from appliance.model_registry import ModelRegistry
from appliance.store import Store
from appliance.teams import TeamService
from runtime.gpu import read_power_watts

log = logging.getLogger(__name__)


def build_services(settings: Settings, pool: EnginePool | None = None, *, governed: bool = True) -> Services:
    """Open the store and build every service except the engines (loaded in the lifespan)."""
    paths = settings.paths
    paths.ensure()
    store = Store(paths.database, backups_dir=paths.backups).open()
    pool = pool if pool is not None else EnginePool()
    budgets = BudgetService(store, currency=settings.costs.currency)
    budgets.load()
    audit = AuditLog.from_settings(store, settings)
    costs = CostModel(settings.costs, settings.upstream_prices, power_watts_source=read_power_watts)
    return Services(
        settings=settings,
        store=store,
        keys=KeyService(store, load_or_create_server_secret(paths.server_secret)),
        models=ModelRegistry(store, paths.models),
        pool=pool,
        inference=InferenceService(pool),
        teams=TeamService(store),
        budgets=budgets,
        audit=audit,
        governance=Governance(settings, store, audit, costs, budgets, RateLimiter(), enabled=governed),
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
        checkpoints = asyncio.create_task(services.audit.run_periodic_checkpoints())
        log.info("serving models: %s", ", ".join(services.pool.names()) or "none")
        try:
            yield
        finally:
            checkpoints.cancel()
            await services.pool.close()
            try:
                await services.audit.checkpoint_if_due(force=True)
            except Exception:
                log.exception("final audit checkpoint failed")
            services.store.close()

    openapi = OpenAPIConfig(
        title="Appliance API",
        version="1",
        path="/schema",
        render_plugins=[JsonRenderPlugin()],
        openapi_router=Router(path="/schema", route_handlers=[], opt=dict(ANY_ROLE)),
    )
    return Litestar(
        route_handlers=[*health_routes.ROUTES, *openai_routes.ROUTES, *admin_routes.ROUTES, *governance_routes.ROUTES],
        lifespan=[lifespan],
        dependencies={"services": Provide(_services, sync_to_thread=False)},
        middleware=[AuditMiddleware, KeyAuthMiddleware] if governed else [AuditMiddleware, UngovernedMiddleware],
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
