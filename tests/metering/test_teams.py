"""Teams: slugs, lookups, retention and guarded deletion."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from appliance.errors import Conflict, InvalidRequest, NotFound
from appliance.metering.budgets import BudgetService
from appliance.store import Store
from appliance.teams import TeamService, slugify
from tests.admin_helpers import ACTOR, audit_of


def test_slugify() -> None:
    assert slugify("Research Lab") == "research-lab"
    assert slugify("  Équipe  R&D!! ") == "equipe-r-d"
    assert slugify("!!!") == ""


def test_create_get_list_and_retention(store: Store) -> None:
    teams = TeamService(store, audit_of(store))
    assert [t.id for t in teams.list()] == ["default"]
    t = teams.create("Research Lab", prompt_retention="redacted", actor=ACTOR)
    assert (t.id, t.name, t.prompt_retention, t.key_count) == ("research-lab", "Research Lab", "redacted", 0)
    assert teams.get("research-lab") == teams.get("Research Lab") == t
    assert [x.id for x in teams.list()] == ["default", "research-lab"]
    assert teams.set_retention("research-lab", "none", actor=ACTOR).prompt_retention == "none"
    assert teams.set_retention("Research Lab", None, actor=ACTOR).prompt_retention is None
    with pytest.raises(Conflict):
        teams.create("research lab", actor=ACTOR)  # same slug
    with pytest.raises(InvalidRequest):
        teams.create("x", prompt_retention="forever", actor=ACTOR)
    with pytest.raises(InvalidRequest):
        teams.create("***", actor=ACTOR)
    with pytest.raises(NotFound):
        teams.get("nope")


def test_delete_refuses_while_keys_belong_and_removes_budgets(store: Store, add_key: Callable[..., str]) -> None:
    teams = TeamService(store, audit_of(store))
    teams.create("ops", actor=ACTOR)
    BudgetService(store, audit_of(store)).set_budget("team", "ops", actor=ACTOR, amount=5)
    add_key("k1", "ops")
    assert teams.get("ops").key_count == 1
    with pytest.raises(Conflict, match="still has 1 key"):
        teams.delete("ops", actor=ACTOR)
    store.write_sync(lambda conn: conn.execute("UPDATE api_keys SET team_id = 'default' WHERE id = 'k1'"))
    assert teams.delete("ops", actor=ACTOR).id == "ops"
    assert BudgetService(store, audit_of(store)).list_budgets() == []
    with pytest.raises(NotFound):
        teams.get("ops")
    with pytest.raises(Conflict, match="default team cannot be deleted"):
        teams.delete("default", actor=ACTOR)
