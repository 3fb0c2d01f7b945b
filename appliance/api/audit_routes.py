"""Admin endpoints for the audit log (query, verify, export, checkpoint, erase) and usage.

Long reads (export, verification, reports) run in worker threads on read connections of their
own, opened for the request and closed when it ends or its client goes away; the event loop's
shared connection, which authentication reads through, is never held open by them.
"""

from __future__ import annotations

import asyncio
from datetime import date
from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, get, post
from litestar.params import FromQuery, JSONBody, Parameter
from litestar.response import Stream

from appliance.api.context import admin_actor, epoch, request_context
from appliance.api.export_stream import export_stream
from appliance.api.responses import (
    AuditList,
    AuditRecordOut,
    CheckpointOut,
    ErasureOut,
    UsageReport,
    UsageRow,
    VerifyReportOut,
    errors,
)
from appliance.api.schemas import EraseByKey, EraseByTeam, EraseRequest
from appliance.api.security import roles
from appliance.api.services import ServicesDep
from appliance.audit import export_records, verify
from appliance.audit.content import ErasureSelector, erase_fn
from appliance.audit.log import MAX_QUERY_LIMIT
from appliance.audit.signing import load_pinned_public_key
from appliance.auth import Principal, Role
from appliance.errors import Conflict
from appliance.metering import rollup
from appliance.store import Store

ADMIN = roles(Role.ADMIN)
READ_GOVERNANCE = roles(Role.AUDITOR)
Limit = Annotated[int, Parameter(ge=1, le=MAX_QUERY_LIMIT)]
# schema_extra: litestar leaves a bound of 0 out of the document.
After = Annotated[int | None, Parameter(ge=0, le=2**53, schema_extra={"minimum": 0})]
Time = Annotated[str | None, Parameter(schema_extra={"format": "date-time"}, description="RFC 3339; UTC without an offset")]


@get("/admin/usage", opt=READ_GOVERNANCE, name="usage:report", responses=errors())
async def usage_report(
    services: ServicesDep,
    by: FromQuery[Literal["key", "team", "model", "day"]] = "day",
    since: FromQuery[date | None] = None,
    until: FromQuery[date | None] = None,
    key_id: FromQuery[str | None] = None,
    team: FromQuery[str | None] = None,
) -> UsageReport:
    """Sums per key, team, model or UTC day; `since` and `until` are inclusive UTC days."""
    rows = await asyncio.to_thread(
        rollup,
        services.store,
        by=by,
        since_day=since.isoformat() if since else None,
        until_day=until.isoformat() if until else None,
        key_id=key_id,
        team_id=team,
    )
    return UsageReport(object="list", by=by, data=[msgspec.convert(r, UsageRow) for r in rows])


@get("/admin/audit", opt=READ_GOVERNANCE, name="audit:query", responses=errors())
async def query_audit(
    services: ServicesDep,
    since: FromQuery[Time] = None,
    until: FromQuery[Time] = None,
    key_id: FromQuery[str | None] = None,
    team: FromQuery[str | None] = None,
    kind: FromQuery[Literal["request", "admin", "security", "system"] | None] = None,
    limit: FromQuery[Limit] = 100,
    after: FromQuery[After] = None,
) -> AuditList:
    """Records in order; page with `after` = the last idx of the previous page."""
    records = services.audit.query(
        since=epoch(since, "since") if since is not None else None,
        until=epoch(until, "until") if until is not None else None,
        key_id=key_id,
        team_id=team,
        kind=kind,
        limit=limit,
        after_idx=after,
    )
    return AuditList(object="list", data=[msgspec.convert(r.to_dict(), AuditRecordOut) for r in records])


@get("/admin/audit/verify", opt=READ_GOVERNANCE, name="audit:verify", responses=errors())
async def verify_audit(services: ServicesDep) -> VerifyReportOut:
    public_key = load_pinned_public_key(services.settings.paths.keys) or services.audit.signer.public_key_hex
    report = await asyncio.to_thread(_verify, services.store, public_key)
    return msgspec.convert(report.to_dict(), VerifyReportOut)


def _verify(store: Store, public_key: str) -> Any:
    with store.snapshot() as conn:
        return verify(conn, public_key=public_key)


@get(
    "/admin/audit/export",
    opt=READ_GOVERNANCE,
    name="audit:export",
    responses=errors(),
    response_description="JSON lines (one record each, with what re-verifying needs) or CSV with a header line.",
)
async def export_audit(
    services: ServicesDep,
    since: FromQuery[Time] = None,
    until: FromQuery[Time] = None,
    format: FromQuery[Literal["jsonl", "csv"]] = "jsonl",
) -> Stream:
    start = epoch(since, "since") if since is not None else None
    end = epoch(until, "until") if until is not None else None
    lines = export_stream(services.store, lambda conn: export_records(conn, since=start, until=end, fmt=format))  # type: ignore[arg-type]
    media = "application/x-ndjson" if format == "jsonl" else "text/csv"
    return Stream(lines, media_type=media, headers={"content-disposition": f"attachment; filename=audit.{format}"})


@post("/admin/audit/checkpoint", opt=READ_GOVERNANCE, name="audit:checkpoint", status_code=201, responses=errors(409))
async def make_checkpoint(services: ServicesDep) -> CheckpointOut:
    """Sign the current end of the log now, for storage off the box (409 while it is empty)."""
    checkpoint = await services.audit.checkpoint()
    if checkpoint is None:
        raise Conflict("the audit log is empty; there is nothing to checkpoint")
    return msgspec.convert(checkpoint.to_dict(), CheckpointOut)


@post("/admin/audit/erase", opt=ADMIN, name="audit:erase", status_code=200, responses=errors(404))
async def erase_content(request: Request[Principal, Any, Any], data: JSONBody[EraseRequest], services: ServicesDep) -> ErasureOut:
    """Remove the kept prompt text of a key's or a team's records, or of everything before a
    time (`{"by": "key", "key_id": ...}`, `{"by": "team", "team": ...}`, `{"by": "before",
    "before": ...}`); the records, their digests and the chain stay, and the erasure is itself
    audited."""
    if isinstance(data, EraseByKey):
        selector = ErasureSelector(key_id=data.key_id)
    elif isinstance(data, EraseByTeam):
        selector = ErasureSelector(team_id=services.teams.get(data.team).id)
    else:
        selector = ErasureSelector(before=epoch(data.before, "before"))
    result = await services.store.write(erase_fn(services.audit, admin_actor(request), selector))
    request_context(request.scope).recorded = True
    return ErasureOut(**result)


ROUTES = [usage_report, query_audit, verify_audit, export_audit, make_checkpoint, erase_content]
