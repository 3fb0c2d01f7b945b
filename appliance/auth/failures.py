"""Failed authentication, counted instead of logged one by one.

Every unauthenticated request used to add a durable, fsynced audit record, so any web page
could flood the permanent chain (2,000 POSTs: 2,000 records in 3 s). Failures are now counted
per client address and reason over a window, and each window's counts become one `security`
audit record per (address, reason) when it closes: an auditor still sees the attack, and
10,000 failing requests add a handful of records.

An address over `limit` failures in the current window gets 429 with Retry-After on further
*failing* attempts. A request with a valid key is never refused for this: many staff apps
share one address behind a proxy.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from appliance.audit.log import AuditLog
from appliance.errors import StoreError

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Window:
    start: float
    counts: dict[tuple[str, str], int]


class FailedAuthCounter:
    def __init__(
        self, audit: AuditLog, *, window_seconds: float = 60.0, limit: int = 20, clock: Callable[[], float] = time.time
    ) -> None:
        self._audit = audit
        self.window_seconds = window_seconds
        self.limit = limit
        self._clock = clock
        self._lock = threading.Lock()
        self._window = _Window(clock(), {})
        self._per_client: dict[str, int] = {}
        self._closed: list[_Window] = []

    def record(self, client: str, reason: str) -> float | None:
        """Count one failure; the seconds to wait when `client` is now over the limit, else None."""
        with self._lock:
            now = self._clock()
            self._roll(now)
            key = (client, reason)
            self._window.counts[key] = self._window.counts.get(key, 0) + 1
            total = self._per_client[client] = self._per_client.get(client, 0) + 1
            if total > self.limit:
                return max(1.0, self._window.start + self.window_seconds - now)
            return None

    def _roll(self, now: float) -> None:
        if now - self._window.start < self.window_seconds:
            return
        if self._window.counts:
            self._closed.append(self._window)
        start = self._window.start + self.window_seconds * math.floor((now - self._window.start) / self.window_seconds)
        self._window = _Window(start, {})
        self._per_client = {}

    def take_closed(self, *, everything: bool = False) -> list[_Window]:
        """The windows that ended (and, with `everything`, the current one too)."""
        with self._lock:
            self._roll(self._clock())
            windows, self._closed = self._closed, []
            if everything and self._window.counts:
                windows.append(self._window)
                self._window = _Window(self._clock(), {})
                self._per_client = {}
            return windows

    async def flush(self, *, everything: bool = False) -> int:
        """Write one `security` record per (address, reason) of each closed window. Returns how
        many were written; on a store failure the counts are kept for the next flush."""
        windows = self.take_closed(everything=everything)
        if not windows:
            return 0
        fns = [
            self._audit.append_fn(
                "security",
                {
                    "action": "auth.failures",
                    "client": client,
                    "reason": reason,
                    "count": count,
                    "window_start": w.start,
                    "window_end": min(w.start + self.window_seconds, self._clock()),
                },
                key_id=None,
                team_id=None,
            )
            for w in windows
            for (client, reason), count in sorted(w.counts.items())
        ]
        try:
            await self._audit.store.write(lambda conn: [fn(conn) for fn in fns])
        except StoreError as exc:
            log.error("failed-authentication counts could not be recorded, kept for later: %s", exc)
            with self._lock:
                self._closed[:0] = windows
            return 0
        return len(fns)

    async def run(self) -> None:
        """Flush each window as it closes, until cancelled."""
        while True:
            await asyncio.sleep(max(1.0, self.window_seconds / 4))
            await self.flush()
