"""Admin endpoints for alerts: open and resolved alerts with their deliveries, the channels
with their delivery record (a failing channel is visible here), and a test send."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, get, post
from litestar.params import FromPath, Parameter, QueryParameter

from appliance.api.context import admin_actor, request_context
from appliance.api.responses import Out, errors
from appliance.api.security import roles
from appliance.api.services import Services, ServicesDep
from appliance.auth import Principal, Role
from appliance.checks.alerts import AlertEngine
from appliance.errors import ServiceUnavailable

OPERATE = roles(Role.OPERATOR)
READ = roles(Role.OPERATOR, Role.AUDITOR)
RowId = Annotated[int, Parameter(ge=1, le=2**53, description="an alert's id")]  # exact in JSON numbers, within SQLite's range


class AlertOut(Out):
    id: int
    rule: str
    check: str
    subject: str
    severity: str
    state: str
    summary: str
    details: dict[str, Any]
    opened_at: float
    last_sent_at: float | None
    resolved_at: float | None
    sends: int


class DeliveryOut(Out):
    id: int
    alert_id: int
    channel: str
    event: str
    ts: float
    ok: int
    error: str | None


class AlertDetail(AlertOut):
    deliveries: list[DeliveryOut]


class AlertList(Out):
    object: str
    data: list[AlertOut]


class ChannelOut(Out):
    name: str
    source: str
    kind: str
    attempts: int
    delivered: int
    failed: int
    failing: bool
    last_ok_at: float | None
    last_failure_at: float | None
    last_error: str | None
    rules: list[str]
    target: str | msgspec.UnsetType = msgspec.UNSET


class ChannelList(Out):
    object: str
    data: list[ChannelOut]


class ChannelTest(Out):
    channel: str
    delivered: bool
    error: str | None


def engine(services: Services) -> AlertEngine:
    if services.alerts is None:
        raise ServiceUnavailable("The alert engine is not running yet.", retry_after=1.0)
    return services.alerts


@get("/admin/alerts", opt=READ, name="alerts:list", responses=errors(503))
async def list_alerts(
    services: ServicesDep,
    alert_state: Annotated[
        Literal["open", "resolved"] | None, QueryParameter(name="state", description="only open or resolved alerts")
    ] = None,
    check: Annotated[str | None, Parameter(max_length=128, description="only this check's alerts")] = None,
    limit: Annotated[int, Parameter(ge=1, le=1000, description="most alerts to return, newest first")] = 200,
) -> AlertList:
    alerts = engine(services).list(state=alert_state, check=check, limit=limit)
    return AlertList(object="list", data=[msgspec.convert(a, AlertOut) for a in alerts])


@get("/admin/alerts/{alert_id:int}", opt=READ, name="alerts:show", responses=errors(404, 503))
async def show_alert(alert_id: FromPath[RowId], services: ServicesDep) -> AlertDetail:
    """One alert and every attempt to deliver it."""
    alerts = engine(services)
    entry = alerts.get(alert_id) | {"deliveries": alerts.deliveries(alert_id)}
    return msgspec.convert(entry, AlertDetail)


@get("/admin/alerts/channels", opt=READ, name="alerts:channels", responses=errors(503))
async def list_channels(services: ServicesDep) -> ChannelList:
    """Each registered channel (built-in from `[alerts.channels]`, or a plugin's) with its
    delivery record: `failing` while its last attempt failed."""
    channels = engine(services).channel_states()
    return ChannelList(object="list", data=[msgspec.convert(c, ChannelOut, strict=False) for c in channels])


@post(
    "/admin/alerts/channels/{name:str}/test", opt=OPERATE, name="alerts:test", status_code=200, responses=errors(404, 503)
)
async def test_channel(
    request: Request[Principal, Any, Any],
    name: FromPath[Annotated[str, Parameter(max_length=128, description="a channel's name")]],
    services: ServicesDep,
) -> ChannelTest:
    """Send a test alert on one channel now: whether it was delivered, and if not, why."""
    alerts = engine(services)
    now = time.time()
    payload = {
        "id": 0, "rule": "test", "check": "test", "subject": "", "severity": "warn", "event": "test", "state": "open",
        "summary": "a test alert sent by an administrator", "details": {}, "opened_at": now, "ts": now, "sends": 1,
        "appliance": {"test": True},
    }
    delivered, error = await alerts.send_to(name, payload)
    after = {"delivered": delivered, "error": error}
    await services.store.write(services.audit.admin_fn(admin_actor(request), "alert.test", name, after=after))
    request_context(request.scope).recorded = True
    return ChannelTest(channel=name, delivered=delivered, error=error)


ROUTES = [list_alerts, list_channels, show_alert, test_channel]
