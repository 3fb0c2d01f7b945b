"""Admin endpoints for teams and their budgets."""

from __future__ import annotations

import math
from typing import Annotated, Any

import msgspec
from litestar import Request, delete, get, patch, post
from litestar.params import FromPath, JSONBody, Parameter

from appliance.api.context import change
from appliance.api.responses import BudgetInfo, BudgetList, TeamInfo, TeamList, errors
from appliance.api.schemas import CreateBudgetRequest, CreateTeamRequest, UpdateTeamRequest
from appliance.api.security import roles
from appliance.api.services import ServicesDep
from appliance.auth import Principal, Role

ADMIN = roles(Role.ADMIN)
READ_GOVERNANCE = roles(Role.AUDITOR)


@post("/admin/teams", opt=ADMIN, name="teams:create", status_code=201, responses=errors(409))
async def create_team(request: Request[Principal, Any, Any], data: JSONBody[CreateTeamRequest], services: ServicesDep) -> TeamInfo:
    team = await change(
        request, services.teams.create, data.name, data.prompt_retention, answer_retention=data.answer_retention
    )
    return msgspec.convert(team.to_dict(), TeamInfo)


@patch("/admin/teams/{team_id:str}", opt=ADMIN, name="teams:update", responses=errors(404))
async def update_team(
    request: Request[Principal, Any, Any], team_id: FromPath[str], data: JSONBody[UpdateTeamRequest], services: ServicesDep
) -> TeamInfo:
    """Change the team's prompt or answer retention; null: the appliance default."""
    policies = {
        name: value
        for name, value in (("prompt_retention", data.prompt_retention), ("answer_retention", data.answer_retention))
        if value is not msgspec.UNSET
    }
    team = await change(request, services.teams.set_retention, team_id, **policies)
    return msgspec.convert(team.to_dict(), TeamInfo)


@get("/admin/teams", opt=READ_GOVERNANCE, name="teams:list", responses=errors())
async def list_teams(services: ServicesDep) -> TeamList:
    return TeamList(object="list", data=[msgspec.convert(t.to_dict(), TeamInfo) for t in services.teams.list()])


@delete("/admin/teams/{team_id:str}", opt=ADMIN, name="teams:delete", status_code=200, responses=errors(404, 409))
async def delete_team(request: Request[Principal, Any, Any], team_id: FromPath[str], services: ServicesDep) -> TeamInfo:
    """Delete an empty team and its budgets (409 while keys belong to it, or for `default`)."""
    team = await change(request, services.teams.delete, team_id)
    return msgspec.convert(team.to_dict(), TeamInfo)


@post("/admin/budgets", opt=ADMIN, name="budgets:set", status_code=201, responses=errors(404))
async def set_budget(request: Request[Principal, Any, Any], data: JSONBody[CreateBudgetRequest], services: ServicesDep) -> BudgetInfo:
    amount = math.floor(data.amount) if data.unit == "tokens" else data.amount  # whole tokens only
    budget = await change(
        request, services.budgets.set_budget, data.scope, data.scope_id, amount=amount, unit=data.unit, period=data.period
    )
    return msgspec.convert(services.budgets.status(budget), BudgetInfo)


@get("/admin/budgets", opt=READ_GOVERNANCE, name="budgets:list", responses=errors())
async def list_budgets(services: ServicesDep) -> BudgetList:
    budgets = services.budgets.list_budgets()
    return BudgetList(object="list", data=[msgspec.convert(services.budgets.status(b), BudgetInfo) for b in budgets])


@delete("/admin/budgets/{budget_id:int}", opt=ADMIN, name="budgets:delete", status_code=200, responses=errors(404))
async def delete_budget(
    request: Request[Principal, Any, Any], budget_id: Annotated[int, Parameter(ge=1, le=2**53)], services: ServicesDep
) -> BudgetInfo:
    budget = await change(request, services.budgets.delete_budget, budget_id)
    return msgspec.convert(budget.to_dict(), BudgetInfo)


ROUTES = [create_team, list_teams, update_team, delete_team, set_budget, list_budgets, delete_budget]
