"""Admin endpoints for routes (virtual models): list, show, set, delete, and explain a
decision without running it. Operators edit routes; every change is audited with its
before and after."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Request, delete, get, post, put
from litestar.params import FromPath, JSONBody, Parameter
from msgspec import Meta

from appliance.api.context import change
from appliance.api.responses import BreakerOut, Out, errors
from appliance.api.security import roles
from appliance.api.services import Services, ServicesDep
from appliance.auth import Principal, Role
from appliance.guardrails import parse_tags
from appliance.routing.calibration import MAX_EACH, MAX_PROMPT_CHARS
from appliance.routing.router import Need
from appliance.routing.routes import ROUTE_NAME_PATTERN, Route, RouteSpec

OPERATE = roles(Role.OPERATOR)
RouteName = Annotated[str, Parameter(pattern=ROUTE_NAME_PATTERN, max_length=64, description="a route's name")]


class RouteInfo(Out):
    name: str
    strategy: str
    description: str
    local_only: bool
    first_token_timeout_seconds: float | None
    candidates: list[dict[str, Any]]
    breakers: dict[str, BreakerOut]
    created_at: float
    updated_at: float


class RouteList(Out):
    object: str
    data: list[RouteInfo]


class ExplainRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A request to explain: the `model` (a route or a model) and its text, as `key_id` would
    send it (default: the caller)."""

    model: str
    prompt: Annotated[str, Meta(max_length=1_000_000)]
    kind: str = "chat"
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    json_mode: bool = False
    tags: str = ""  # as the x-appliance-tags header
    key_id: str | None = None


class Explanation(Out):
    requested: str
    route: str | None
    strategy: str | None
    candidates: list[str]
    skipped: dict[str, str]
    trail: str
    decided_us: float
    breakers: dict[str, BreakerOut]
    score: float | msgspec.UnsetType = msgspec.UNSET
    score_features: list[list[Any]] | msgspec.UnsetType = msgspec.UNSET


def route_info(services: Services, route: Route) -> RouteInfo:
    spec = msgspec.to_builtins(route.spec)
    breakers = {c.model: services.breakers.get(c.model).to_dict() for c in route.spec.candidates}
    return msgspec.convert(
        {
            "name": route.name,
            "strategy": route.spec.strategy,
            "description": route.spec.description,
            "local_only": route.spec.local_only,
            "first_token_timeout_seconds": route.spec.first_token_timeout_seconds,
            "candidates": spec["candidates"],
            "breakers": breakers,
            "created_at": route.created_at,
            "updated_at": route.updated_at,
        },
        RouteInfo,
    )


@get("/admin/routes", opt=OPERATE, name="routes:list", responses=errors())
async def list_routes(services: ServicesDep) -> RouteList:
    """Every route, with its candidates' circuit breakers."""
    return RouteList(object="list", data=[route_info(services, r) for r in services.router.routes.list()])


@get("/admin/routes/{name:str}", opt=OPERATE, name="routes:get", responses=errors(404))
async def get_route(name: FromPath[str], services: ServicesDep) -> RouteInfo:
    return route_info(services, services.router.routes.get(name))


@put("/admin/routes/{name:str}", opt=OPERATE, name="routes:set", responses=errors(404, 409))
async def set_route(
    request: Request[Principal, Any, Any], name: RouteName, data: JSONBody[RouteSpec], services: ServicesDep
) -> RouteInfo:
    """Create or replace a route (audited with its before and after)."""
    route = await change(request, services.router.routes.set, name, msgspec.to_builtins(data))
    return route_info(services, route)


@delete("/admin/routes/{name:str}", opt=OPERATE, name="routes:delete", status_code=200, responses=errors(404))
async def delete_route(request: Request[Principal, Any, Any], name: FromPath[str], services: ServicesDep) -> RouteInfo:
    return route_info(services, await change(request, services.router.routes.delete, name))


@post("/admin/routes/explain", opt=OPERATE, name="routes:explain", status_code=200, responses=errors(404))
async def explain_route(request: Request[Principal, Any, Any], data: JSONBody[ExplainRequest], services: ServicesDep) -> Explanation:
    """The routing decision for a request, without running it."""
    principal = services.keys.principal_of(data.key_id) if data.key_id else request.user
    need = Need(
        kind=data.kind if data.kind in ("chat", "completion", "embeddings") else "chat",
        json_mode=data.json_mode, tags=parse_tags(data.tags), text=data.prompt, max_tokens=data.max_tokens,
        prompt_tokens_estimate=len(data.prompt) // 4,
    )
    out = services.router.explain(principal, data.model, need)
    out["breakers"] = {name: services.breakers.get(name).to_dict() for name in out["candidates"]}
    return msgspec.convert(out, Explanation)


# A golden set's size, bounded so that the largest body of BMP text the schema admits (every
# character JSON-escaped to 6 bytes) fits the endpoint's own body limit below: it is a 400
# naming the field, not a 413. Text outside the BMP escapes to 12 bytes a character, and past
# the limit gets the 413 every body-taking operation documents.
GOLDEN_PROMPT_CHARS, GOLDEN_PER_LABEL = MAX_PROMPT_CHARS, MAX_EACH
CALIBRATION_MAX_BODY = 2 * GOLDEN_PER_LABEL * (GOLDEN_PROMPT_CHARS * 6 + 128) + 1024


class CalibrationExample(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    prompt: Annotated[str, Meta(max_length=GOLDEN_PROMPT_CHARS)]
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    json_mode: bool = False


class CalibrationRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A site's labelled requests (its golden set): at least 10 easy and 10 hard ones."""

    easy: Annotated[list[CalibrationExample], Meta(min_length=10, max_length=GOLDEN_PER_LABEL)]
    hard: Annotated[list[CalibrationExample], Meta(min_length=10, max_length=GOLDEN_PER_LABEL)]


class CalibrationOut(Out):
    calibrated: bool
    threshold: float
    packaged_threshold: float
    accuracy: float | msgspec.UnsetType = msgspec.UNSET
    hard_recall: float | msgspec.UnsetType = msgspec.UNSET
    examples: int | msgspec.UnsetType = msgspec.UNSET
    error: str | msgspec.UnsetType = msgspec.UNSET


@get("/admin/router/calibration", opt=OPERATE, name="router:calibration", responses=errors())
async def get_calibration(services: ServicesDep) -> CalibrationOut:
    """The difficulty threshold the `auto` strategy uses: the site's own, or the packaged one."""
    return msgspec.convert(services.calibration.current(), CalibrationOut)


@put("/admin/router/calibration", opt=OPERATE, name="router:calibrate", responses=errors(413),
     request_max_body_size=CALIBRATION_MAX_BODY)
async def calibrate(
    request: Request[Principal, Any, Any], data: JSONBody[CalibrationRequest], services: ServicesDep
) -> CalibrationOut:
    """Fit the threshold on the site's labelled requests; in force at once, audited."""
    examples = [msgspec.to_builtins(e) | {"label": label} for label in ("easy", "hard") for e in getattr(data, label)]
    return msgspec.convert(await change(request, services.calibration.calibrate, examples), CalibrationOut)


@delete("/admin/router/calibration", opt=OPERATE, name="router:reset_calibration", status_code=200, responses=errors())
async def reset_calibration(request: Request[Principal, Any, Any], services: ServicesDep) -> CalibrationOut:
    """Back to the packaged threshold (audited)."""
    return msgspec.convert(await change(request, services.calibration.reset), CalibrationOut)


ROUTES = [list_routes, explain_route, get_route, set_route, delete_route, get_calibration, calibrate, reset_calibration]
