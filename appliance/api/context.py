"""Per-request values kept in the ASGI scope: the request id and the governance context, and
running an administrative change as the caller."""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Callable
from typing import Any, TypeVar

from litestar import Request
from litestar.types import Scope

from appliance.audit.log import Actor
from appliance.auth import Principal
from appliance.errors import InvalidRequest
from appliance.governance import RequestContext

T = TypeVar("T")

CONTEXT_KEY = "appliance.ctx"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def assign_request_id(scope: Scope) -> str:
    """The client's `x-request-id` when it is sane, else a new random id; kept in scope state."""
    state: dict[str, Any] = scope.setdefault("state", {})  # type: ignore[assignment]
    request_id = state.get("request_id")
    if request_id is None:
        incoming = dict(scope.get("headers", [])).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID.match(incoming) else secrets.token_hex(12)
        state["request_id"] = request_id
    return str(request_id)


def request_context(scope: Scope) -> RequestContext:
    return scope["state"][CONTEXT_KEY]  # type: ignore[no-any-return]


def find_context(scope: Scope) -> RequestContext | None:
    return scope.get("state", {}).get(CONTEXT_KEY)  # type: ignore[no-any-return]


def admin_actor(request: Request[Principal, Any, Any]) -> Actor:
    """The caller, as the admin audit record of its change names it."""
    ctx = request_context(request.scope)
    principal = request.user
    local = principal.local_uid is not None
    return Actor(
        principal.actor_info(),
        request_id=ctx.request_id,
        client=ctx.client,
        key_id=None if local else principal.key_id,
        team_id=None if local else principal.team_id,
    )


async def change(request: Request[Principal, Any, Any], fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a service's change (which writes its own admin audit record in the same transaction)
    off the event loop, as the caller; the request then needs no record of its own."""
    result = await asyncio.to_thread(fn, *args, actor=admin_actor(request), **kwargs)
    request_context(request.scope).recorded = True
    return result


_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})?$"
)


def epoch(text: str, param: str) -> float:
    """Seconds since the epoch of an RFC 3339 time (UTC when it has no offset), any year from
    0000 and a leap second included. Raises `InvalidRequest` naming `param` for anything else."""
    match = _RFC3339.match(text.strip())
    fields = [int(g) for g in match.groups()[:6]] if match else []
    if not fields or not _valid(*fields):
        raise InvalidRequest(f"{param} must be an RFC 3339 time such as 2027-06-30T12:00:00Z", param=param)
    year, month, day, hour, minute, second = fields
    offset = 0
    zone = match.group(8) if match else None
    if zone and zone not in "Zz":
        hours, minutes = int(zone[1:3]), int(zone[4:6])
        if hours > 23 or minutes > 59:
            raise InvalidRequest(f"{param} has an offset out of range", param=param)
        offset = (1 if zone[0] == "+" else -1) * (hours * 3600 + minutes * 60)
    fraction = float(match.group(7)) if match and match.group(7) else 0.0
    return _days_from_civil(year, month, day) * 86400.0 + hour * 3600 + minute * 60 + second + fraction - offset


def _valid(year: int, month: int, day: int, hour: int, minute: int, second: int) -> bool:
    if not (1 <= month <= 12 and hour <= 23 and minute <= 59 and second <= 60):
        return False
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    return 1 <= day <= (29 if month == 2 and leap else _MONTH_DAYS[month - 1])


_MONTH_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 in the proleptic Gregorian calendar (H. Hinnant's algorithm)."""
    year -= month <= 2
    era = (year if year >= 0 else year - 399) // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468
