"""`create_app(settings)`: all wiring of the HTTP application in one place."""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar, Router
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.types import Message, Scope

from appliance.api import admin_routes, health_routes, openai_routes
from appliance.api.errors import EXCEPTION_HANDLERS
from appliance.api.security import ANY_ROLE, KeyAuthMiddleware, role_guard
from appliance.api.services import Services
from appliance.auth import KeyService, load_or_create_server_secret
from appliance.config import Settings
from appliance.engine_pool import EnginePool, load_local_engines
from appliance.inference import InferenceService
from appliance.model_registry import ModelRegistry
from appliance.store import Store

log = logging.getLogger(__name__)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def build_services(settings: Settings, pool: EnginePool | None = None) -> Services:
    """Open the store and build every service except the engines (loaded in the lifespan)."""
    paths = settings.paths
    paths.ensure()
    store = Store(paths.database, backups_dir=paths.backups).open()
    pool = pool if pool is not None else EnginePool()
    return Services(
        settings=settings,
        store=store,
        keys=KeyService(store, load_or_create_server_secret(paths.server_secret)),
        models=ModelRegistry(store, paths.models),
        pool=pool,
        inference=InferenceService(pool),
    )


def create_app(settings: Settings, *, pool: EnginePool | None = None) -> Litestar:
    """The appliance's HTTP app. With `pool` given, its engines are served instead of
    loading the registered models (benchmarks and fault-injection tests use this)."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        services = build_services(settings, pool)
        if pool is None:
            loaded = await load_local_engines(settings, services.models)
            for engine in loaded.engines():
                services.pool.add(engine)
            services.pool.failures.update(loaded.failures)
        app.state.services = services
        log.info("serving models: %s", ", ".join(services.pool.names()) or "none")
        try:
            yield
        finally:
            await services.pool.close()
            services.store.close()

    openapi = OpenAPIConfig(
        title="Appliance API",
        version="1",
        path="/schema",
        render_plugins=[JsonRenderPlugin()],
        openapi_router=Router(path="/schema", route_handlers=[], opt=dict(ANY_ROLE)),
    )
    return Litestar(
        route_handlers=[*health_routes.ROUTES, *openai_routes.ROUTES, *admin_routes.ROUTES],
        lifespan=[lifespan],
        dependencies={"services": Provide(_services, sync_to_thread=False)},
        middleware=[KeyAuthMiddleware],
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
    state: dict[str, Any] = scope.setdefault("state", {})  # type: ignore[assignment]
    request_id = state.get("request_id")
    if request_id is None:
        incoming = dict(scope.get("headers", [])).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID.match(incoming) else secrets.token_hex(12)
        state["request_id"] = request_id
    headers = list(message.get("headers", []))
    headers.append((b"x-request-id", request_id.encode()))
    message["headers"] = headers  # type: ignore[typeddict-unknown-key]
