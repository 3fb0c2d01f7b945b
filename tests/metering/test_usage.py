"""Usage rows and rollups by key, team, model and day."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

import pytest

from appliance.errors import InvalidRequest
from appliance.metering.usage import UsageRecord, insert_fn, rollup
from appliance.store import Store


def utc(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


def rec(n: int, ts: float, key: str, team: str, model: str, *, cost: float, status: int = 200) -> UsageRecord:
    return UsageRecord(
        request_id=f"req-{n}", ts=ts, key_id=key, team_id=team, model=model, status=status,
        prompt_tokens=10 * n, completion_tokens=n, cached_tokens=n // 2, queue_ms=1.0, compute_ms=100.0 * n,
        energy_j=1.5 * n, cost=cost,
    )


@pytest.fixture
def filled(store: Store) -> Store:
    rows = [
        rec(1, utc(2026, 5, 1, 10), "ka", "research", "smollm", cost=0.01),
        rec(2, utc(2026, 5, 1, 23, 59, 59), "kb", "research", "smollm", cost=0.02),
        rec(3, utc(2026, 5, 2, 0, 0, 0), "ka", "research", "qwen", cost=0.03),
        rec(4, utc(2026, 5, 3, 12), "kc", "default", "smollm", cost=0.04, status=500),
    ]

    def insert_all(conn: sqlite3.Connection) -> None:  # combined in one job, as with the audit append
        for r in rows:
            insert_fn(r)(conn)

    store.write_sync(insert_all)
    return store


def test_insert_fn_writes_the_utc_day(filled: Store) -> None:
    days = [r["day"] for r in filled.query("SELECT day FROM usage ORDER BY id")]
    assert days == ["2026-05-01", "2026-05-01", "2026-05-02", "2026-05-03"]
    assert rec(1, utc(2026, 5, 1, 23, 59), "k", "t", "m", cost=0).to_dict()["day"] == "2026-05-01"


def test_rollup_by_key(filled: Store) -> None:
    rows = rollup(filled, by="key")
    assert [r["key"] for r in rows] == ["ka", "kb", "kc"]
    ka = rows[0]
    assert ka["requests"] == 2
    assert ka["prompt_tokens"] == 40 and ka["completion_tokens"] == 4 and ka["tokens"] == 44
    assert ka["cached_tokens"] == 0 + 1
    assert ka["energy_j"] == pytest.approx(6.0)
    assert ka["cost"] == pytest.approx(0.04)
    assert rows[2]["errors"] == 1


def test_rollup_by_team_model_and_day_with_filters(filled: Store) -> None:
    teams = {r["team"]: r for r in rollup(filled, by="team")}
    assert teams["research"]["requests"] == 3 and teams["research"]["cost"] == pytest.approx(0.06)
    assert teams["default"]["cost"] == pytest.approx(0.04)
    models = {r["model"]: r["requests"] for r in rollup(filled, by="model")}
    assert models == {"qwen": 1, "smollm": 3}
    days = rollup(filled, by="day")
    assert [(d["day"], d["requests"]) for d in days] == [("2026-05-01", 2), ("2026-05-02", 1), ("2026-05-03", 1)]
    assert [d["day"] for d in rollup(filled, by="day", since_day="2026-05-02")] == ["2026-05-02", "2026-05-03"]
    assert [d["day"] for d in rollup(filled, by="day", until_day="2026-05-01")] == ["2026-05-01"]
    assert [d["day"] for d in rollup(filled, by="day", since_day="2026-05-02", until_day="2026-05-02")] == ["2026-05-02"]
    assert {r["model"] for r in rollup(filled, by="model", key_id="ka")} == {"qwen", "smollm"}
    assert [r["key"] for r in rollup(filled, by="key", team_id="research")] == ["ka", "kb"]
    assert rollup(filled, by="key", since_day="2027-01-01") == []


def test_rollup_rejects_bad_arguments(filled: Store) -> None:
    with pytest.raises(InvalidRequest, match="by must be one of"):
        rollup(filled, by="week")
    with pytest.raises(InvalidRequest, match="not a date"):
        rollup(filled, by="day", since_day="May 1")
