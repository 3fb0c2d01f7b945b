"""`create_app(settings)`: all wiring of the HTTP application in one place."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

from litestar import Litestar, Router
from litestar.datastructures import State
from litestar.di import Provide
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.types import Message, Scope

from appliance.api import (
    alerts_routes,
    audit_routes,
    checks_routes,
    drift_routes,
    feedback_routes,
    health_routes,
    keys_routes,
    metrics_routes,
    models_routes,
    openai_routes,
    plugins_routes,
    routing_routes,
    teams_routes,
    upstreams_routes,
)
from appliance.api.audit_middleware import AuditMiddleware
from appliance.api.context import assign_request_id
from appliance.api.errors import EXCEPTION_HANDLERS
from appliance.api.metrics_server import start_metrics_server
from appliance.api.network import HostCheckMiddleware, TrustedProxies, allowed_hosts
from appliance.api.openapi import ExactJsonRenderPlugin
from appliance.api.options import allow_handlers
from appliance.api.security import ANY_ROLE, KeyAuthMiddleware, UngovernedMiddleware, trusted_local_uids
from appliance.api.services import Services
from appliance.api.strict_bodies import strict_body
from appliance.audit import AuditLog
from appliance.auth import KeyService, load_or_create_server_secret
from appliance.auth.failures import FailedAuthCounter
from appliance.checks.metrics import Metrics
from appliance.checks.wiring import forwarding_task, start_checks, stop_checks
from appliance.config import Settings
from appliance.engine_pool import EnginePool
from appliance.governance import Governance
from appliance.inference import InferenceService
from appliance.metering import BudgetService, CostModel, RateLimiter
from appliance.model_pins import Pins
from appliance.model_pool import ModelPool
from appliance.model_registry import ModelRegistry
from appliance.plugin_manager import PluginManager
from appliance.plugin_wiring import connect_plugins, plugin_app_info
from appliance.routing.breakers import BreakerPolicy, Breakers
from appliance.routing.calibration import CalibrationService
from appliance.routing.catalog import Catalog
from appliance.routing.dispatch import Dispatcher
from appliance.routing.prober import CanaryProber
from appliance.routing.router import Router as RequestRouter
from appliance.routing.routes import RouteStore
from appliance.routing.scoring import calibration_path, difficulty_scorer
from appliance.routing.secrets import SecretBox
from appliance.routing.upstream_registry import UpstreamRegistry
from appliance.routing.upstreams import UpstreamEngines, upstream_client
from appliance.store import Store
from appliance.teams import TeamService
from appliance.work import WorkPool
from runtime.engine import Engine
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
    *routing_routes.ROUTES,
    *upstreams_routes.ROUTES,
    *checks_routes.ROUTES,
    *alerts_routes.ROUTES,
    *drift_routes.ROUTES,
    *feedback_routes.ROUTES,
    *metrics_routes.ROUTES,
]


def build_services(settings: Settings, pool: EnginePool | None = None, *, governed: bool = True) -> Services:
    """Open the store and build every service except the engines (loaded in the lifespan)."""
    paths = settings.paths
    paths.ensure()
    store = Store(paths.database, backups_dir=paths.backups).open()
    audit = AuditLog.from_settings(store, settings)
    models = ModelRegistry(store, paths.models, audit)
    # Given `pool`: its engines are served as they are; else the registered models, on demand.
    pool = ModelPool(
        settings, models, Pins(store, audit), audit, engines=pool.engines() if pool else (), on_demand=pool is None
    )
    budgets = BudgetService(store, audit, currency=settings.costs.currency)
    budgets.load()
    costs = CostModel(settings.costs, settings.upstream_prices, power_watts_source=read_power_watts)
    auth = settings.auth
    work = WorkPool()
    plugins = PluginManager(settings.plugins, only=settings.plugin_filter).load()
    governance = Governance(settings, store, audit, costs, budgets, RateLimiter(), enabled=governed, work=work)
    connect_plugins(plugins, store, audit, governance)
    inference = InferenceService(pool, default_max_tokens=settings.runtime.default_max_tokens, work=work)
    routing = settings.routing
    upstreams = UpstreamRegistry(store, audit, SecretBox(paths.upstream_secret_key))
    remote = UpstreamEngines(upstreams, upstream_client(), prices=costs)
    catalog = Catalog(
        pool, models, remote=remote.get, remote_names=remote.names, load=pool.acquire if pool.on_demand else None,
        loadable=pool.loadable,
    )
    breakers = Breakers(BreakerPolicy(routing.breaker_failures, routing.breaker_window_seconds, routing.breaker_cooldown_seconds))
    routes = RouteStore(
        store, audit, known=catalog.registered, taken=lambda name: models.find(name) is not None or name in pool
    )
    router = RequestRouter(
        routes,
        catalog,
        estimate_cost=lambda model, prompt, completion, extra: costs.estimate(model, prompt, completion, extra_seconds=extra),
        scorer=lambda: difficulty_scorer(settings),
        default_max_tokens=settings.runtime.default_max_tokens,
    )
    prober = CanaryProber(breakers, catalog, interval_seconds=max(1.0, routing.breaker_cooldown_seconds / 2))
    calibration = CalibrationService(store, audit, calibration_path(settings), on_change=router.reset_scorer)
    return Services(
        settings=settings,
        store=store,
        keys=KeyService(
            store, load_or_create_server_secret(paths.server_secret), audit, expiry_warning_days=auth.expiry_warning_days
        ),
        models=models,
        pool=pool,
        inference=inference,
        teams=TeamService(store, audit),
        budgets=budgets,
        audit=audit,
        governance=governance,
        auth_failures=FailedAuthCounter(audit, window_seconds=auth.failure_window_seconds, limit=auth.failure_limit),
        trusted_proxies=TrustedProxies(settings.server.trusted_proxies),
        local_uids=trusted_local_uids(settings.server.admin_group),
        plugins=plugins,
        catalog=catalog,
        upstreams=upstreams,
        remote=remote,
        breakers=breakers,
        router=router,
        calibration=calibration,
        prober=prober,
        dispatcher=Dispatcher(
            inference, governance, breakers, catalog.engine, first_token_timeout=routing.first_token_timeout_seconds
        ),
    )


def create_app(
    settings: Settings, *, pool: EnginePool | None = None, governed: bool = True, extra_engines: Iterable[Engine] = ()
) -> Litestar:
    """The appliance's HTTP app. With `pool` given, its engines are served instead of
    loading the registered models (benchmarks and fault-injection tests use this);
    `extra_engines` are served beside the registered models (fault-injection tests).

    `governed=False` builds the same app with authentication, metering and audit switched
    off. It exists only so `bench/gateway.py` can measure what they cost; the CLI never
    builds it."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        services = build_services(settings, pool, governed=governed)
        if pool is None:
            await services.pool.start()
            for engine in extra_engines:
                services.pool.add(engine)
        app.state.services = services
        services.remote.refresh()  # upstream prices known before the first request
        await services.plugins.broadcast("startup", plugin_app_info(settings))
        services.metrics = Metrics(services)
        metrics_server = await start_metrics_server(settings, services.metrics)
        background = [
            asyncio.create_task(services.audit.run_periodic_checkpoints()),
            asyncio.create_task(services.auth_failures.run()),
            asyncio.create_task(services.pool.run_idle_unloads()),
            asyncio.create_task(services.prober.run()),
        ]
        start_checks(services, asyncio.get_running_loop())
        forwarding = forwarding_task(services)
        if forwarding is not None:
            background.append(forwarding)
        log.info("serving models: %s", ", ".join(services.pool.names()) or "none")
        try:
            yield
        finally:
            if metrics_server is not None:
                await metrics_server.close()
            for task in background:
                task.cancel()
            await stop_checks(services)
            await services.pool.close()
            await services.remote.close()
            await services.remote.client.aclose()
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
    auth = KeyAuthMiddleware if governed else UngovernedMiddleware
    return Litestar(
        route_handlers=[*allow_handlers(ROUTES), *ROUTES],
        lifespan=[lifespan],
        dependencies={"services": Provide(_services, sync_to_thread=False)},
        middleware=[DefineMiddleware(HostCheckMiddleware, hosts=allowed_hosts(settings)), AuditMiddleware, auth],
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        before_request=strict_body,
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
