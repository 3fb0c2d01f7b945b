"""Admin endpoints for governance: teams, budgets, usage reports, the audit log, and the
operator's view of models. Every change is recorded as an admin audit record."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any, Literal

from litestar import Request, Response, delete, get, post
from litestar.params import FromPath, FromQuery, JSONBody
from litestar.response import Stream

from appliance.api.context import request_context
from appliance.api.schemas import CreateBudgetRequest, CreateTeamRequest
from appliance.api.security import roles
from appliance.api.services import ServicesDep
from appliance.audit import export_checkpoint, export_records, verify
from appliance.audit.signing import load_pinned_public_key
from appliance.auth import Principal, Role
from appliance.errors import InvalidRequest
from appliance.governance import AdminAction
from appliance.metering import rollup
from runtime.backend import loaded_report

ADMIN = roles(Role.ADMIN)
READ_GOVERNANCE = roles(Role.AUDITOR)
OPERATE = roles(Role.OPERATOR)


def _record(request: Request[Any, Any, Any], action: str, target: str | None, before: Any = None, after: Any = None) -> None:
    request_context(request.scope).admin = AdminAction(action, target, before, after)


def _day(text: str | None, param: str) -> str | None:
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).date().isoformat()
    except ValueError:
        raise InvalidRequest(f"{param} must be a date (YYYY-MM-DD)", param=param) from None


def _time(text: str | None, param: str) -> float | None:
    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"{param} must be an ISO 8601 date or time", param=param) from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


# -- teams ------------------------------------------------------------------------------------
@post("/admin/teams", opt=ADMIN, name="teams:create", status_code=201)
async def create_team(request: Request[Principal, Any, Any], data: JSONBody[CreateTeamRequest], services: ServicesDep) -> dict[str, Any]:
    team = await asyncio.to_thread(services.teams.create, data.name, data.prompt_retention)
    _record(request, "teams.create", team.id, None, team.to_dict())
    return team.to_dict()


@get("/admin/teams", opt=READ_GOVERNANCE, name="teams:list")
async def list_teams(services: ServicesDep) -> dict[str, Any]:
    return {"object": "list", "data": [t.to_dict() for t in services.teams.list()]}


@delete("/admin/teams/{team_id:str}", opt=ADMIN, name="teams:delete", status_code=200)
async def delete_team(request: Request[Principal, Any, Any], team_id: FromPath[str], services: ServicesDep) -> dict[str, Any]:
    team = await asyncio.to_thread(services.teams.delete, team_id)
    _record(request, "teams.delete", team.id, team.to_dict(), None)
    return team.to_dict()


# -- budgets ----------------------------------------------------------------------------------
@post("/admin/budgets", opt=ADMIN, name="budgets:set", status_code=201)
async def set_budget(request: Request[Principal, Any, Any], data: JSONBody[CreateBudgetRequest], services: ServicesDep) -> dict[str, Any]:
    budget = await asyncio.to_thread(
        services.budgets.set_budget, data.scope, data.scope_id, amount=data.amount, unit=data.unit, period=data.period
    )
    _record(request, "budgets.set", str(budget.id), None, budget.to_dict())
    return budget.to_dict() | services.budgets.status(budget)


@get("/admin/budgets", opt=READ_GOVERNANCE, name="budgets:list")
async def list_budgets(services: ServicesDep) -> dict[str, Any]:
    budgets = services.budgets.list_budgets()
    return {"object": "list", "data": [b.to_dict() | services.budgets.status(b) for b in budgets]}


@delete("/admin/budgets/{budget_id:int}", opt=ADMIN, name="budgets:delete", status_code=200)
async def delete_budget(request: Request[Principal, Any, Any], budget_id: FromPath[int], services: ServicesDep) -> dict[str, Any]:
    budget = await asyncio.to_thread(services.budgets.delete_budget, budget_id)
    _record(request, "budgets.delete", str(budget.id), budget.to_dict(), None)
    return budget.to_dict()


# -- usage ------------------------------------------------------------------------------------
@get("/admin/usage", opt=READ_GOVERNANCE, name="usage:report")
async def usage_report(
    services: ServicesDep,
    by: FromQuery[Literal["key", "team", "model", "day"]] = "day",
    since: FromQuery[str | None] = None,
    until: FromQuery[str | None] = None,
    key_id: FromQuery[str | None] = None,
    team: FromQuery[str | None] = None,
) -> dict[str, Any]:
    rows = rollup(
        services.store, by=by, since_day=_day(since, "since"), until_day=_day(until, "until"), key_id=key_id, team_id=team
    )
    return {"object": "list", "by": by, "data": rows}


# -- audit ------------------------------------------------------------------------------------
@get("/admin/audit", opt=READ_GOVERNANCE, name="audit:query")
async def query_audit(
    services: ServicesDep,
    since: FromQuery[str | None] = None,
    until: FromQuery[str | None] = None,
    key_id: FromQuery[str | None] = None,
    team: FromQuery[str | None] = None,
    kind: FromQuery[str | None] = None,
    limit: FromQuery[int] = 100,
    after: FromQuery[int | None] = None,
) -> dict[str, Any]:
    records = services.audit.query(
        since=_time(since, "since"), until=_time(until, "until"), key_id=key_id, team_id=team, kind=kind, limit=limit, after_idx=after
    )
    return {"object": "list", "data": [r.to_dict() for r in records]}


@get("/admin/audit/verify", opt=READ_GOVERNANCE, name="audit:verify")
async def verify_audit(services: ServicesDep) -> Response[dict[str, Any]]:
    public_key = load_pinned_public_key(services.settings.paths.keys)
    report = await asyncio.to_thread(_verify, services, public_key)
    return Response(report.to_dict(), status_code=200)


def _verify(services: ServicesDep, public_key: str | None) -> Any:
    return verify(services.store.reader(), public_key=public_key or services.audit.signer.public_key_hex)


@get("/admin/audit/export", opt=READ_GOVERNANCE, name="audit:export")
async def export_audit(
    services: ServicesDep,
    since: FromQuery[str | None] = None,
    until: FromQuery[str | None] = None,
    format: FromQuery[Literal["jsonl", "csv"]] = "jsonl",
) -> Stream:
    lines = export_records(services.store.reader(), since=_time(since, "since"), until=_time(until, "until"), fmt=format)
    media = "application/x-ndjson" if format == "jsonl" else "text/csv"
    return Stream(lines, media_type=media, headers={"content-disposition": f"attachment; filename=audit.{format}"})


@post("/admin/audit/checkpoint", opt=READ_GOVERNANCE, name="audit:checkpoint", status_code=201)
async def make_checkpoint(services: ServicesDep) -> Response[bytes]:
    checkpoint = await services.audit.checkpoint()
    if checkpoint is None:
        raise InvalidRequest("the audit log is empty; there is nothing to checkpoint")
    return Response(export_checkpoint(checkpoint).encode(), media_type="application/json", status_code=201)


# -- models (operator) ------------------------------------------------------------------------
@get("/admin/models", opt=OPERATE, name="models:status")
async def model_status(services: ServicesDep) -> dict[str, Any]:
    loaded = {e.name: e for e in services.pool.engines()}
    data = []
    for record in services.models.list():
        engine = loaded.get(record.name)
        entry: dict[str, Any] = record.to_dict() | {"loaded": engine is not None}
        if engine is not None:
            health = engine.health()
            entry["health"] = {"ok": health.ok, "detail": health.detail}
            entry["stats"] = _plain(engine.stats())
        elif record.name in services.pool.failures:
            entry["error"] = services.pool.failures[record.name]
        data.append(entry)
    report = loaded_report()
    return {"object": "list", "data": data, "backend": report.to_dict() if report else None}


def _plain(stats: Any) -> dict[str, Any]:
    return {name: getattr(stats, name) for name in stats.__dataclass_fields__}


ROUTES = [
    create_team,
    list_teams,
    delete_team,
    set_budget,
    list_budgets,
    delete_budget,
    usage_report,
    query_audit,
    verify_audit,
    export_audit,
    make_checkpoint,
    model_status,
]
