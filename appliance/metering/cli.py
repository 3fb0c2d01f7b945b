"""CLI groups `teams`, `budgets` and `usage`; `appliance.cli` adds them to the main group.

Same conventions as `appliance.cli`: `--data-dir`, `--json`, errors as one line on stderr and
exit status 1.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click

from appliance.audit.log import cli_actor
from appliance.cli_support import apply_change, data_dir_option, emit, handled, json_option, offline, opened
from appliance.config import RETENTION_POLICIES, load_settings
from appliance.metering.budgets import PERIODS, UNITS, Budget
from appliance.metering.usage import ROLLUP_BY, rollup
from appliance.teams import TeamService

__all__ = ["teams", "budgets", "usage"]

@click.group()
def teams() -> None:
    """Create, list and delete teams."""


@teams.command("create")
@click.argument("name")
@click.option("--retention", type=click.Choice(RETENTION_POLICIES), default=None, help="Prompt retention for the team's keys (default: the appliance default).")
@click.option("--answer-retention", type=click.Choice(RETENTION_POLICIES), default=None, help="Answer retention for the team's keys (default: the appliance default).")
@data_dir_option
@json_option
@handled
def teams_create(name: str, retention: str | None, answer_retention: str | None, data_dir: Path | None, as_json: bool) -> None:
    """Create a team; its id is the slug of NAME."""
    body = {"name": name, "prompt_retention": retention, "answer_retention": answer_retention}
    team = apply_change(
        data_dir,
        remote=("POST", "/admin/teams", body),
        local=lambda o: o.teams.create(name, retention, answer_retention=answer_retention, actor=cli_actor()).to_dict(),
    )
    if as_json:
        emit(team)
    else:
        click.echo(f"created team {team['id']} ({team['name']})")


@teams.command("list")
@data_dir_option
@json_option
@handled
def teams_list(data_dir: Path | None, as_json: bool) -> None:
    """List teams with their key counts."""
    with opened(data_dir) as (settings, store):
        found = TeamService(store).list()
    if as_json:
        emit([t.to_dict() for t in found])
        return
    for t in found:
        click.echo(
            f"{t.id:24} {t.name:24} keys {t.key_count:>4}  retention prompt {t.prompt_retention or 'default'}"
            f" answer {t.answer_retention or 'default'}"
        )


@teams.command("set-retention")
@click.argument("team")
@click.option("--prompt", "prompt", type=click.Choice([*RETENTION_POLICIES, "default"]), default=None, help="'default': the appliance default.")
@click.option("--answer", "answer", type=click.Choice([*RETENTION_POLICIES, "default"]), default=None, help="'default': the appliance default.")
@data_dir_option
@json_option
@handled
def teams_set_retention(team: str, prompt: str | None, answer: str | None, data_dir: Path | None, as_json: bool) -> None:
    """Change how the team's prompts and answers are kept (where a key sets none of its own)."""
    policies = {
        name: None if value == "default" else value
        for name, value in (("prompt_retention", prompt), ("answer_retention", answer))
        if value is not None
    }
    if not policies:
        click.echo("error: give --prompt POLICY, --answer POLICY or both", err=True)
        sys.exit(1)
    changed = apply_change(
        data_dir,
        remote=("PATCH", f"/admin/teams/{quote(team, safe='')}", policies),
        local=lambda o: o.teams.set_retention(team, actor=cli_actor(), **policies).to_dict(),
    )
    if as_json:
        emit(changed)
    else:
        click.echo(
            f"team {changed['id']}: retention prompt {changed['prompt_retention'] or 'default'}"
            f" answer {changed['answer_retention'] or 'default'}"
        )


@teams.command("delete")
@click.argument("team")
@data_dir_option
@json_option
@handled
def teams_delete(team: str, data_dir: Path | None, as_json: bool) -> None:
    """Delete an empty team (by id or name) and its budgets."""
    removed = apply_change(
        data_dir,
        remote=("DELETE", f"/admin/teams/{quote(team, safe='')}", None),
        local=lambda o: o.teams.delete(team, actor=cli_actor()).to_dict(),
    )
    if as_json:
        emit(removed)
    else:
        click.echo(f"deleted team {removed['id']}")


# -- budgets --------------------------------------------------------------------------------
@click.group()
def budgets() -> None:
    """Set, list and delete key and team budgets."""


@budgets.command("set")
@click.option("--key", "key_id", default=None, help="Key id the budget applies to.")
@click.option("--team", default=None, help="Team (id or name) the budget applies to.")
@click.option("--amount", type=float, required=True, help="Amount in the currency, or in tokens.")
@click.option("--unit", type=click.Choice(UNITS), default="money", show_default=True)
@click.option("--period", type=click.Choice(PERIODS), default="month", show_default=True, help="UTC day, UTC month, or for all time.")
@data_dir_option
@json_option
@handled
def budgets_set(key_id: str | None, team: str | None, amount: float, unit: str, period: str, data_dir: Path | None, as_json: bool) -> None:
    """Create a budget, or change the amount of the one with the same scope, unit and period."""
    if (key_id is None) == (team is None):
        click.echo("error: give exactly one of --key ID or --team NAME", err=True)
        sys.exit(1)
    scope, scope_id = ("key", key_id) if key_id is not None else ("team", team)
    assert scope_id is not None
    body = {"scope": scope, "scope_id": scope_id, "amount": amount, "unit": unit, "period": period}
    budget = apply_change(
        data_dir,
        remote=("POST", "/admin/budgets", body),
        local=lambda o: o.budgets.set_budget(scope, scope_id, actor=cli_actor(), amount=amount, unit=unit, period=period).to_dict(),
    )
    if as_json:
        emit(budget)
    else:
        click.echo(f"budget {budget['id']}: {_describe(budget, data_dir)}")


@budgets.command("list")
@click.option("--key", "key_id", default=None, help="Only this key's budgets.")
@click.option("--team", default=None, help="Only this team's budgets (id or name).")
@data_dir_option
@json_option
@handled
def budgets_list(key_id: str | None, team: str | None, data_dir: Path | None, as_json: bool) -> None:
    """List budgets with what is spent and left in the current period."""
    with opened(data_dir) as (settings, store):
        service = offline(settings, store).budgets
        service.load()
        if key_id is not None:
            found = service.list_budgets("key", key_id)
        elif team is not None:
            found = service.list_budgets("team", TeamService(store).get(team).id)
        else:
            found = service.list_budgets()
        rows = [service.status(b) | {"description": b.describe(settings.costs.currency)} for b in found]
    if as_json:
        emit(rows)
        return
    if not rows:
        click.echo("no budgets; set one with: appliance budgets set --team NAME --amount 10")
    for r in rows:
        resets = f"resets {r['resets_at']}" if r["resets_at"] else "never resets"
        click.echo(f"{r['id']:>4}  {r['description']}: spent {r['spent']:g}, left {r['remaining']:g}, {resets}")


@budgets.command("delete")
@click.argument("budget_id", type=int)
@data_dir_option
@json_option
@handled
def budgets_delete(budget_id: int, data_dir: Path | None, as_json: bool) -> None:
    """Delete a budget by id."""
    removed = apply_change(
        data_dir,
        remote=("DELETE", f"/admin/budgets/{budget_id}", None),
        local=lambda o: o.budgets.delete_budget(budget_id, actor=cli_actor()).to_dict(),
    )
    if as_json:
        emit(removed)
    else:
        click.echo(f"deleted budget {removed['id']}: {_describe(removed, data_dir)}")


def _describe(budget: dict[str, Any], data_dir: Path | None) -> str:
    """`team 'research' monthly budget of 10.00 USD`, from a budget's JSON."""
    b = Budget(budget["id"], budget["scope"], budget["scope_id"], budget["unit"], budget["amount"], budget["period"], 0.0)
    return b.describe(load_settings(data_dir).costs.currency)


# -- usage ----------------------------------------------------------------------------------
@click.group()
def usage() -> None:
    """Report usage and cost."""


@usage.command("report")
@click.option("--by", type=click.Choice(list(ROLLUP_BY)), default="day", show_default=True)
@click.option("--since", default=None, help="First UTC day, YYYY-MM-DD (inclusive).")
@click.option("--until", default=None, help="Last UTC day, YYYY-MM-DD (inclusive).")
@click.option("--key", "key_id", default=None, help="Only this key.")
@click.option("--team", default=None, help="Only this team (id or name).")
@data_dir_option
@json_option
@handled
def usage_report(by: str, since: str | None, until: str | None, key_id: str | None, team: str | None, data_dir: Path | None, as_json: bool) -> None:
    """Requests, tokens, energy and cost, grouped by key, team, model or day."""
    with opened(data_dir) as (settings, store):
        team_id = TeamService(store).get(team).id if team is not None else None
        rows = rollup(store, by=by, since_day=since, until_day=until, key_id=key_id, team_id=team_id)
        currency = settings.costs.currency
    if as_json:
        emit(rows)
        return
    if not rows:
        click.echo("no usage recorded in that range")
        return
    click.echo(f"{by:24} {'requests':>9} {'tokens':>12} {'energy kJ':>10} {'cost ' + currency:>14}")
    for r in rows:
        unbilled = f"  (+{r['unbilled_cost']:.6f} unbilled)" if r["unbilled_cost"] else ""
        click.echo(
            f"{str(r[by]):24} {r['requests']:>9,} {r['tokens']:>12,} {r['energy_j'] / 1000:>10.2f} {r['cost']:>14.6f}{unbilled}"
        )
