"""Usage records (one row per metered request) and rollups over them.

The usage row is also the persistence of the spend ledger: `BudgetService.load()` rebuilds the
ledger by summing these rows, so a request's spend is durable exactly when its row is. The
caller inserts it with `insert_fn(record)` inside the same group-commit job as the request's
audit record.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import UTC, date, datetime
from typing import Any, Literal

from appliance.errors import InvalidRequest
from appliance.store import Store

__all__ = ["UsageRecord", "insert_fn", "rollup", "utc_day", "utc_month", "parse_day", "ROLLUP_BY"]

RollupBy = Literal["key", "team", "model", "day"]
ROLLUP_BY: dict[str, str] = {"key": "key_id", "team": "team_id", "model": "model", "day": "day"}


def utc_day(ts: float) -> str:
    """`YYYY-MM-DD` of a Unix time, in UTC."""
    return _day_text(int(ts // 86400))


def utc_month(ts: float) -> str:
    """`YYYY-MM` of a Unix time, in UTC."""
    return _day_text(int(ts // 86400))[:7]


@functools.lru_cache(maxsize=64)
def _day_text(day: int) -> str:
    # Every request asks, several times; Unix time has exactly 86,400 s in each UTC day.
    return datetime.fromtimestamp(day * 86400, tz=UTC).strftime("%Y-%m-%d")


def parse_day(text: str, *, param: str = "day") -> str:
    """Validate a `YYYY-MM-DD` date and return it normalised."""
    try:
        return date.fromisoformat(text.strip()).isoformat()
    except ValueError:
        raise InvalidRequest(f"{param} {text!r} is not a date: use YYYY-MM-DD", param=param) from None


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One metered request.

    `cost` is what was billed to budgets: min(measured cost, reserved cost). Anything measured
    above the reservation is kept in `unbilled_cost` (and `unbilled_tokens`), so nothing is
    hidden but budgets are never exceeded. Use `Reservation.bill(...)` to split the figures.
    """

    request_id: str
    ts: float
    key_id: str
    team_id: str
    model: str
    status: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    energy_j: float = 0.0
    cost: float = 0.0
    unbilled_cost: float = 0.0
    unbilled_tokens: int = 0

    @property
    def day(self) -> str:
        return utc_day(self.ts)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def billed_tokens(self) -> int:
        return self.tokens - self.unbilled_tokens

    def to_dict(self) -> dict[str, Any]:
        # Every field is a scalar, so a shallow copy is `asdict`'s result, at a fraction of its cost.
        row = {name: getattr(self, name) for name in _USAGE_FIELDS}
        row["day"] = self.day
        return row


_USAGE_FIELDS = tuple(f.name for f in fields(UsageRecord))


_INSERT = (
    "INSERT INTO usage (request_id, ts, day, key_id, team_id, model, status, prompt_tokens, completion_tokens,"
    " cached_tokens, queue_ms, compute_ms, energy_j, cost, unbilled_cost, unbilled_tokens)"
    " VALUES (:request_id, :ts, :day, :key_id, :team_id, :model, :status, :prompt_tokens, :completion_tokens,"
    " :cached_tokens, :queue_ms, :compute_ms, :energy_j, :cost, :unbilled_cost, :unbilled_tokens)"
)


def insert_fn(record: UsageRecord) -> Callable[[sqlite3.Connection], None]:
    """A store job inserting `record`; combine it with the audit append in one `store.write`."""
    row = record.to_dict()

    def insert(conn: sqlite3.Connection) -> None:
        conn.execute(_INSERT, row)

    return insert


def rollup(
    store: Store,
    *,
    by: RollupBy | str,
    since_day: str | None = None,
    until_day: str | None = None,
    key_id: str | None = None,
    team_id: str | None = None,
) -> list[dict[str, Any]]:
    """Sums of requests, tokens, energy and cost grouped by key, team, model or UTC day.

    `since_day` and `until_day` (YYYY-MM-DD, UTC) are both inclusive. Rows come ordered by the
    grouping value.
    """
    column = ROLLUP_BY.get(by)
    if column is None:
        raise InvalidRequest(f"by must be one of {', '.join(ROLLUP_BY)}, got {by!r}", param="by")
    where: list[str] = []
    params: dict[str, Any] = {}
    if since_day is not None:
        where.append("day >= :since")
        params["since"] = parse_day(since_day, param="since")
    if until_day is not None:
        where.append("day <= :until")
        params["until"] = parse_day(until_day, param="until")
    if key_id is not None:
        where.append("key_id = :key_id")
        params["key_id"] = key_id
    if team_id is not None:
        where.append("team_id = :team_id")
        params["team_id"] = team_id
    sql = (
        f"SELECT {column} AS grp, COUNT(*) AS requests,"
        " COALESCE(SUM(status >= 400), 0) AS errors,"
        " COALESCE(SUM(prompt_tokens), 0) AS prompt_tokens,"
        " COALESCE(SUM(completion_tokens), 0) AS completion_tokens,"
        " COALESCE(SUM(cached_tokens), 0) AS cached_tokens,"
        " COALESCE(SUM(energy_j), 0.0) AS energy_j,"
        " COALESCE(SUM(compute_ms), 0.0) AS compute_ms,"
        " COALESCE(SUM(cost), 0.0) AS cost,"
        " COALESCE(SUM(unbilled_cost), 0.0) AS unbilled_cost"
        " FROM usage"
        + (" WHERE " + " AND ".join(where) if where else "")
        + f" GROUP BY {column} ORDER BY {column}"
    )
    out: list[dict[str, Any]] = []
    for row in store.query(sql, params):
        out.append(
            {
                by: row["grp"],
                "requests": int(row["requests"]),
                "errors": int(row["errors"]),
                "prompt_tokens": int(row["prompt_tokens"]),
                "completion_tokens": int(row["completion_tokens"]),
                "cached_tokens": int(row["cached_tokens"]),
                "tokens": int(row["prompt_tokens"]) + int(row["completion_tokens"]),
                "energy_j": float(row["energy_j"]),
                "compute_ms": float(row["compute_ms"]),
                "cost": float(row["cost"]),
                "unbilled_cost": float(row["unbilled_cost"]),
            }
        )
    return out
