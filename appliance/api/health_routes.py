"""Liveness and readiness, the only endpoints that need no key."""

from __future__ import annotations

from litestar import Response, get
from litestar.openapi.datastructures import ResponseSpec

from appliance.api.responses import Liveness, Readiness
from appliance.api.security import PUBLIC
from appliance.api.services import ServicesDep

_NOT_READY = {503: ResponseSpec(Readiness, description="No model can serve yet; see Retry-After.", generate_examples=False)}


@get("/healthz", opt=PUBLIC, name="health:live")
async def healthz() -> Liveness:
    return Liveness(status="ok")


@get("/readyz", opt=PUBLIC, name="health:ready", responses=_NOT_READY)
async def readyz(services: ServicesDep) -> Response[Readiness]:
    models = {e.name: e.health().ok for e in services.pool.engines()}
    ready = any(models.values())
    body = Readiness(status="ready" if ready else "not ready", models=models)
    return Response(body, status_code=200 if ready else 503, headers={} if ready else {"Retry-After": "5"})


ROUTES = [healthz, readyz]
