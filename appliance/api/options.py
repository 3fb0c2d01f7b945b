"""OPTIONS for every path, with an Allow header that lists exactly the path's methods.

Litestar makes one OPTIONS handler per path when the path's first handler is registered and
keeps it when more are added, so its Allow header missed later methods (`GET /admin/keys`
besides `POST`). These are made from the full list instead, and registered first. No CORS is
served, so OPTIONS needs a key like everything else."""

from __future__ import annotations

from litestar import route
from litestar.enums import HttpMethod
from litestar.handlers import HTTPRouteHandler

from appliance.api.security import ANY_ROLE


def allow_handlers(handlers: list[HTTPRouteHandler]) -> list[HTTPRouteHandler]:
    methods: dict[str, set[str]] = {}
    for handler in handlers:
        for path in handler.paths:
            methods.setdefault(path, {"OPTIONS"}).update(handler.http_methods)
    return [_allow(path, ", ".join(sorted(found))) for path, found in sorted(methods.items())]


def _allow(path: str, allow: str) -> HTTPRouteHandler:
    async def options() -> None:
        return None

    return route(
        path,
        http_method=[HttpMethod.OPTIONS],
        name=f"options:{path}",
        status_code=204,
        response_headers={"Allow": allow},
        include_in_schema=False,
        opt=dict(ANY_ROLE),
    )(options)
