"""Budgets and the spend ledger.

A budget caps what a key or a team may spend, in money or tokens, per UTC day, per UTC month
or in total. A key or team may have several (one per unit and period); a request must fit all
of its key's and its team's budgets.

The ledger is in memory, guarded by one lock, and exact because the appliance is one process.
It is persisted by the usage rows themselves (`appliance.metering.usage`), which the request
path commits together with the audit record, and rebuilt from them at start-up (`load`).

The invariant, spend never exceeds budget, holds by construction. All money is counted in
integer nano-units of the currency, so the arithmetic below is exact. For each budget with
amount A, at every moment:

    spent(period) + reserved_in_flight  <=  A                                      (I)

- `reserve` admits a request only if spent + reserved + r <= A for every applicable budget,
  where r is the request's worst case (rounded up): (I) is kept.
- `settle` removes r from the in-flight total and adds the billed amount b = min(actual, r):
  since b <= r the left side of (I) can only shrink.
- `release` removes r and adds nothing.
- At a period boundary spent(period) drops to 0 while reserved stays, and reserved <= A held
  before, so (I) holds after. A request reserved on one day and settled on the next is
  billed to the period containing its usage timestamp.

The clamp b = min(actual, r) is what makes (I) provable: the worst case of a local request is
an estimate (compute time is not a function of tokens alone), so on a rare overrun the
request is billed its reservation and the excess is recorded in the usage row as
`unbilled_cost` / `unbilled_tokens`: visible in every report, never charged to a budget.
The only thing that can break (I) is an administrator lowering A below what is already spent;
then nothing more is admitted until the period resets.
"""

from __future__ import annotations

import itertools
import math
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from appliance.audit.log import Actor, AuditLog
from appliance.errors import InvalidRequest, NotFound, QuotaExceeded
from appliance.metering.usage import utc_day, utc_month
from appliance.store import Store
from appliance.teams import TeamService

__all__ = ["Bill", "Budget", "BudgetService", "Reservation", "SCOPES", "UNITS", "PERIODS", "next_reset"]

SCOPES: tuple[str, ...] = ("key", "team")
UNITS: tuple[str, ...] = ("money", "tokens")
PERIODS: tuple[str, ...] = ("day", "month", "total")
_ADJECTIVE = {"day": "daily", "month": "monthly", "total": "total"}
NANO = 1_000_000_000  # money is counted in integer nano-units of the currency
_IN_FLIGHT_RETRY_SECONDS = 1.0
ScopeKey = tuple[str, str]  # ("key", key_id) or ("team", team_id)


def _nanos_up(amount: float) -> int:
    return max(0, math.ceil(amount * NANO))


def _nanos(amount: float) -> int:
    return max(0, round(amount * NANO))


def next_reset(period: str, now: float) -> float | None:
    """Unix time at which `period` next starts over (UTC); None for `total`."""
    t = datetime.fromtimestamp(now, tz=UTC)
    if period == "day":
        start = datetime(t.year, t.month, t.day, tzinfo=UTC)
        return start.timestamp() + 86400
    if period == "month":
        year, month = (t.year + 1, 1) if t.month == 12 else (t.year, t.month + 1)
        return datetime(year, month, 1, tzinfo=UTC).timestamp()
    return None


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class Budget:
    id: int
    scope: str
    scope_id: str
    unit: str
    amount: float
    period: str
    created_at: float

    def limit(self) -> int:
        """The amount in ledger units: nano-currency for money, tokens for tokens."""
        return _nanos(self.amount) if self.unit == "money" else int(self.amount)

    def describe(self, currency: str = "USD") -> str:
        """`team 'research' monthly budget of 10.00 USD`"""
        return f"{self.scope} '{self.scope_id}' {_ADJECTIVE[self.period]} budget of {_fmt(self.unit, self.limit(), currency)}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "scope": self.scope,
            "scope_id": self.scope_id,
            "unit": self.unit,
            "amount": self.amount,
            "period": self.period,
            "created_at": _iso(self.created_at),
        }


@dataclass(frozen=True, slots=True)
class Bill:
    """How a finished request's measured figures split into billed and unbilled parts."""

    cost: float  # billed, what goes into UsageRecord.cost
    unbilled_cost: float
    tokens: int  # billed
    unbilled_tokens: int


@dataclass(frozen=True, slots=True)
class Reservation:
    """A request's worst case, held against its key's and team's budgets until settled."""

    id: int
    key_id: str
    team_id: str
    cost: float  # the reserved worst case, rounded up to a nano-unit
    tokens: int
    created_at: float

    @property
    def cost_nanos(self) -> int:
        return round(self.cost * NANO)

    def bill(self, *, cost: float, tokens: int) -> Bill:
        """Split measured figures: billed = min(measured, reserved), the rest is unbilled."""
        measured = _nanos(cost)
        billed = min(measured, self.cost_nanos)
        billed_tokens = min(max(0, tokens), self.tokens)
        return Bill(
            cost=billed / NANO,
            unbilled_cost=(measured - billed) / NANO,
            tokens=billed_tokens,
            unbilled_tokens=max(0, tokens - billed_tokens),
        )


class BudgetService:
    """Budget CRUD plus the exact in-memory ledger. Thread-safe; all ledger operations are O(budgets)."""

    def __init__(
        self, store: Store, audit: AuditLog, *, currency: str = "USD", clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._audit = audit
        self._teams = TeamService(store)
        self.currency = currency
        self._clock = clock
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        now = clock()
        self._day = utc_day(now)
        self._month = utc_month(now)
        # period -> scope -> [nanos, tokens]
        self._spent: dict[str, dict[ScopeKey, list[int]]] = {p: {} for p in PERIODS}
        self._in_flight: dict[ScopeKey, list[int]] = {}
        self._open: dict[int, Reservation] = {}

    # -- CRUD -------------------------------------------------------------------------------
    def set_budget(
        self, scope: str, scope_id: str, *, actor: Actor, amount: float, unit: str = "money", period: str = "month"
    ) -> Budget:
        """Create the budget for (scope, scope_id, unit, period), or change its amount.

        A team may be named by id or name. Takes effect for the next `reserve`.
        """
        if scope not in SCOPES:
            raise InvalidRequest(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}", param="scope")
        if unit not in UNITS:
            raise InvalidRequest(f"unit must be one of {', '.join(UNITS)}, got {unit!r}", param="unit")
        if period not in PERIODS:
            raise InvalidRequest(f"period must be one of {', '.join(PERIODS)}, got {period!r}", param="period")
        if not isinstance(amount, (int, float)) or not math.isfinite(amount) or amount < 0:
            raise InvalidRequest("amount must be a number, zero or more", param="amount")
        if unit == "tokens" and amount != int(amount):
            raise InvalidRequest("a token budget must be a whole number of tokens", param="amount")
        if scope == "team":
            scope_id = self._teams.get(scope_id).id
        elif self._store.query_one("SELECT 1 FROM api_keys WHERE id = ?", (scope_id,)) is None:
            raise NotFound(f"No key with id {scope_id!r}.")
        row = {"scope": scope, "scope_id": scope_id, "unit": unit, "amount": float(amount), "period": period, "now": time.time()}
        existing = self._store.query_one(
            "SELECT * FROM budgets WHERE scope = :scope AND scope_id = :scope_id AND unit = :unit AND period = :period", row
        )
        before = _budget(existing).to_dict() if existing else None

        def upsert(conn: sqlite3.Connection) -> int:
            conn.execute(
                "INSERT INTO budgets (scope, scope_id, unit, amount, period, created_at)"
                " VALUES (:scope, :scope_id, :unit, :amount, :period, :now)"
                " ON CONFLICT (scope, scope_id, unit, period) DO UPDATE SET amount = excluded.amount",
                row,
            )
            found = conn.execute(
                "SELECT * FROM budgets WHERE scope = :scope AND scope_id = :scope_id AND unit = :unit AND period = :period",
                row,
            ).fetchone()
            budget = _budget(found)
            self._audit.admin_fn(actor, "budgets.set", str(budget.id), before=before, after=budget.to_dict())(conn)
            return budget.id

        return self.get_budget(self._store.write_sync(upsert))

    def get_budget(self, budget_id: int) -> Budget:
        row = self._store.query_one("SELECT * FROM budgets WHERE id = ?", (budget_id,))
        if row is None:
            raise NotFound(f"No budget with id {budget_id}.")
        return _budget(row)

    def list_budgets(self, scope: str | None = None, scope_id: str | None = None) -> list[Budget]:
        where, params = [], []
        if scope is not None:
            where.append("scope = ?")
            params.append(scope)
        if scope_id is not None:
            where.append("scope_id = ?")
            params.append(scope_id)
        sql = "SELECT * FROM budgets" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY scope, scope_id, unit, period"
        return [_budget(r) for r in self._store.query(sql, tuple(params))]

    def delete_budget(self, budget_id: int, *, actor: Actor) -> Budget:
        budget = self.get_budget(budget_id)
        audit = self._audit.admin_fn(actor, "budgets.delete", str(budget_id), before=budget.to_dict())

        def write(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM budgets WHERE id = ?", (budget_id,))
            audit(conn)

        self._store.write_sync(write)
        return budget

    def budgets_for(self, key_id: str, team_id: str) -> list[Budget]:
        """Every budget that applies to a request by `key_id` of team `team_id` (read fresh,
        so changes made by another process, such as the CLI, apply at once)."""
        rows = self._store.query(
            "SELECT * FROM budgets WHERE (scope = 'key' AND scope_id = ?) OR (scope = 'team' AND scope_id = ?)",
            (key_id, team_id),
        )
        return [_budget(r) for r in rows]

    # -- ledger -----------------------------------------------------------------------------
    def load(self) -> None:
        """Rebuild spend from the usage table: per key and team, this UTC day, month and all time."""
        now = self._clock()
        day, month = utc_day(now), utc_month(now)
        billed_nanos = "COALESCE(SUM(CAST(ROUND(COALESCE(cost, 0) * 1e9) AS INTEGER)), 0)"
        billed_tokens = "COALESCE(SUM(COALESCE(prompt_tokens, 0) + COALESCE(completion_tokens, 0) - COALESCE(unbilled_tokens, 0)), 0)"
        totals = self._store.query(f"SELECT key_id, team_id, {billed_nanos} AS n, {billed_tokens} AS t FROM usage GROUP BY key_id, team_id")
        recent = self._store.query(
            f"SELECT key_id, team_id, day, {billed_nanos} AS n, {billed_tokens} AS t FROM usage"
            " WHERE day >= ? AND day <= ? GROUP BY key_id, team_id, day",
            (month + "-01", day),
        )
        spent: dict[str, dict[ScopeKey, list[int]]] = {p: {} for p in PERIODS}

        def add(period: str, key_id: str, team_id: str, n: int, t: int) -> None:
            for scope in (("key", key_id), ("team", team_id)):
                acc = spent[period].setdefault(scope, [0, 0])
                acc[0] += int(n)
                acc[1] += int(t)

        for r in totals:
            add("total", r["key_id"], r["team_id"], r["n"], r["t"])
        for r in recent:
            add("month", r["key_id"], r["team_id"], r["n"], r["t"])
            if r["day"] == day:
                add("day", r["key_id"], r["team_id"], r["n"], r["t"])
        with self._lock:
            self._day, self._month = day, month
            self._spent = spent

    def reserve(self, key_id: str, team_id: str, *, cost: float, tokens: int) -> Reservation:
        """Hold a request's worst case against every budget of its key and team.

        Raises `QuotaExceeded` naming the budget that cannot cover it, before any compute.
        """
        budgets = self.budgets_for(key_id, team_id)
        need_nanos = _nanos_up(cost)
        need_tokens = max(0, int(tokens))
        with self._lock:
            now = self._clock()
            self._roll(now)
            failures = [f for b in budgets if (f := self._check(b, need_nanos, need_tokens, now)) is not None]
            if failures:
                raise _refusal(failures)
            reservation = Reservation(next(self._ids), key_id, team_id, need_nanos / NANO, need_tokens, now)
            for scope in (("key", key_id), ("team", team_id)):
                acc = self._in_flight.setdefault(scope, [0, 0])
                acc[0] += need_nanos
                acc[1] += need_tokens
            self._open[reservation.id] = reservation
            return reservation

    def settle(self, reservation: Reservation, *, cost: float, tokens: int, ts: float | None = None) -> Bill:
        """Release the hold and add the billed spend (min(actual, reserved)) to the ledger.

        `ts` is the usage record's timestamp (default: now); the spend counts in the day and
        month containing it. Settling or releasing twice is a no-op (returns the bill anyway).
        """
        bill = reservation.bill(cost=cost, tokens=tokens)
        with self._lock:
            if self._open.pop(reservation.id, None) is None:
                return bill
            self._unhold(reservation)
            now = self._clock()
            when = now if ts is None else ts
            self._roll(max(now, when))
            n, t = round(bill.cost * NANO), bill.tokens
            periods = ["total"]
            if utc_month(when) == self._month:
                periods.append("month")
            if utc_day(when) == self._day:
                periods.append("day")
            for period in periods:
                for scope in (("key", reservation.key_id), ("team", reservation.team_id)):
                    acc = self._spent[period].setdefault(scope, [0, 0])
                    acc[0] += n
                    acc[1] += t
        return bill

    def release(self, reservation: Reservation) -> None:
        """Drop the hold of a request that failed before compute; charges nothing. Idempotent."""
        with self._lock:
            if self._open.pop(reservation.id, None) is not None:
                self._unhold(reservation)

    def ledger_snapshot(self) -> dict[ScopeKey, dict[str, dict[str, float | int]]]:
        """Settled spend per scope: {("key", id): {"day"|"month"|"total": {"cost", "tokens"}}}."""
        with self._lock:
            self._roll(self._clock())
            scopes = set().union(*(self._spent[p] for p in PERIODS))
            return {
                scope: {
                    p: {"cost": self._spent[p].get(scope, [0, 0])[0] / NANO, "tokens": self._spent[p].get(scope, [0, 0])[1]}
                    for p in PERIODS
                }
                for scope in scopes
            }

    def in_flight(self) -> dict[ScopeKey, dict[str, float | int]]:
        """Worst cases currently held, per scope."""
        with self._lock:
            return {s: {"cost": v[0] / NANO, "tokens": v[1]} for s, v in self._in_flight.items() if v != [0, 0]}

    def status(self, budget: Budget) -> dict[str, Any]:
        """The budget with its spend, in-flight holds, what is left and when it resets."""
        with self._lock:
            now = self._clock()
            self._roll(now)
            scope = (budget.scope, budget.scope_id)
            i = 0 if budget.unit == "money" else 1
            spent = self._spent[budget.period].get(scope, [0, 0])[i]
            held = self._in_flight.get(scope, [0, 0])[i]
        reset = next_reset(budget.period, now)
        remaining = max(0, budget.limit() - spent - held)

        def shown(value: int) -> float | int:
            return value / NANO if budget.unit == "money" else value

        return budget.to_dict() | {
            "spent": shown(spent),
            "in_flight": shown(held),
            "remaining": shown(remaining),
            "resets_at": _iso(reset) if reset is not None else None,
        }

    # -- internals (call with the lock held) -----------------------------------------------------
    def _roll(self, now: float) -> None:
        day, month = utc_day(now), utc_month(now)
        if day > self._day:
            self._day = day
            self._spent["day"] = {}
        if month > self._month:
            self._month = month
            self._spent["month"] = {}

    def _unhold(self, reservation: Reservation) -> None:
        for scope in (("key", reservation.key_id), ("team", reservation.team_id)):
            acc = self._in_flight.get(scope)
            if acc is not None:
                acc[0] -= reservation.cost_nanos
                acc[1] -= reservation.tokens
                if acc == [0, 0]:
                    del self._in_flight[scope]

    def _check(self, budget: Budget, need_nanos: int, need_tokens: int, now: float) -> _Failure | None:
        scope = (budget.scope, budget.scope_id)
        i = 0 if budget.unit == "money" else 1
        need = need_nanos if budget.unit == "money" else need_tokens
        spent = self._spent[budget.period].get(scope, [0, 0])[i]
        held = self._in_flight.get(scope, [0, 0])[i]
        limit = budget.limit()
        if spent + held + need <= limit:
            return None
        reset = next_reset(budget.period, now)
        until_reset = None if reset is None else reset - now
        resets = f"it resets at {_iso(reset)}" if reset is not None else "it does not reset"
        name = budget.describe(self.currency)
        if spent >= limit:
            return _Failure(3, until_reset, f"{name} is exhausted; {resets}")
        left = _fmt(budget.unit, limit - spent, self.currency)
        worst = _fmt(budget.unit, need, self.currency)
        if spent + need > limit:
            return _Failure(
                2, until_reset, f"{name} has {left} left, less than this request's worst case of {worst} (lower max_tokens); {resets}"
            )
        free = _fmt(budget.unit, max(0, limit - spent - held), self.currency)
        held_text = _fmt(budget.unit, held, self.currency)
        return _Failure(
            1,
            _IN_FLIGHT_RETRY_SECONDS,
            f"{name} has {free} left after {held_text} held by requests in flight, "
            f"less than this request's worst case of {worst}; retry shortly ({resets})",
        )


@dataclass(frozen=True, slots=True)
class _Failure:
    severity: int  # 3 exhausted, 2 too big for what is left, 1 held by requests in flight
    retry_after: float | None
    message: str


def _refusal(failures: list[_Failure]) -> QuotaExceeded:
    worst = max(failures, key=lambda f: (f.severity, math.inf if f.retry_after is None else f.retry_after))
    retry: float | None
    if any(f.retry_after is None for f in failures):
        retry = None
    else:
        retry = max(f.retry_after for f in failures if f.retry_after is not None)
    return QuotaExceeded(worst.message, retry_after=retry)


def _fmt(unit: str, value: int, currency: str) -> str:
    if unit == "tokens":
        return f"{value:,} tokens"
    amount = value / NANO
    text = f"{amount:,.2f}" if abs(amount * 100 - round(amount * 100)) < 1e-9 else f"{amount:,.6g}"
    return f"{text} {currency}"


def _budget(row: sqlite3.Row) -> Budget:
    return Budget(
        id=int(row["id"]),
        scope=row["scope"],
        scope_id=row["scope_id"],
        unit=row["unit"],
        amount=float(row["amount"]),
        period=row["period"],
        created_at=float(row["created_at"]),
    )
