"""The checks the scheduler runs: built-in ones (`CheckJob`, made from the services) and
plugins' (`hookspecs.Check`), all registered through the `register_checks` hook, and the
per-check state they keep between runs (rolling baselines, cursors)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from appliance.checks.findings import Finding
from appliance.store import Store

if TYPE_CHECKING:
    from appliance.api.services import Services

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class CheckJob:
    """A check: `run()` is called in a worker thread, never on the event loop, and returns
    its findings. `options` in `[check.<name>]` reach it through the `CheckContext`."""

    name: str
    run: Callable[[], list[Finding]]
    interval_seconds: float
    description: str = ""
    cron: str | None = None
    timeout_seconds: float = 60.0
    source: str = "built-in"


class CheckState:
    """Small JSON state per (check, subject), kept in `check_state` across runs and restarts."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def get(self, check: str, subject: str = "") -> dict[str, Any] | None:
        row = self._store.query_one(
            "SELECT state FROM check_state WHERE check_name = ? AND subject = ?", (check, subject)
        )
        return json.loads(row["state"]) if row else None

    def put(self, check: str, subject: str, state: dict[str, Any]) -> None:
        """Blocking (a worker thread's call): durable on return."""
        text = json.dumps(state, sort_keys=True)
        self._store.write_sync(
            lambda conn: conn.execute(
                "INSERT INTO check_state (check_name, subject, state, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (check_name, subject) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at",
                (check, subject, text, time.time()),
            )
        )


@dataclass(slots=True)
class CheckContext:
    """What built-in checks are made from: the running services, the server's event loop
    (for work that must run on it, such as a canary generation), their state, and each
    check's `[check.<name>]` options."""

    services: Services
    loop: asyncio.AbstractEventLoop
    state: CheckState
    options: dict[str, dict[str, Any]]

    def option(self, check: str, key: str, default: T) -> T:
        value = self.options.get(check, {}).get(key, default)
        return type(default)(value) if isinstance(default, int | float) and not isinstance(default, bool) else value  # type: ignore[return-value]

    def on_loop(self, coro: Awaitable[T], timeout: float) -> T:
        """Run `coro` on the server's loop from a worker thread and wait for it."""
        future = asyncio.run_coroutine_threadsafe(_wrap(coro), self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise


async def _wrap(coro: Awaitable[T]) -> T:
    return await coro
