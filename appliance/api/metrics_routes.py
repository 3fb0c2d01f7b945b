"""`GET /metrics`: Prometheus text exposition, for an admin, operator or auditor key.
`[metrics] listen` serves the same without a key on a bind of its own (`metrics_server`)."""

from __future__ import annotations

from litestar import Response, get
from litestar.openapi.datastructures import ResponseSpec

from appliance.api.responses import errors
from appliance.api.security import roles
from appliance.api.services import ServicesDep
from appliance.auth import Role
from appliance.checks.metrics import CONTENT_TYPE
from appliance.errors import ServiceUnavailable

READ_METRICS = roles(Role.OPERATOR, Role.AUDITOR)
_TEXT = ResponseSpec(
    str, description="Prometheus text exposition format 0.0.4.", media_type=CONTENT_TYPE, generate_examples=False
)


@get(
    "/metrics",
    opt=READ_METRICS,
    name="metrics:scrape",
    media_type=CONTENT_TYPE,
    responses={**errors(503), 200: _TEXT},
    summary="Prometheus metrics",
)
async def scrape_metrics(services: ServicesDep) -> Response[bytes]:
    if services.metrics is None:
        raise ServiceUnavailable("Metrics are not being collected yet.")
    # Given whole: litestar would add a second charset to a text/ media type.
    return Response(await services.metrics.render(), media_type=CONTENT_TYPE, headers={"content-type": CONTENT_TYPE})


ROUTES = [scrape_metrics]
