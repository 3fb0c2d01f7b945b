"""What an engine may know of the attempt it serves, set by the dispatcher for the attempt's
task. A context variable, so the runtime's `Engine.generate(request)` keeps its shape."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

# True while the route has a later candidate whose breaker is closed. An upstream that cannot be
# reached then fails at once (its breaker counts it) instead of retrying with backoff, which
# kept each request queued on a dead primary 0.3-0.75 s from its fallback.
_fallback_ready: ContextVar[bool] = ContextVar("fallback_ready", default=False)


def fallback_ready() -> bool:
    return _fallback_ready.get()


@contextlib.contextmanager
def attempt_with_fallback(ready: bool) -> Iterator[None]:
    token = _fallback_ready.set(ready)
    try:
        yield
    finally:
        _fallback_ready.reset(token)
