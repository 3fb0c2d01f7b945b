"""Admin endpoints for scheduled checks: the list with schedules and last results, a run on
demand (audited), and the run history."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Request, get, post
from litestar.params import FromPath, Parameter

from appliance.api.context import admin_actor, request_context
from appliance.api.responses import Out, errors
from appliance.api.security import roles
from appliance.api.services import Services, ServicesDep
from appliance.auth import Principal, Role
from appliance.checks.history import MAX_HISTORY_LIMIT, CheckRun
from appliance.checks.scheduler import CheckScheduler
from appliance.errors import ServiceUnavailable

OPERATE = roles(Role.OPERATOR)
READ = roles(Role.OPERATOR, Role.AUDITOR)
CheckName = Annotated[str, Parameter(max_length=128, description="a check's name")]
Limit = Annotated[int, Parameter(ge=1, le=MAX_HISTORY_LIMIT, description="most runs to return, newest first")]


class FindingOut(Out):
    subject: str
    status: str
    summary: str
    details: dict[str, Any]


class CheckRunOut(Out):
    id: int | None
    check: str
    trigger: str
    started_at: float
    duration_ms: float
    cpu_seconds: float
    status: str
    summary: str
    findings: list[FindingOut]


class CheckOut(Out):
    name: str
    source: str
    description: str
    enabled: bool
    interval_seconds: float | None
    cron: str | None
    timeout_seconds: float
    error: str | None
    running: bool
    next_run_at: float | None
    last: CheckRunOut | None


class CheckList(Out):
    object: str
    data: list[CheckOut]


class CheckRunList(Out):
    object: str
    data: list[CheckRunOut]


def scheduler(services: Services) -> CheckScheduler:
    if services.checks is None:
        raise ServiceUnavailable("The checks are not running yet.", retry_after=1.0)
    return services.checks


def run_out(run: CheckRun) -> CheckRunOut:
    return msgspec.convert(run.to_dict(), CheckRunOut)


@get("/admin/checks", opt=READ, name="checks:list", responses=errors(503))
async def list_checks(services: ServicesDep) -> CheckList:
    """Every registered check (built-in and plugins'): its schedule, whether it runs, when it
    runs next and its last run."""
    return CheckList(object="list", data=[msgspec.convert(c, CheckOut) for c in scheduler(services).list()])


@get("/admin/checks/{name:str}", opt=READ, name="checks:show", responses=errors(404, 503))
async def show_check(name: FromPath[CheckName], services: ServicesDep) -> CheckOut:
    return msgspec.convert(scheduler(services).describe(name), CheckOut)


@post("/admin/checks/{name:str}/run", opt=OPERATE, name="checks:run", status_code=200, responses=errors(404, 409, 503))
async def run_check(request: Request[Principal, Any, Any], name: FromPath[CheckName], services: ServicesDep) -> CheckRunOut:
    """Run a check now and wait for its result (stored in the history and alerted on like a
    scheduled run). 409 while it is already running."""
    run = await scheduler(services).run(name, trigger="manual")
    after = {"run_id": run.id, "status": run.status, "summary": run.summary}
    await services.store.write(services.audit.admin_fn(admin_actor(request), "check.run", name, after=after))
    request_context(request.scope).recorded = True
    return run_out(run)


@get("/admin/checks/history", opt=READ, name="checks:history", responses=errors(404, 503))
async def check_history(
    services: ServicesDep,
    check: Annotated[str | None, Parameter(max_length=128, description="only this check's runs")] = None,
    limit: Limit = 50,
    before_id: Annotated[int | None, Parameter(ge=1, le=2**53, description="runs older than this id (paging)")] = None,
) -> CheckRunList:
    """Stored runs, newest first (kept `[checks] history_days`, at most `history_runs` per check)."""
    runs = scheduler(services).history(check, limit=limit, before_id=before_id)
    return CheckRunList(object="list", data=[run_out(r) for r in runs])


ROUTES = [list_checks, check_history, show_check, run_check]
