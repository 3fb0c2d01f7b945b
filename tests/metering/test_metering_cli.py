"""The teams, budgets and usage CLI groups, driven through click's runner on a real data dir."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.config import load_settings
from appliance.metering.cli import budgets, teams, usage
from appliance.metering.usage import UsageRecord, insert_fn
from appliance.store import Store


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name.startswith("APPLIANCE_"):
            monkeypatch.delenv(name)
    d = tmp_path / "data"
    settings = load_settings(d)
    settings.paths.ensure()
    with Store(settings.paths.database) as store:
        store.write_sync(
            lambda conn: conn.execute(
                "INSERT INTO api_keys (id, name, role, key_hash, created_at) VALUES ('k1', 'app', 'user', ?, ?)",
                ("0" * 64, time.time()),
            )
        )
        store.write_sync(insert_fn(UsageRecord("r1", time.time(), "k1", "default", "smollm", 200, 30, 12, cost=0.25)))
    return d


def run(group, *args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(group, list(args))


def test_teams_commands(data_dir: Path) -> None:
    d = str(data_dir)
    out = run(teams, "create", "Research Lab", "--retention", "redacted", "--data-dir", d, "--json")
    assert out.exit_code == 0, out.stderr
    assert json.loads(out.stdout)["id"] == "research-lab"
    listed = json.loads(run(teams, "list", "--data-dir", d, "--json").stdout)
    assert [t["id"] for t in listed] == ["default", "research-lab"]
    assert "research-lab" in run(teams, "list", "--data-dir", d).stdout
    again = run(teams, "create", "research lab", "--data-dir", d)
    assert again.exit_code == 1
    assert again.stderr.strip() == "error: team 'research-lab' already exists"
    assert run(teams, "delete", "Research Lab", "--data-dir", d).stdout.strip() == "deleted team research-lab"
    refused = run(teams, "delete", "default", "--data-dir", d)
    assert refused.exit_code == 1 and refused.stderr.count("\n") == 1


def test_budgets_commands(data_dir: Path) -> None:
    d = str(data_dir)
    out = run(budgets, "set", "--key", "k1", "--amount", "1", "--period", "day", "--data-dir", d)
    assert out.exit_code == 0, out.stderr
    assert out.stdout.strip() == "budget 1: key 'k1' daily budget of 1.00 USD"
    out = run(budgets, "set", "--team", "default", "--amount", "5000", "--unit", "tokens", "--period", "total", "--data-dir", d, "--json")
    assert json.loads(out.stdout)["unit"] == "tokens"
    listed = json.loads(run(budgets, "list", "--data-dir", d, "--json").stdout)
    by_scope = {(b["scope"], b["unit"]): b for b in listed}
    assert by_scope[("key", "money")]["spent"] == pytest.approx(0.25)
    assert by_scope[("key", "money")]["remaining"] == pytest.approx(0.75)
    assert by_scope[("team", "tokens")]["spent"] == 42 and by_scope[("team", "tokens")]["resets_at"] is None
    assert len(json.loads(run(budgets, "list", "--team", "default", "--data-dir", d, "--json").stdout)) == 1
    assert "spent 0.25, left 0.75" in run(budgets, "list", "--key", "k1", "--data-dir", d).stdout
    assert run(budgets, "delete", "1", "--data-dir", d).exit_code == 0
    missing = run(budgets, "delete", "1", "--data-dir", d)
    assert (missing.exit_code, missing.stderr.strip()) == (1, "error: No budget with id 1.")
    both = run(budgets, "set", "--key", "k1", "--team", "default", "--amount", "1", "--data-dir", d)
    assert both.exit_code == 1 and "exactly one of --key" in both.stderr
    unknown = run(budgets, "set", "--team", "nope", "--amount", "1", "--data-dir", d)
    assert (unknown.exit_code, unknown.stderr.strip()) == (1, "error: No team 'nope'.")


def test_usage_report(data_dir: Path) -> None:
    d = str(data_dir)
    today = time.strftime("%Y-%m-%d", time.gmtime())
    out = run(usage, "report", "--by", "key", "--since", today, "--until", today, "--data-dir", d, "--json")
    assert out.exit_code == 0, out.stderr
    [row] = json.loads(out.stdout)
    assert (row["key"], row["requests"], row["tokens"], row["cost"]) == ("k1", 1, 42, 0.25)
    text = run(usage, "report", "--by", "model", "--data-dir", d).stdout
    assert "smollm" in text and "0.250000" in text
    assert run(usage, "report", "--since", "2000-01-01", "--until", "2000-01-02", "--data-dir", d).stdout.strip() == "no usage recorded in that range"
    bad = run(usage, "report", "--since", "yesterday", "--data-dir", d)
    assert (bad.exit_code, bad.stderr.strip()) == (1, "error: since 'yesterday' is not a date: use YYYY-MM-DD")
