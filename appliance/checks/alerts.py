"""Alerts: `[[alerts.rules]]` map check findings to channels. An alert is opened once per
(rule, check, subject) while its finding is at the rule's severity or worse, re-sent every
`repeat_seconds` while it stays open, and resolved when the finding clears (or when a
successful run no longer reports its subject). Each open, repeat and resolve is an audit
event, written before delivery is attempted.

Delivery never holds a check up: it runs in the background, each channel in a worker
thread with a time limit; every attempt is stored (`alert_deliveries`), so a channel that is
down is visible (`/admin/alerts/channels`) rather than silent.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fnmatch
import json
import logging
import socket
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from appliance import __version__
from appliance.audit import AuditLog
from appliance.checks.findings import Finding, rank
from appliance.checks.history import CheckRun
from appliance.config import AlertRule
from appliance.errors import NotFound
from appliance.redaction import scrub_keys
from appliance.store import Store

log = logging.getLogger(__name__)
Send = Callable[[Mapping[str, Any]], None]
SEND_TIMEOUT_SECONDS = 15.0


@dataclass(frozen=True, slots=True)
class ChannelEntry:
    name: str
    source: str  # "built-in" or the plugin that registered it
    send: Send
    describe: dict[str, Any]


class AlertEngine:
    def __init__(
        self,
        rules: list[AlertRule],
        channels: Mapping[str, ChannelEntry],
        store: Store,
        audit: AuditLog,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.rules = rules
        self.channels = dict(channels)
        self._store = store
        self._audit = audit
        self._clock = clock
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="alert")
        self._deliveries: set[asyncio.Task[None]] = set()
        self._origin = {"host": socket.gethostname(), "version": __version__}
        for rule in rules:
            for name in rule.channels:
                if name not in self.channels:
                    log.error("alert rule %s names channel %r, which no channel is registered as", rule.name, name)

    # -- from check runs --------------------------------------------------------------------
    async def on_run(self, run: CheckRun) -> None:
        """The check-run listener: open, repeat and resolve alerts for `run`'s findings."""
        for rule in self.rules:
            if any(fnmatch.fnmatchcase(run.check, pattern) for pattern in rule.checks):
                await self._apply(rule, run)

    async def _apply(self, rule: AlertRule, run: CheckRun) -> None:
        now = self._clock()
        open_alerts = {a["subject"]: a for a in self.list(state="open", rule=rule.name, check=run.check)}
        broken = any(f.status == "error" for f in run.findings)
        seen: set[str] = set()
        for finding in run.findings:
            seen.add(finding.subject)
            bad = rank(finding.status) >= rank(rule.severity)
            current = open_alerts.get(finding.subject)
            if bad and current is None:
                await self._event("open", await self._open(rule, run.check, finding, now), rule)
            elif bad and current is not None:
                alert = await self._update(current, finding)
                due = rule.repeat_seconds > 0 and now - (current["last_sent_at"] or current["opened_at"]) >= rule.repeat_seconds
                if due:
                    await self._event("repeat", alert, rule)
            elif current is not None:
                await self._event("resolve", await self._resolve(current, now, finding.summary), rule)
        if not broken:  # an erroring run says nothing of the subjects it did not reach
            for subject, current in open_alerts.items():
                if subject not in seen:
                    await self._event("resolve", await self._resolve(current, now, "no longer reported"), rule)

    async def _open(self, rule: AlertRule, check: str, finding: Finding, now: float) -> dict[str, Any]:
        severity = "fail" if finding.status in ("fail", "error") else "warn"
        details = json.dumps(finding.details, sort_keys=True, default=str)

        def write(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "INSERT INTO alerts (rule, check_name, subject, severity, state, summary, details, opened_at, sends)"
                " VALUES (?, ?, ?, ?, 'open', ?, ?, ?, 0)",
                (rule.name, check, finding.subject, severity, finding.summary, details, now),
            )
            return int(cur.lastrowid or 0)

        return self.get(await self._store.write(write))

    async def _update(self, alert: dict[str, Any], finding: Finding) -> dict[str, Any]:
        severity = "fail" if finding.status in ("fail", "error") else "warn"
        details = json.dumps(finding.details, sort_keys=True, default=str)
        await self._store.write(
            lambda conn: conn.execute(
                "UPDATE alerts SET summary = ?, details = ?, severity = ? WHERE id = ?",
                (finding.summary, details, severity, alert["id"]),
            )
        )
        return self.get(alert["id"])

    async def _resolve(self, alert: dict[str, Any], now: float, summary: str) -> dict[str, Any]:
        await self._store.write(
            lambda conn: conn.execute(
                "UPDATE alerts SET state = 'resolved', resolved_at = ?, summary = ? WHERE id = ?", (now, summary, alert["id"])
            )
        )
        return self.get(alert["id"])

    async def _event(self, event: str, alert: dict[str, Any], rule: AlertRule) -> None:
        """Audit the event, then deliver it in the background."""
        payload = self._payload(alert, event)
        body = {"event": f"alert.{event}", **{k: payload[k] for k in ("id", "rule", "check", "subject", "severity", "summary")}}
        await self._store.write(self._audit.append_fn("system", body, key_id=None, team_id=None))
        channels = [c for c in rule.channels if c in self.channels]
        task = asyncio.get_running_loop().create_task(self._deliver(payload, channels))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    def _payload(self, alert: dict[str, Any], event: str) -> dict[str, Any]:
        return {
            "id": alert["id"],
            "rule": alert["rule"],
            "check": alert["check"],
            "subject": alert["subject"],
            "severity": alert["severity"],
            "event": event,
            "state": alert["state"],
            "summary": alert["summary"],
            "details": alert["details"],
            "opened_at": alert["opened_at"],
            "ts": self._clock(),
            "sends": alert["sends"] + 1,
            "appliance": self._origin,
        }

    async def _deliver(self, payload: dict[str, Any], channels: list[str]) -> None:
        results = await asyncio.gather(*(self.send_to(name, payload) for name in channels))
        if any(ok for ok, _ in results):
            now = self._clock()
            await self._store.write(
                lambda conn: conn.execute(
                    "UPDATE alerts SET last_sent_at = ?, sends = sends + 1 WHERE id = ?", (now, payload["id"])
                )
            )

    async def send_to(self, name: str, payload: Mapping[str, Any]) -> tuple[bool, str | None]:
        """Send one alert on one channel, within the time limit; the attempt is stored."""
        channel = self.channels.get(name)
        if channel is None:
            raise NotFound(f"There is no alert channel named '{name}'.", param="name")
        error: str | None = None
        try:
            future = self._pool.submit(channel.send, payload)
            await asyncio.wait_for(asyncio.wrap_future(future), SEND_TIMEOUT_SECONDS)
        except TimeoutError:
            error = f"timed out after {SEND_TIMEOUT_SECONDS:g}s"
        except Exception as exc:  # noqa: BLE001 - any channel failure is recorded, never raised
            error = scrub_keys(f"{type(exc).__name__}: {exc}")[:500]
        if error is not None:
            log.warning("alert %s could not be sent on channel %s: %s", payload.get("id"), name, error)
        now = self._clock()
        await self._store.write(
            lambda conn: conn.execute(
                "INSERT INTO alert_deliveries (alert_id, channel, event, ts, ok, error) VALUES (?, ?, ?, ?, ?, ?)",
                (payload.get("id") or 0, name, payload.get("event", "test"), now, int(error is None), error),
            )
        )
        return error is None, error

    async def drain(self) -> None:
        if self._deliveries:
            await asyncio.gather(*list(self._deliveries), return_exceptions=True)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- queries ----------------------------------------------------------------------------
    def get(self, alert_id: int) -> dict[str, Any]:
        return get_alert(self._store, alert_id)

    def list(
        self, *, state: str | None = None, rule: str | None = None, check: str | None = None, limit: int = 200
    ) -> list[dict[str, Any]]:
        return list_alerts(self._store, state=state, rule=rule, check=check, limit=limit)

    def deliveries(self, alert_id: int) -> list[dict[str, Any]]:
        rows = self._store.query("SELECT * FROM alert_deliveries WHERE alert_id = ? ORDER BY id", (alert_id,))
        return [dict(row) for row in rows]

    def channel_states(self) -> list[dict[str, Any]]:
        """Each channel with its delivery record: attempts, failures, the last error."""
        stats = {
            row["channel"]: row
            for row in self._store.query(
                "SELECT channel, COUNT(*) AS attempts, SUM(ok) AS delivered, MAX(CASE WHEN ok THEN ts END) AS last_ok_at,"
                " MAX(CASE WHEN NOT ok THEN ts END) AS last_failure_at FROM alert_deliveries GROUP BY channel"
            )
        }
        out = []
        for name, channel in sorted(self.channels.items()):
            row = stats.get(name)
            last_error = self._store.query_one(
                "SELECT error FROM alert_deliveries WHERE channel = ? AND NOT ok ORDER BY id DESC LIMIT 1", (name,)
            )
            failing = bool(row and row["last_failure_at"] and (row["last_ok_at"] or 0) < row["last_failure_at"])
            out.append(
                {
                    "name": name,
                    "source": channel.source,
                    **channel.describe,
                    "attempts": row["attempts"] if row else 0,
                    "delivered": row["delivered"] or 0 if row else 0,
                    "failed": (row["attempts"] - (row["delivered"] or 0)) if row else 0,
                    "failing": failing,
                    "last_ok_at": row["last_ok_at"] if row else None,
                    "last_failure_at": row["last_failure_at"] if row else None,
                    "last_error": last_error["error"] if last_error else None,
                    "rules": [r.name for r in self.rules if name in r.channels],
                }
            )
        return out


def get_alert(store: Store, alert_id: int) -> dict[str, Any]:
    row = store.query_one("SELECT * FROM alerts WHERE id = ?", (alert_id,))
    if row is None:
        raise NotFound(f"There is no alert {alert_id}.", param="alert_id")
    return _alert(row)


def list_alerts(
    store: Store, *, state: str | None = None, rule: str | None = None, check: str | None = None, limit: int = 200
) -> list[dict[str, Any]]:
    """Alerts, newest first (the engine's, or the database's when no server runs)."""
    where, params = [], []
    for column, value in (("state", state), ("rule", rule), ("check_name", check)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    sql = "SELECT * FROM alerts" + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY id DESC LIMIT ?"
    return [_alert(row) for row in store.query(sql, (*params, max(1, min(limit, 1000))))]


def _alert(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "rule": row["rule"],
        "check": row["check_name"],
        "subject": row["subject"],
        "severity": row["severity"],
        "state": row["state"],
        "summary": row["summary"] or "",
        "details": json.loads(row["details"] or "{}"),
        "opened_at": row["opened_at"],
        "last_sent_at": row["last_sent_at"],
        "resolved_at": row["resolved_at"],
        "sends": row["sends"] or 0,
    }
