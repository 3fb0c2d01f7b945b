"""Admin endpoints for remote upstreams: list, set (create or replace) and delete. API keys
go in, never out: a response says only whether one is set."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, delete, get, put
from litestar.params import FromPath, JSONBody, Parameter
from msgspec import UNSET, Meta, UnsetType

from appliance.api.context import change
from appliance.api.responses import Out, errors
from appliance.api.security import roles
from appliance.api.services import ServicesDep
from appliance.auth import Principal, Role
from appliance.routing.upstream_registry import (
    BASE_URL_PATTERN,
    KEEP,
    KEY_PATTERN,
    MODEL_PATTERN,
    NAME_PATTERN,
    Upstream,
)

__all__ = ["ROUTES", "SetUpstreamRequest", "UpstreamInfo", "UpstreamList"]

ADMIN = roles(Role.ADMIN)
READ = roles(Role.OPERATOR)

Price = Annotated[float, Meta(ge=0, le=1e6)]


UpstreamName = Annotated[str, Parameter(pattern=NAME_PATTERN, max_length=64, description="the upstream's name")]


class SetUpstreamRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    """Every setting of the upstream; those left out take their defaults, except `api_key`:
    left out, the stored key is kept; null removes it."""

    base_url: Annotated[
        str, Meta(min_length=1, max_length=2048, pattern=BASE_URL_PATTERN, description="http(s)://host[:port][/path], e.g. http://10.0.0.5:8000/v1")
    ]
    models: Annotated[list[Annotated[str, Meta(min_length=1, max_length=256, pattern=MODEL_PATTERN)]], Meta(min_length=1, max_length=256)]
    api_key: Annotated[str, Meta(min_length=1, max_length=4096, pattern=KEY_PATTERN)] | None | UnsetType = UNSET
    prompt_price_per_1k: Price = 0.0
    completion_price_per_1k: Price = 0.0
    timeout_seconds: Annotated[float, Meta(gt=0, le=600, description="Deadline for the first token, retries included")] = 30.0
    max_retries: Annotated[int, Meta(ge=0, le=5)] = 2


class UpstreamInfo(Out):
    name: str
    base_url: str
    models: list[str]
    api_key: Literal["set"] | None  # never the key itself
    prompt_price_per_1k: float
    completion_price_per_1k: float
    timeout_seconds: float
    max_retries: int
    created_at: str
    updated_at: str


class UpstreamList(Out):
    object: Literal["list"]
    data: list[UpstreamInfo]


def upstream_info(upstream: Upstream) -> UpstreamInfo:
    return msgspec.convert(upstream.to_dict(), UpstreamInfo)


@get("/admin/upstreams", opt=READ, name="upstreams:list", responses=errors())
async def list_upstreams(services: ServicesDep) -> UpstreamList:
    return UpstreamList(object="list", data=[upstream_info(u) for u in services.upstreams.list()])


@put("/admin/upstreams/{name:str}", opt=ADMIN, name="upstreams:set", responses=errors())
async def set_upstream(
    request: Request[Principal, Any, Any], name: UpstreamName, data: JSONBody[SetUpstreamRequest], services: ServicesDep
) -> UpstreamInfo:
    """Create the upstream or replace its settings (400 naming the parameter for a bad value)."""
    upstream = await change(
        request,
        services.upstreams.set,
        name,
        base_url=data.base_url,
        models=data.models,
        api_key=KEEP if data.api_key is UNSET else data.api_key,
        prompt_price_per_1k=data.prompt_price_per_1k,
        completion_price_per_1k=data.completion_price_per_1k,
        timeout_seconds=data.timeout_seconds,
        max_retries=data.max_retries,
    )
    return upstream_info(upstream)


@delete("/admin/upstreams/{name:str}", opt=ADMIN, name="upstreams:delete", status_code=200, responses=errors(404))
async def delete_upstream(request: Request[Principal, Any, Any], name: FromPath[str], services: ServicesDep) -> UpstreamInfo:
    """Delete the upstream and its key; returns what it was."""
    return upstream_info(await change(request, services.upstreams.delete, name))


ROUTES = [list_upstreams, set_upstream, delete_upstream]
