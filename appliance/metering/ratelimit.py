"""Per-key rate limits: token buckets for requests per minute (rpm) and tokens per minute (tpm).

Each bucket holds up to the per-minute limit and refills continuously at limit/60 per second,
so a key may burst up to its limit and then sustains exactly its limit per minute. A request
is charged prompt_tokens + max_tokens up front; the unused part is refunded after completion.

Headers follow OpenAI's names and duration style (`1s`, `6m0s`, `20ms`):
x-ratelimit-{limit,remaining,reset}-{requests,tokens}; `reset` is the time until the bucket is
full again.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from appliance.errors import InvalidRequest, RateLimited

__all__ = ["RateHeaders", "RateLimiter", "format_duration"]


def format_duration(seconds: float) -> str:
    """OpenAI's reset style: `0s`, `20ms`, `1s`, `59s`, `6m0s`, `1h0m0s` (rounded up)."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{min(999, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds - 1e-9)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


@dataclass(frozen=True, slots=True)
class RateHeaders:
    """A key's rate-limit state, for every response; None fields mean unlimited."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests: float | None = None  # seconds until the bucket is full
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens: float | None = None

    def as_dict(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.limit_requests is not None:
            out["x-ratelimit-limit-requests"] = str(self.limit_requests)
            out["x-ratelimit-remaining-requests"] = str(self.remaining_requests)
            out["x-ratelimit-reset-requests"] = format_duration(self.reset_requests or 0.0)
        if self.limit_tokens is not None:
            out["x-ratelimit-limit-tokens"] = str(self.limit_tokens)
            out["x-ratelimit-remaining-tokens"] = str(self.remaining_tokens)
            out["x-ratelimit-reset-tokens"] = format_duration(self.reset_tokens or 0.0)
        return out


class _Bucket:
    __slots__ = ("capacity", "level", "updated")

    def __init__(self, capacity: int, now: float) -> None:
        self.capacity = capacity
        self.level = float(capacity)
        self.updated = now

    @property
    def rate(self) -> float:
        return self.capacity / 60.0

    def refill(self, capacity: int, now: float) -> None:
        if capacity != self.capacity:  # the key's limit changed: keep what is used, cap at the new size
            self.capacity = capacity
            self.level = min(self.level, float(capacity))
        elapsed = max(0.0, now - self.updated)
        self.level = min(float(self.capacity), self.level + elapsed * self.rate)
        self.updated = now

    def wait_for(self, amount: float) -> float:
        if self.level >= amount:
            return 0.0
        return (amount - self.level) / self.rate if self.capacity else 60.0

    def until_full(self) -> float:
        return (self.capacity - self.level) / self.rate if self.capacity else 0.0


class RateLimiter:
    """Token buckets per key. Thread-safe and O(1) per call."""

    def __init__(self, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._now = monotonic
        self._lock = threading.Lock()
        self._requests: dict[str, _Bucket] = {}
        self._tokens: dict[str, _Bucket] = {}

    def check(self, key_id: str, rpm: int | None, tpm: int | None, tokens: int) -> RateHeaders:
        """Take one request and `tokens` (prompt + max_tokens) from the key's buckets.

        Returns the headers for the response. Raises `RateLimited` (with Retry-After and the
        headers) when either bucket is short, taking nothing; `InvalidRequest` when `tokens`
        alone exceeds the key's tpm, since waiting would never help.
        """
        tokens = max(0, int(tokens))
        if tpm is not None and tokens > tpm:
            raise InvalidRequest(
                f"this request needs up to {tokens:,} tokens (prompt + max_tokens), more than the key's limit of "
                f"{tpm:,} tokens per minute; lower max_tokens",
                param="max_tokens",
            )
        with self._lock:
            now = self._now()
            rb = self._bucket(self._requests, key_id, rpm, now)
            tb = self._bucket(self._tokens, key_id, tpm, now)
            wait_r = rb.wait_for(1) if rb is not None else 0.0
            wait_t = tb.wait_for(tokens) if tb is not None else 0.0
            if wait_r > 0 or wait_t > 0:
                headers = _headers(rb, tb)
                wait = max(wait_r, wait_t)
                if wait_r >= wait_t:
                    what = f"requests per min (RPM): limit {rpm}, remaining {headers.remaining_requests}, requested 1"
                else:
                    what = f"tokens per min (TPM): limit {tpm}, remaining {headers.remaining_tokens}, requested {tokens}"
                raise RateLimited(
                    f"Rate limit reached for key {key_id} on {what}. Please try again in {format_duration(wait)}.",
                    retry_after=wait,
                    limit_headers=headers.as_dict(),
                )
            if rb is not None:
                rb.level -= 1
            if tb is not None:
                tb.level -= tokens
            return _headers(rb, tb)

    def refund(self, key_id: str, unused_tokens: int) -> None:
        """Give back tokens charged up front but not used (max_tokens - completion_tokens)."""
        if unused_tokens <= 0:
            return
        with self._lock:
            bucket = self._tokens.get(key_id)
            if bucket is not None:
                bucket.refill(bucket.capacity, self._now())
                bucket.level = min(float(bucket.capacity), bucket.level + unused_tokens)

    def headers(self, key_id: str, rpm: int | None, tpm: int | None) -> RateHeaders:
        """The current state without taking anything."""
        with self._lock:
            now = self._now()
            return _headers(self._bucket(self._requests, key_id, rpm, now), self._bucket(self._tokens, key_id, tpm, now))

    def forget(self, key_id: str) -> None:
        """Drop a key's buckets (for example when it is revoked)."""
        with self._lock:
            self._requests.pop(key_id, None)
            self._tokens.pop(key_id, None)

    @staticmethod
    def _bucket(buckets: dict[str, _Bucket], key_id: str, limit: int | None, now: float) -> _Bucket | None:
        if limit is None:
            buckets.pop(key_id, None)
            return None
        limit = max(0, int(limit))
        bucket = buckets.get(key_id)
        if bucket is None:
            bucket = buckets[key_id] = _Bucket(limit, now)
        else:
            bucket.refill(limit, now)
        return bucket


def _headers(rb: _Bucket | None, tb: _Bucket | None) -> RateHeaders:
    return RateHeaders(
        limit_requests=rb.capacity if rb else None,
        remaining_requests=max(0, math.floor(rb.level)) if rb else None,
        reset_requests=rb.until_full() if rb else None,
        limit_tokens=tb.capacity if tb else None,
        remaining_tokens=max(0, math.floor(tb.level)) if tb else None,
        reset_tokens=tb.until_full() if tb else None,
    )
