"""The run history of checks in SQLite (`check_runs`), pruned by age and count per check."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from appliance.checks.findings import Finding, Status
from appliance.store import Store

MAX_HISTORY_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class CheckRun:
    check: str
    trigger: str  # schedule | manual
    started_at: float
    duration_ms: float
    cpu_seconds: float
    status: Status
    summary: str
    findings: list[Finding]
    id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "check": self.check,
            "trigger": self.trigger,
            "started_at": self.started_at,
            "duration_ms": self.duration_ms,
            "cpu_seconds": self.cpu_seconds,
            "status": self.status,
            "summary": self.summary,
            "findings": [f.to_dict() for f in self.findings],
        }


class CheckHistory:
    def __init__(self, store: Store, *, keep_days: float, keep_runs: int) -> None:
        self._store = store
        self.keep_days = keep_days
        self.keep_runs = keep_runs

    def record_fn(self, run: CheckRun) -> Callable[[sqlite3.Connection], int]:
        """A write function storing `run` and pruning that check's old runs; returns its id."""
        findings = json.dumps([f.to_dict() for f in run.findings], sort_keys=True, default=str)

        def write(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "INSERT INTO check_runs (check_name, trigger, started_at, duration_ms, cpu_seconds, status, summary, findings)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (run.check, run.trigger, run.started_at, run.duration_ms, run.cpu_seconds, run.status, run.summary, findings),
            )
            conn.execute(
                "DELETE FROM check_runs WHERE check_name = ? AND (started_at < ? OR id NOT IN"
                " (SELECT id FROM check_runs WHERE check_name = ? ORDER BY id DESC LIMIT ?))",
                (run.check, time.time() - self.keep_days * 86400, run.check, self.keep_runs),
            )
            return int(cur.lastrowid or 0)

        return write

    def runs(self, check: str | None = None, *, limit: int = 50, before_id: int | None = None) -> list[CheckRun]:
        """Newest first."""
        limit = max(1, min(int(limit), MAX_HISTORY_LIMIT))
        where, params = [], []
        if check is not None:
            where.append("check_name = ?")
            params.append(check)
        if before_id is not None:
            where.append("id < ?")
            params.append(before_id)
        sql = "SELECT * FROM check_runs" + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY id DESC LIMIT ?"
        return [_run(row) for row in self._store.query(sql, (*params, limit))]

    def latest(self) -> dict[str, CheckRun]:
        """Each check's newest run."""
        rows = self._store.query(
            "SELECT r.* FROM check_runs r JOIN (SELECT check_name, MAX(id) AS id FROM check_runs GROUP BY check_name) m"
            " ON m.id = r.id"
        )
        return {row["check_name"]: _run(row) for row in rows}


def _run(row: sqlite3.Row) -> CheckRun:
    findings = [
        Finding(f.get("status", "error"), f.get("summary", ""), f.get("subject", ""), f.get("details") or {})
        for f in json.loads(row["findings"] or "[]")
    ]
    return CheckRun(
        check=row["check_name"],
        trigger=row["trigger"],
        started_at=row["started_at"],
        duration_ms=row["duration_ms"] or 0.0,
        cpu_seconds=row["cpu_seconds"] or 0.0,
        status=row["status"],
        summary=row["summary"] or "",
        findings=findings,
        id=row["id"],
    )
