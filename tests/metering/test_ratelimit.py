"""Per-key token buckets for requests and tokens per minute."""

from __future__ import annotations

import threading

import pytest

from appliance.errors import InvalidRequest, RateLimited
from appliance.metering.ratelimit import RateLimiter, format_duration


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_format_duration_matches_openai_style() -> None:
    assert format_duration(0) == "0s"
    assert format_duration(0.0171) == "18ms"
    assert format_duration(1) == "1s"
    assert format_duration(1.2) == "2s"
    assert format_duration(59) == "59s"
    assert format_duration(360) == "6m0s"
    assert format_duration(3600) == "1h0m0s"


def test_requests_per_minute_headers_retry_after_and_refill() -> None:
    clock = Clock()
    limiter = RateLimiter(monotonic=clock)
    first = limiter.check("k1", 3, None, 100).as_dict()
    assert first == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "2",
        "x-ratelimit-reset-requests": "20s",
    }
    limiter.check("k1", 3, None, 100)
    limiter.check("k1", 3, None, 100)
    with pytest.raises(RateLimited) as info:
        limiter.check("k1", 3, None, 100)
    exc = info.value
    assert exc.retry_after == pytest.approx(20.0)
    assert exc.headers["Retry-After"] == "20"
    assert exc.headers["x-ratelimit-remaining-requests"] == "0"
    assert exc.headers["x-ratelimit-reset-requests"] == "1m0s"
    assert "requests per min (RPM): limit 3" in exc.message and "try again in 20s" in exc.message
    clock.t += 19.9
    with pytest.raises(RateLimited) as info:
        limiter.check("k1", 3, None, 100)
    assert info.value.retry_after == pytest.approx(0.1)
    assert info.value.headers["Retry-After"] == "1"
    clock.t += 0.1
    assert limiter.check("k1", 3, None, 100).remaining_requests == 0
    clock.t += 600  # refills to the limit, never above it
    assert limiter.headers("k1", 3, None).remaining_requests == 3
    # other keys have their own buckets; None means unlimited
    assert limiter.check("k2", 3, None, 1).remaining_requests == 2
    assert limiter.check("k3", None, None, 10**9).as_dict() == {}


def test_tokens_per_minute_with_refund() -> None:
    clock = Clock()
    limiter = RateLimiter(monotonic=clock)
    headers = limiter.check("k1", None, 1000, 600)
    assert headers.as_dict() == {
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "400",
        "x-ratelimit-reset-tokens": "36s",
    }
    with pytest.raises(RateLimited) as info:
        limiter.check("k1", None, 1000, 600)
    assert info.value.retry_after == pytest.approx(12.0)  # 200 tokens short at 1000/60 per second
    assert "tokens per min (TPM): limit 1000, remaining 400, requested 600" in info.value.message
    limiter.refund("k1", 500)  # the completion used 100 of its 600
    assert limiter.check("k1", None, 1000, 600).remaining_tokens == 300
    limiter.refund("k1", 10**6)
    assert limiter.headers("k1", None, 1000).remaining_tokens == 1000  # capped at the limit
    with pytest.raises(InvalidRequest, match="more than the key's limit of 1,000 tokens per minute"):
        limiter.check("k1", None, 1000, 1001)


def test_a_refused_request_takes_nothing_from_either_bucket() -> None:
    clock = Clock()
    limiter = RateLimiter(monotonic=clock)
    limiter.check("k1", 10, 100, 100)
    with pytest.raises(RateLimited) as info:
        limiter.check("k1", 10, 100, 50)
    assert info.value.headers["x-ratelimit-remaining-requests"] == "9"
    assert info.value.retry_after == pytest.approx(30.0)
    assert limiter.headers("k1", 10, 100).remaining_requests == 9


def test_limit_changes_apply_at_once() -> None:
    clock = Clock()
    limiter = RateLimiter(monotonic=clock)
    for _ in range(5):
        limiter.check("k1", 10, None, 1)
    assert limiter.check("k1", 3, None, 1).remaining_requests == 2  # shrunk: capped at the new size
    assert limiter.check("k1", None, None, 1).limit_requests is None
    with pytest.raises(RateLimited):
        limiter.check("k1", 0, None, 1)


def test_exact_under_64_threads() -> None:
    clock = Clock()  # frozen: no refill during the test
    limiter = RateLimiter(monotonic=clock)
    barrier = threading.Barrier(64)
    ok: list[int] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        barrier.wait()
        try:
            limiter.check("k1", 10, 10_000, 100)
        except RateLimited:
            return
        with lock:
            ok.append(i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ok) == 10
