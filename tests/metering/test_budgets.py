"""Budgets: the spend-never-exceeds-budget invariant under concurrency, restarts, periods."""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from appliance.config import CostSettings
from appliance.errors import InvalidRequest, NotFound, QuotaExceeded
from appliance.metering.budgets import BudgetService, Reservation, next_reset
from appliance.metering.costs import CostModel
from appliance.metering.usage import UsageRecord, insert_fn
from appliance.store import Store
from appliance.teams import TeamService
from tests.admin_helpers import ACTOR, audit_of


def utc(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def record(res: Reservation, *, cost: float, tokens: int, ts: float, model: str = "smollm") -> tuple[UsageRecord, float, int]:
    """The usage row a request path would write for this reservation, billed by the clamp."""
    bill = res.bill(cost=cost, tokens=tokens)
    rec = UsageRecord(
        request_id=uuid.uuid4().hex, ts=ts, key_id=res.key_id, team_id=res.team_id, model=model, status=200,
        prompt_tokens=tokens // 2, completion_tokens=tokens - tokens // 2, cost=bill.cost,
        unbilled_cost=bill.unbilled_cost, unbilled_tokens=bill.unbilled_tokens,
    )
    return rec, bill.cost, bill.tokens


def usage_sums(store: Store, day: str, month: str) -> dict[tuple[str, str], dict[str, dict[str, float]]]:
    """What the ledger must equal, computed independently from the usage table."""
    out: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
    for scope, column in (("key", "key_id"), ("team", "team_id")):
        for period, where, params in (("total", "1", ()), ("month", "substr(day, 1, 7) = ?", (month,)), ("day", "day = ?", (day,))):
            rows = store.query(
                f"SELECT {column} AS id, SUM(cost) AS c, SUM(prompt_tokens + completion_tokens - unbilled_tokens) AS t"
                f" FROM usage WHERE {where} GROUP BY {column}",
                params,
            )
            for r in rows:
                entry = out.setdefault((scope, r["id"]), {p: {"cost": 0.0, "tokens": 0} for p in ("day", "month", "total")})
                entry[period] = {"cost": r["c"], "tokens": r["t"]}
    return out


def assert_ledger_matches(snapshot: dict, expected: dict) -> None:
    assert set(snapshot) == set(expected)
    for scope, periods in expected.items():
        for period, sums in periods.items():
            assert snapshot[scope][period]["tokens"] == sums["tokens"], (scope, period)
            assert snapshot[scope][period]["cost"] == pytest.approx(sums["cost"], abs=1e-9), (scope, period)


@pytest.fixture
def costs() -> CostModel:
    return CostModel(CostSettings(electricity_per_kwh=0.30, hardware_per_hour=0.10, cpu_watts=15.0))


# -- the invariant ---------------------------------------------------------------------------
async def test_64_concurrent_tasks_never_overspend_and_the_ledger_survives_restart(store: Store, add_key: Callable[..., str], costs: CostModel) -> None:
    key = add_key("k-async")
    worst = costs.worst_case("smollm", 100, 200, est_tokens_per_second=40)
    budgets = BudgetService(store, audit_of(store))
    budget = budgets.set_budget("key", key, actor=ACTOR, amount=worst * 10.5, unit="money", period="day")
    budgets.load()
    rng = random.Random(7)
    refusals: list[QuotaExceeded] = []

    async def one() -> bool:
        try:
            res = budgets.reserve(key, "default", cost=worst, tokens=300)
        except QuotaExceeded as exc:
            refusals.append(exc)
            return False
        try:
            await asyncio.sleep(rng.uniform(0, 0.02))
            actual = rng.uniform(0.2, 1.0) * worst
            rec, billed, tokens = record(res, cost=actual, tokens=rng.randint(50, 300), ts=time.time())
            await store.write(insert_fn(rec))
            budgets.settle(res, cost=billed, tokens=tokens, ts=rec.ts)
        finally:
            budgets.release(res)  # a no-op after settle
        return True

    admitted = sum(await asyncio.gather(*(one() for _ in range(64))))
    assert admitted == 10  # every task reserves before any settles
    assert len(refusals) == 54
    assert all(budget.describe() in str(e) and "daily budget" in str(e) for e in refusals)
    assert all(e.retry_after == 1.0 for e in refusals)  # held by requests in flight: retry shortly
    spent = store.query_one("SELECT SUM(cost) AS c, COUNT(*) AS n FROM usage")
    assert spent["n"] == admitted
    assert spent["c"] <= budget.amount
    assert budgets.in_flight() == {}

    restarted = BudgetService(store, audit_of(store))
    restarted.load()
    now = time.time()
    expected = usage_sums(store, datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d"), datetime.fromtimestamp(now, UTC).strftime("%Y-%m"))
    assert_ledger_matches(restarted.ledger_snapshot(), expected)
    assert_ledger_matches(budgets.ledger_snapshot(), expected)


def test_64_threads_never_overspend(store: Store, add_key: Callable[..., str], costs: CostModel) -> None:
    key = add_key("k-threads", "default")
    TeamService(store, audit_of(store)).create("Research", actor=ACTOR)
    worst = costs.worst_case("smollm", 100, 200, est_tokens_per_second=40)
    budgets = BudgetService(store, audit_of(store))
    budgets.set_budget("key", key, actor=ACTOR, amount=worst * 10.5, unit="money", period="month")
    budgets.load()
    barrier = threading.Barrier(64)
    lock = threading.Lock()
    admitted: list[int] = []
    refusals: list[QuotaExceeded] = []

    def one(seed: int) -> None:
        rng = random.Random(seed)
        barrier.wait()
        for _ in range(3):  # keep trying: headroom freed by cheap requests may admit more
            try:
                res = budgets.reserve(key, "research", cost=worst, tokens=300)
            except QuotaExceeded as exc:
                with lock:
                    refusals.append(exc)
                time.sleep(0.005)
                continue
            time.sleep(rng.uniform(0, 0.02))
            rec, billed, tokens = record(res, cost=rng.uniform(0.2, 1.0) * worst, tokens=300, ts=time.time())
            store.write_sync(insert_fn(rec))
            budgets.settle(res, cost=billed, tokens=tokens, ts=rec.ts)
            with lock:
                admitted.append(seed)
            return

    threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = store.query_one("SELECT SUM(cost) AS c FROM usage")["c"]
    assert total <= worst * 10.5
    assert 10 <= len(admitted) <= 20
    assert refusals and all("key 'k-threads' monthly budget of" in str(e) for e in refusals)
    restarted = BudgetService(store, audit_of(store))
    restarted.load()
    now = datetime.now(UTC)
    assert_ledger_matches(restarted.ledger_snapshot(), usage_sums(store, now.strftime("%Y-%m-%d"), now.strftime("%Y-%m")))
    assert restarted.ledger_snapshot()[("team", "research")]["total"]["cost"] == pytest.approx(total, abs=1e-9)


def test_an_overrun_is_recorded_as_unbilled_and_never_breaks_the_budget(store: Store, add_key: Callable[..., str]) -> None:
    key = add_key("k1")
    budgets = BudgetService(store, audit_of(store))
    budgets.set_budget("key", key, actor=ACTOR, amount=1.0, period="total")
    res = budgets.reserve(key, "default", cost=0.6, tokens=100)
    rec, billed, tokens = record(res, cost=0.9, tokens=130, ts=time.time())  # slower than estimated
    assert (rec.cost, rec.unbilled_cost, rec.unbilled_tokens) == (pytest.approx(0.6), pytest.approx(0.3), 30)
    store.write_sync(insert_fn(rec))
    bill = budgets.settle(res, cost=0.9, tokens=130, ts=rec.ts)  # measured figures: clamped the same way
    assert bill.cost == pytest.approx(0.6) and bill.tokens == 100
    assert budgets.ledger_snapshot()[("key", key)]["total"] == {"cost": pytest.approx(0.6), "tokens": 100}
    with pytest.raises(QuotaExceeded, match=r"key 'k1' total budget of 1\.00 USD has 0\.40 USD left.*it does not reset") as info:
        budgets.reserve(key, "default", cost=0.5, tokens=1)
    assert info.value.retry_after is None
    budgets.reserve(key, "default", cost=0.4, tokens=1)
    restarted = BudgetService(store, audit_of(store))
    restarted.load()
    assert restarted.ledger_snapshot()[("key", key)]["total"] == {"cost": pytest.approx(0.6), "tokens": 100}


# -- scopes, units, messages -------------------------------------------------------------------
def test_team_budget_is_shared_by_its_keys(store: Store, add_key: Callable[..., str]) -> None:
    TeamService(store, audit_of(store)).create("research", actor=ACTOR)
    a, b = add_key("ka", "research"), add_key("kb", "research")
    clock = Clock(utc(2026, 11, 15, 12))
    budgets = BudgetService(store, audit_of(store), clock=clock)
    budgets.set_budget("team", "research", actor=ACTOR, amount=10, unit="money", period="month")
    r1 = budgets.reserve(a, "research", cost=6, tokens=10)
    with pytest.raises(QuotaExceeded, match="team 'research' monthly budget of 10.00 USD has 4.00 USD left after 6.00 USD held by requests in flight"):
        budgets.reserve(b, "research", cost=6, tokens=10)
    budgets.settle(r1, cost=6, tokens=10)
    r2 = budgets.reserve(b, "research", cost=4, tokens=10)
    budgets.settle(r2, cost=4, tokens=10)
    with pytest.raises(QuotaExceeded) as info:
        budgets.reserve(a, "research", cost=0.01, tokens=1)
    assert str(info.value) == "team 'research' monthly budget of 10.00 USD is exhausted; it resets at 2026-12-01T00:00:00Z"
    assert info.value.retry_after == pytest.approx(utc(2026, 12, 1) - clock.t)
    assert info.value.headers["Retry-After"] == str(int(utc(2026, 12, 1) - clock.t))
    # a key of another team is unaffected
    budgets.reserve(add_key("kc"), "default", cost=100, tokens=10)


def test_token_budget_and_every_applicable_budget_is_checked(store: Store, add_key: Callable[..., str]) -> None:
    key = add_key("k1")
    clock = Clock(utc(2026, 3, 10, 8))
    budgets = BudgetService(store, audit_of(store), clock=clock)
    budgets.set_budget("key", key, actor=ACTOR, amount=1000, unit="tokens", period="day")
    budgets.set_budget("key", key, actor=ACTOR, amount=100.0, unit="money", period="month")
    budgets.set_budget("team", "default", actor=ACTOR, amount=1500, unit="tokens", period="total")
    r = budgets.reserve(key, "default", cost=1, tokens=900)
    budgets.settle(r, cost=1, tokens=700)
    with pytest.raises(QuotaExceeded, match="key 'k1' daily budget of 1,000 tokens has 300 tokens left, less than this request's worst case of 400 tokens") as info:
        budgets.reserve(key, "default", cost=1, tokens=400)
    assert info.value.retry_after == pytest.approx(utc(2026, 3, 11) - clock.t)
    clock.t = utc(2026, 3, 11, 0, 0, 1)  # a new day: the daily budget is fresh, the team total is not
    with pytest.raises(QuotaExceeded, match="team 'default' total budget of 1,500 tokens has 800 tokens left") as info:
        budgets.reserve(key, "default", cost=1, tokens=900)
    assert info.value.retry_after is None
    budgets.reserve(key, "default", cost=1, tokens=800)
    with pytest.raises(InvalidRequest):
        budgets.set_budget("key", key, actor=ACTOR, amount=1.5, unit="tokens", period="day")
    with pytest.raises(NotFound):
        budgets.set_budget("key", "nope", actor=ACTOR, amount=1)
    with pytest.raises(NotFound):
        budgets.set_budget("team", "nope", actor=ACTOR, amount=1)


def test_budget_changes_take_effect_immediately_even_from_another_service(store: Store, add_key: Callable[..., str]) -> None:
    key = add_key("k1")
    server, cli = BudgetService(store, audit_of(store)), BudgetService(store, audit_of(store))
    server.reserve(key, "default", cost=5, tokens=1)
    b = cli.set_budget("key", key, actor=ACTOR, amount=5, period="day")
    with pytest.raises(QuotaExceeded):
        server.reserve(key, "default", cost=1, tokens=1)
    assert cli.set_budget("key", key, actor=ACTOR, amount=6, period="day").id == b.id  # same scope/unit/period: updated
    server.reserve(key, "default", cost=1, tokens=1)
    cli.delete_budget(b.id, actor=ACTOR)
    server.reserve(key, "default", cost=1000, tokens=1)
    assert server.list_budgets() == []
    with pytest.raises(NotFound):
        cli.delete_budget(b.id, actor=ACTOR)


# -- settle / release --------------------------------------------------------------------------
def test_release_charges_nothing_and_settle_twice_is_a_no_op(store: Store, add_key: Callable[..., str]) -> None:
    key = add_key("k1")
    budgets = BudgetService(store, audit_of(store))
    budgets.set_budget("key", key, actor=ACTOR, amount=10, period="total")
    r1 = budgets.reserve(key, "default", cost=10, tokens=5)
    budgets.release(r1)
    budgets.release(r1)
    budgets.settle(r1, cost=10, tokens=5)  # after release: nothing
    assert budgets.ledger_snapshot() == {}
    assert budgets.in_flight() == {}
    r2 = budgets.reserve(key, "default", cost=4, tokens=5)
    budgets.settle(r2, cost=3, tokens=5)
    budgets.settle(r2, cost=3, tokens=5)
    budgets.release(r2)
    snap = budgets.ledger_snapshot()[("key", key)]
    assert snap["total"] == {"cost": pytest.approx(3.0), "tokens": 5}
    assert budgets.status(budgets.list_budgets()[0])["remaining"] == pytest.approx(7.0)
    assert budgets.in_flight() == {}


# -- periods -----------------------------------------------------------------------------------
def test_day_and_month_roll_over_and_late_settles_count_in_their_own_period(store: Store, add_key: Callable[..., str]) -> None:
    key = add_key("k1")
    clock = Clock(utc(2026, 1, 31, 23, 59, 50))
    budgets = BudgetService(store, audit_of(store), clock=clock)
    budgets.set_budget("key", key, actor=ACTOR, amount=2, period="day")
    budgets.set_budget("key", key, actor=ACTOR, amount=3, period="month")
    spent_at = clock.t

    res = budgets.reserve(key, "default", cost=1.5, tokens=10)
    clock.t = utc(2026, 2, 1, 0, 0, 5)  # the request finishes after midnight, in a new month
    rec, billed, tokens = record(res, cost=1.2, tokens=10, ts=spent_at)  # its usage row is dated when it started
    store.write_sync(insert_fn(rec))
    budgets.settle(res, cost=billed, tokens=tokens, ts=rec.ts)
    snap = budgets.ledger_snapshot()[("key", key)]
    assert snap["day"]["cost"] == 0 and snap["month"]["cost"] == 0 and snap["total"]["cost"] == pytest.approx(1.2)

    res = budgets.reserve(key, "default", cost=2, tokens=10)  # a fresh day and month
    rec, billed, tokens = record(res, cost=2, tokens=10, ts=clock.t)
    store.write_sync(insert_fn(rec))
    budgets.settle(res, cost=billed, tokens=tokens, ts=rec.ts)
    with pytest.raises(QuotaExceeded, match=r"daily budget of 2\.00 USD is exhausted; it resets at 2026-02-02T00:00:00Z"):
        budgets.reserve(key, "default", cost=0.5, tokens=1)

    clock.t = utc(2026, 2, 2, 9)
    with pytest.raises(QuotaExceeded, match=r"monthly budget of 3\.00 USD has 1\.00 USD left.*resets at 2026-03-01T00:00:00Z"):
        budgets.reserve(key, "default", cost=1.5, tokens=1)
    budgets.reserve(key, "default", cost=1.0, tokens=1)

    restarted = BudgetService(store, audit_of(store), clock=clock)
    restarted.load()
    assert_ledger_matches(restarted.ledger_snapshot(), usage_sums(store, "2026-02-02", "2026-02"))
    assert restarted.ledger_snapshot()[("key", key)]["month"]["cost"] == pytest.approx(2.0)


def test_next_reset() -> None:
    assert next_reset("day", utc(2026, 12, 31, 23, 59)) == utc(2027, 1, 1)
    assert next_reset("month", utc(2026, 12, 31, 23, 59)) == utc(2027, 1, 1)
    assert next_reset("month", utc(2026, 2, 1)) == utc(2026, 3, 1)
    assert next_reset("total", utc(2026, 2, 1)) is None
