"""Liveness and readiness, the only endpoints that need no key."""

from __future__ import annotations

from litestar import Response, get
from litestar.openapi.datastructures import ResponseSpec

from appliance.api.responses import Liveness, Readiness
from appliance.api.security import PUBLIC
from appliance.api.services import Services, ServicesDep

_NOT_READY = {503: ResponseSpec(Readiness, description="No model can serve yet; see Retry-After.", generate_examples=False)}


@get("/healthz", opt=PUBLIC, name="health:live")
async def healthz() -> Liveness:
    return Liveness(status="ok")


@get("/readyz", opt=PUBLIC, name="health:ready", responses=_NOT_READY)
async def readyz(services: ServicesDep) -> Response[Readiness]:
    """Ready when the database works and its last check passed, and a model is loaded and
    healthy or can be loaded on demand (an idle unload does not make the box unready)."""
    pool = services.pool
    models = {e.name: e.health().ok for e in pool.engines()}
    loadable = [
        r.name for r in services.models.list() if r.name not in models and pool.loadable(r.name) and r.name not in pool.failures
    ]
    reasons = _database_problems(services)
    if not any(models.values()) and not loadable:
        reasons.append("no model is loaded or loadable" + (f" ({_failures(pool.failures)})" if pool.failures else ""))
    ready = not reasons
    body = Readiness(status="ready" if ready else "not ready", models=models, loadable=loadable, reasons=reasons)
    return Response(body, status_code=200 if ready else 503, headers={} if ready else {"Retry-After": "5"})


def _database_problems(services: Services) -> list[str]:
    try:
        services.store.query_one("SELECT 1 FROM audit LIMIT 1")
    except Exception as exc:  # noqa: BLE001 - any failure to read is the answer
        return [f"the database cannot be read: {type(exc).__name__}"]
    last = services.checks.get("sqlite").last if services.checks is not None and "sqlite" in services.checks.names() else None
    if last is not None and last.status in ("fail", "error"):
        return [f"the database check failed: {last.summary}"]
    return []


def _failures(failures: dict[str, str]) -> str:
    return "; ".join(f"{name}: {why}" for name, why in sorted(failures.items()))[:500]


ROUTES = [healthz, readyz]
