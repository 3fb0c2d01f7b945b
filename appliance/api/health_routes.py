"""Liveness and readiness, the only endpoints that need no key."""

from __future__ import annotations

from typing import Any

from litestar import Response, get

from appliance.api.security import PUBLIC
from appliance.api.services import ServicesDep


@get("/healthz", opt=PUBLIC, name="health:live", include_in_schema=True)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz", opt=PUBLIC, name="health:ready")
async def readyz(services: ServicesDep) -> Response[dict[str, Any]]:
    models = {e.name: e.health().ok for e in services.pool.engines()}
    ready = any(models.values())
    body = {"status": "ready" if ready else "not ready", "models": models}
    return Response(body, status_code=200 if ready else 503, headers={} if ready else {"Retry-After": "5"})


ROUTES = [healthz, readyz]
