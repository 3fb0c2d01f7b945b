"""The operator's view of the models: what is registered, what is loaded and how it runs, the
pool's memory budget; and loading, unloading, pinning and unpinning them (each audited)."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, get, post
from litestar.params import FromPath

from appliance.api.context import admin_actor, request_context
from appliance.api.responses import BudgetOut, ModelChange, ModelStatus, ModelStatusList, errors
from appliance.api.security import roles
from appliance.api.services import Services, ServicesDep
from appliance.auth import Principal, Role
from appliance.model_pool import ModelPool, mb
from appliance.model_registry import RegisteredModel
from appliance.routing.breakers import Breakers
from runtime.backend import loaded_report

OPERATE = roles(Role.OPERATOR)


def model_pool(services: Services) -> ModelPool:
    return services.pool


def model_entry(pool: ModelPool, record: RegisteredModel, breakers: Breakers) -> dict[str, Any]:
    """One model's status: the registry's record, the pool's view, and its engine's."""
    name = record.name
    engine = pool.peek(name)
    entry: dict[str, Any] = record.to_dict() | {
        "loaded": engine is not None,
        "loading": pool.loading(name),
        "pinned": pool.pinned(name),
        "memory_bytes": pool.memory_bytes(name),
        "last_used": pool.last_used(name),
        "idle_unload_seconds": pool.idle_unload_seconds(name),
    }
    if engine is not None:
        health = engine.health()
        entry["health"] = {"ok": health.ok, "detail": health.detail}
        entry["stats"] = _plain(engine.stats())
    elif name in pool.failures:
        entry["error"] = pool.failures[name]
    entry["breaker"] = breakers.get(name).to_dict()
    return entry


@get("/admin/models", opt=OPERATE, name="models:status", responses=errors())
async def model_status(services: ServicesDep) -> ModelStatusList:
    """Each registered model: loaded or not, pinned, what it takes in memory, when it was last
    used, its health and engine stats (the CPU variant and weight layouts it runs on in
    `stats.extra`); the pool's memory budget; and the llama.cpp backends of this process."""
    pool = model_pool(services)
    data = [msgspec.convert(model_entry(pool, r, services.breakers), ModelStatus) for r in services.models.list()]
    budget = msgspec.convert((await pool.measure()).to_dict(), BudgetOut)
    report = loaded_report()
    return ModelStatusList(object="list", data=data, budget=budget, backend=report.to_dict() if report else None)


def _change(request: Request[Principal, Any, Any], pool: ModelPool, name: str, action: Any, message: str,
            evicted: list[str] | None = None) -> ModelChange:
    request_context(request.scope).recorded = True  # the pool wrote the admin record
    return ModelChange(
        name=name, action=action, loaded=name in pool, pinned=pool.pinned(name), memory_bytes=pool.memory_bytes(name),
        evicted=evicted or [], message=message,
    )


@post("/admin/models/{name:str}/load", opt=OPERATE, name="models:load", status_code=200, responses=errors(404, 409, 503))
async def load_model(request: Request[Principal, Any, Any], name: FromPath[str], services: ServicesDep) -> ModelChange:
    """Load a registered model now (a no-op when it is loaded). Idle unpinned models are
    evicted, least recently used first, when that makes room; 503 when nothing would."""
    pool = model_pool(services)
    loaded = await pool.load(name, actor=admin_actor(request))
    size = pool.memory_bytes(name)
    message = f"{name} is loaded" + (f" ({mb(size)} MB)" if size else "")
    if loaded.evicted:
        message += f"; evicted {', '.join(loaded.evicted)} to make room"
    return _change(request, pool, name, "load", message, loaded.evicted)


@post("/admin/models/{name:str}/unload", opt=OPERATE, name="models:unload", status_code=200, responses=errors(404, 409))
async def unload_model(request: Request[Principal, Any, Any], name: FromPath[str], services: ServicesDep) -> ModelChange:
    """Unload a model (a no-op when it is not loaded); 409 when it is pinned or serving. It
    loads again on its next request."""
    pool = model_pool(services)
    await pool.unload(name, actor=admin_actor(request))
    return _change(request, pool, name, "unload", f"{name} is not loaded")


@post("/admin/models/{name:str}/pin", opt=OPERATE, name="models:pin", status_code=200, responses=errors(404))
async def pin_model(request: Request[Principal, Any, Any], name: FromPath[str], services: ServicesDep) -> ModelChange:
    """Keep a model loaded whatever its idle time, and never evict it (across restarts).
    Pinning does not load it."""
    pool = model_pool(services)
    await pool.pin(name, True, actor=admin_actor(request))
    return _change(request, pool, name, "pin", f"{name} is pinned" + ("" if name in pool else " (not loaded)"))


@post("/admin/models/{name:str}/unpin", opt=OPERATE, name="models:unpin", status_code=200, responses=errors(404))
async def unpin_model(request: Request[Principal, Any, Any], name: FromPath[str], services: ServicesDep) -> ModelChange:
    """Let a model be unloaded when idle, and evicted to make room."""
    pool = model_pool(services)
    await pool.pin(name, False, actor=admin_actor(request))
    return _change(request, pool, name, "unpin", f"{name} is not pinned")


def _plain(stats: Any) -> dict[str, Any]:
    return {name: getattr(stats, name) for name in stats.__dataclass_fields__}


ROUTES = [model_status, load_model, unload_model, pin_model, unpin_model]
