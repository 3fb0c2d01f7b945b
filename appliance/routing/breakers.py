"""Circuit breakers, one per candidate (a local model or an upstream model).

closed: requests go through; failures are counted over a sliding window, and reaching the
limit opens the breaker. open: the candidate is skipped (a route falls through to the next)
until the cooldown has passed. half-open: one probe goes through, a request or the free
canary of the health prober; its success closes the breaker, its failure opens it again for
another cooldown. Every failed attempt counts, a retry or the attempt a fallback moved on
from included; overload and a prompt too long for the model do not, as they say nothing
about the candidate's health.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

State = Literal["closed", "open", "half_open"]


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    failures: int = 5
    window_seconds: float = 60.0
    cooldown_seconds: float = 30.0


class Breaker:
    def __init__(self, name: str, policy: BreakerPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.policy = policy
        self._clock = clock
        self._failures: deque[float] = deque()
        self._state: State = "closed"
        self._opened_at = 0.0
        self._probing = False
        self.last_error: str | None = None
        self.last_change = clock()
        self.times_opened = 0
        self._lock = threading.Lock()

    @property
    def state(self) -> State:
        with self._lock:
            return self._current()

    def _current(self) -> State:
        if self._state == "open" and self._clock() - self._opened_at >= self.policy.cooldown_seconds:
            self._state, self._probing, self.last_change = "half_open", False, self._clock()
        return self._state

    def allow(self) -> bool:
        """Whether a request may go to this candidate now; in half-open, only the first asker
        (the probe) is let through until it reports."""
        with self._lock:
            state = self._current()
            if state == "closed":
                return True
            if state == "half_open" and not self._probing:
                self._probing = True
                return True
            return False

    def success(self) -> None:
        with self._lock:
            if self._current() != "closed":
                self._state, self.last_change = "closed", self._clock()
            self._probing = False
            self._failures.clear()

    def failure(self, reason: str) -> None:
        with self._lock:
            now = self._clock()
            self.last_error = reason
            state = self._current()
            if state == "half_open":
                self._open(now)
                return
            if state == "open":
                return
            self._failures.append(now)
            while self._failures and now - self._failures[0] > self.policy.window_seconds:
                self._failures.popleft()
            if len(self._failures) >= self.policy.failures:
                self._open(now)

    def trip(self, reason: str) -> None:
        """Open now, whatever the count (a health check's verdict, not one request's failure)."""
        with self._lock:
            self.last_error = reason
            if self._current() != "open":
                self._open(self._clock())

    def release(self) -> None:
        """A probe that ended with neither success nor failure (the client went away)."""
        with self._lock:
            self._probing = False

    def _open(self, now: float) -> None:
        self._state, self._opened_at, self._probing, self.last_change = "open", now, False, now
        self._failures.clear()
        self.times_opened += 1

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            state = self._current()
            now = self._clock()
            window = [t for t in self._failures if now - t <= self.policy.window_seconds]
            retry_in = max(0.0, self.policy.cooldown_seconds - (now - self._opened_at)) if state == "open" else 0.0
            return {
                "state": state,
                "recent_failures": len(window),
                "last_error": self.last_error,
                "times_opened": self.times_opened,
                "seconds_since_change": round(now - self.last_change, 3),
                "half_open_in_seconds": round(retry_in, 3),
            }


class Breakers:
    """The breakers by candidate name, made on first use."""

    def __init__(self, policy: BreakerPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._by_name: dict[str, Breaker] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Breaker:
        breaker = self._by_name.get(name)
        if breaker is None:
            with self._lock:
                breaker = self._by_name.setdefault(name, Breaker(name, self.policy, self._clock))
        return breaker

    def states(self) -> dict[str, dict[str, Any]]:
        return {name: b.to_dict() for name, b in sorted(self._by_name.items())}

    def half_open(self) -> list[Breaker]:
        return [b for b in list(self._by_name.values()) if b.state == "half_open"]
