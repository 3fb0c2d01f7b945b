"""Auto-recovery of a local model that fails its canary `failures_before_reload` times in a
row: its circuit breaker is opened (requests fall through to other candidates), the pool
unloads and loads it again, audited as the pool's own actions (system records), and it is
probed once more; a pass closes the breaker. Requests still running on the failing engine
are cut off by its unload (it is failing them anyway); a pinned model is reloaded too.

Never in a tight loop: after a reload the next one waits `reload_backoff_seconds`, doubled
for every reload in a row that did not bring the model back (at most
`max_reload_backoff_seconds`). The counts and times live in the model's `CheckState`, so a
restart does not reset them. An engine the pool did not load (a stand-in) is not reloaded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from appliance.checks.findings import Finding, fail, warn
from appliance.checks.registry import CheckContext
from appliance.model_pool import ModelPool
from appliance.routing.prober import CanaryResult

__all__ = ["Options", "after_failure", "after_success", "retry_pending"]

log = logging.getLogger(__name__)
CHECK = "canary"  # whose state this is


@dataclass(frozen=True, slots=True)
class Options:
    failures_before_reload: int
    backoff_seconds: float
    max_backoff_seconds: float
    reload_timeout: float

    @classmethod
    def of(cls, ctx: CheckContext, check: str) -> Options:
        return cls(
            failures_before_reload=max(1, ctx.option(check, "failures_before_reload", 3)),
            backoff_seconds=max(0.0, ctx.option(check, "reload_backoff_seconds", 600.0)),
            max_backoff_seconds=ctx.option(check, "max_reload_backoff_seconds", 86400.0),
            reload_timeout=ctx.option(check, "reload_timeout_seconds", 600.0),
        )


Probe = Callable[[], CanaryResult]


def after_success(state: dict[str, Any]) -> dict[str, Any]:
    """A passed canary: the failure streaks end (the time of the last reload is kept)."""
    return state | {"failures": 0, "failed_reloads": 0, "reload_pending": False, "last_error": None}


def after_failure(
    ctx: CheckContext, name: str, state: dict[str, Any], error: str, opts: Options, probe: Probe
) -> tuple[Finding, dict[str, Any]]:
    """A failed canary of a loaded model: counted; at the limit, the breaker is opened and the
    model reloaded and probed again, unless the backoff since the last reload holds it."""
    failures = int(state.get("failures", 0)) + 1
    state = state | {"failures": failures, "last_error": error}
    said = f"canary failed ({failures} in a row): {error}"
    if failures < opts.failures_before_reload:
        return fail(said, name, failures=failures), state
    ctx.services.breakers.get(name).trip(f"health canary failed {failures} times in a row: {error}")
    said += "; its circuit breaker is open"
    if not reloadable(ctx.services.pool, ctx, name):
        return fail(f"{said}; it cannot be reloaded (the pool did not load it)", name, failures=failures), state
    due = float(state.get("next_reload_at", 0.0))
    if time.time() < due:
        return fail(
            f"{said}; reloaded at {_iso(state.get('last_reload_at'))}, so not again before {_iso(due)}",
            name,
            failures=failures,
            next_reload_at=due,
        ), state
    return reload_and_probe(ctx, name, state, opts, probe, said)


def retry_pending(
    ctx: CheckContext, name: str, state: dict[str, Any], opts: Options, probe: Probe
) -> tuple[Finding, dict[str, Any]]:
    """A model this job unloaded and could not load again: another try once the backoff allows."""
    said = f"not loaded: its reload after failed canaries did not succeed ({state.get('last_error')})"
    due = float(state.get("next_reload_at", 0.0))
    if time.time() < due:
        return fail(f"{said}; next attempt not before {_iso(due)}", name, next_reload_at=due), state
    return reload_and_probe(ctx, name, state, opts, probe, said)


def reload_and_probe(
    ctx: CheckContext, name: str, state: dict[str, Any], opts: Options, probe: Probe, said: str
) -> tuple[Finding, dict[str, Any]]:
    now = time.time()
    wait = min(opts.max_backoff_seconds, opts.backoff_seconds * 2 ** int(state.get("failed_reloads", 0)))
    reloads = int(state.get("reloads", 0)) + 1
    state = state | {"reloads": reloads, "last_reload_at": now, "next_reload_at": now + wait, "backoff_seconds": wait}
    ctx.state.put(CHECK, name, state | {"reload_pending": True})  # a crash mid-reload must not bring a loop
    reason = f"reloaded after {state.get('failures', 0)} failed health canaries"
    details = {"reloads": reloads, "backoff_seconds": wait, "next_reload_at": now + wait}
    try:
        ctx.on_loop(ctx.services.pool.reload(name, reason=reason), opts.reload_timeout)
    except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
        log.error("health check: reloading %s failed: %s", name, exc)
        state = state | {
            "failed_reloads": int(state.get("failed_reloads", 0)) + 1,
            "reload_pending": True,
            "last_error": f"reload failed: {_text(exc)}",
        }
        return fail(
            f"{said}; the reload failed: {_text(exc)}; next attempt not before {_iso(now + wait)}", name, **details
        ), state
    state = state | {"reload_pending": False}
    try:
        result = probe()
    except Exception as exc:  # noqa: BLE001
        state = state | {"failed_reloads": int(state.get("failed_reloads", 0)) + 1, "last_error": _text(exc)}
        return fail(
            f"{said}; reloaded, but the canary still fails ({_text(exc)}); next reload not before {_iso(now + wait)}",
            name,
            **details,
        ), state
    ctx.services.breakers.get(name).success()
    log.warning("health check: model %s answers again after its reload", name)
    ttft = f" (first token in {result.ttft_seconds * 1000:.0f} ms)" if result.ttft_seconds is not None else ""
    return warn(f"recovered: {said}; reloaded, and the canary passes again{ttft}", name, **details), after_success(
        state
    )


def reloadable(pool: ModelPool, ctx: CheckContext, name: str) -> bool:
    return pool.on_demand and ctx.services.models.find(name) is not None


def _text(exc: BaseException) -> str:
    message = getattr(exc, "message", None)
    return str(message or exc) or type(exc).__name__


def _iso(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "never"
    return datetime.fromtimestamp(float(ts), UTC).isoformat(timespec="seconds")
