"""The operator's view of the models: what is registered, what is loaded and how it runs."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import get

from appliance.api.responses import ModelStatus, ModelStatusList, errors
from appliance.api.security import roles
from appliance.api.services import ServicesDep
from appliance.auth import Role
from runtime.backend import loaded_report

OPERATE = roles(Role.OPERATOR)


@get("/admin/models", opt=OPERATE, name="models:status", responses=errors())
async def model_status(services: ServicesDep) -> ModelStatusList:
    """Each registered model, its health and engine stats (the CPU variant and weight layouts
    it runs on in `stats.extra`), and the llama.cpp backends of this process."""
    loaded = {e.name: e for e in services.pool.engines()}
    data = []
    for record in services.models.list():
        engine = loaded.get(record.name)
        entry: dict[str, Any] = record.to_dict() | {"loaded": engine is not None}
        if engine is not None:
            health = engine.health()
            entry["health"] = {"ok": health.ok, "detail": health.detail}
            entry["stats"] = _plain(engine.stats())
        elif record.name in services.pool.failures:
            entry["error"] = services.pool.failures[record.name]
        data.append(msgspec.convert(entry, ModelStatus))
    report = loaded_report()
    return ModelStatusList(object="list", data=data, backend=report.to_dict() if report else None)


def _plain(stats: Any) -> dict[str, Any]:
    return {name: getattr(stats, name) for name in stats.__dataclass_fields__}


ROUTES = [model_status]
