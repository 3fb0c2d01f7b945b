"""The `canary` job: a free generation of a few tokens on every loaded model, its time to
first token and decode rate held against the model's own rolling baseline, and the recovery
of a model that keeps failing it (`recovery.py`).

A canary goes straight to the engine (`pool.peek` and `run_canary`, the health prober's own
code): it is not a use of the model, is billed to no one, and leaves no usage or audit
record. It runs at temperature 0 for at most 4 tokens. A model that is not loaded is not
loaded for it.

Options (`[check.canary]`): `generation_timeout_seconds` (30), `ttft_factor` (3.0),
`tps_factor` (3.0), `min_samples` (5), `ewma_alpha` (0.2), `ttft_floor_ms` (250: a first
token sooner than that never warns, however small the baseline), and recovery's
`failures_before_reload` (3), `reload_backoff_seconds` (600), `max_reload_backoff_seconds`
(86400), `reload_timeout_seconds` (600).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from appliance.checks.findings import Finding, fail, ok, warn
from appliance.checks.health import recovery
from appliance.checks.registry import CheckContext, CheckJob
from appliance.model_pool import ModelPool
from appliance.routing.prober import CanaryResult, run_canary
from runtime.engine import GenerationRequest, SamplingParams
from runtime.errors import EngineOverloaded

__all__ = ["NAME", "REQUEST", "canary_job", "run"]

NAME = "canary"
REQUEST = GenerationRequest(
    max_tokens=4, prompt="Count: 1, 2, 3,", sampling=SamplingParams(temperature=0.0), request_id="health-canary"
)


class NotResident(Exception):
    """The model was unloaded between the listing and its canary."""


@dataclass(frozen=True, slots=True)
class Options:
    timeout: float
    ttft_factor: float
    ttft_floor: float
    tps_factor: float
    min_samples: int
    alpha: float
    recovery: recovery.Options

    @classmethod
    def of(cls, ctx: CheckContext) -> Options:
        return cls(
            timeout=ctx.option(NAME, "generation_timeout_seconds", 30.0),
            ttft_factor=ctx.option(NAME, "ttft_factor", 3.0),
            ttft_floor=ctx.option(NAME, "ttft_floor_ms", 250.0) / 1000.0,
            tps_factor=ctx.option(NAME, "tps_factor", 3.0),
            min_samples=ctx.option(NAME, "min_samples", 5),
            alpha=min(1.0, max(0.0, ctx.option(NAME, "ewma_alpha", 0.2))),
            recovery=recovery.Options.of(ctx, NAME),
        )


def canary_job(ctx: CheckContext) -> CheckJob:
    return CheckJob(
        NAME,
        lambda: run(ctx),
        300.0,
        description="a free 4-token generation per loaded model: time to first token and tokens/s against its "
        "baseline; a model failing it repeatedly is reloaded",
        timeout_seconds=900.0,
    )


def run(ctx: CheckContext) -> list[Finding]:
    opts = Options.of(ctx)
    pool = ctx.services.pool
    resident = ctx.on_loop(_resident(pool), 10.0)
    findings = [_loaded(ctx, name, opts) for name in resident]
    for model in ctx.services.models.list():
        if model.name not in resident:
            findings.append(_absent(ctx, model.name, opts))
    return findings or [ok("no local model", "")]


def probe(ctx: CheckContext, name: str, timeout: float) -> CanaryResult:
    """One canary on `name`'s engine, run on the server's loop. Raises `NotResident`,
    `EngineOverloaded`, `RuntimeFault` or `TimeoutError`."""
    return ctx.on_loop(_canary(ctx.services.pool, name, timeout), timeout + 10.0)


async def _resident(pool: ModelPool) -> list[str]:
    return sorted(name for name in pool.names() if not pool.loading(name))


async def _canary(pool: ModelPool, name: str, timeout: float) -> CanaryResult:
    engine = pool.peek(name)
    if engine is None:
        raise NotResident(name)
    return await run_canary(engine, REQUEST, timeout=timeout)


def _loaded(ctx: CheckContext, name: str, opts: Options) -> Finding:
    state = ctx.state.get(NAME, name) or {}
    try:
        result = probe(ctx, name, opts.timeout)
    except EngineOverloaded:
        return ok("busy (its queue is full): not probed this time", name)
    except NotResident:
        return ok("not loaded, skipped", name)
    except Exception as exc:  # noqa: BLE001 - RuntimeFault, TimeoutError, or a bug in the engine: all a failed canary
        finding, state = recovery.after_failure(
            ctx, name, state, describe(exc, opts.timeout), opts.recovery, lambda: probe(ctx, name, opts.timeout)
        )
        ctx.state.put(NAME, name, state)
        return finding
    finding = judge(name, result, state, opts)
    ctx.state.put(NAME, name, recovery.after_success(fold(state, result, opts)))
    return finding


def _absent(ctx: CheckContext, name: str, opts: Options) -> Finding:
    state = ctx.state.get(NAME, name) or {}
    if state.get("reload_pending"):
        finding, state = recovery.retry_pending(ctx, name, state, opts.recovery, lambda: probe(ctx, name, opts.timeout))
        ctx.state.put(NAME, name, state)
        return finding
    failure = ctx.services.pool.failures.get(name)
    if failure:
        return fail(f"not loaded: its last load failed: {failure}", name)
    return ok("not loaded, skipped", name)


def describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    return str(exc) or type(exc).__name__


def judge(name: str, result: CanaryResult, state: dict[str, Any], opts: Options) -> Finding:
    """ok, or warn when the run is much slower than the baseline (once it has `min_samples`)."""
    ttft, tps = result.ttft_seconds, result.tokens_per_second
    base_ttft, base_tps, samples = state.get("ttft_ewma"), state.get("tps_ewma"), int(state.get("samples", 0))
    details = {
        "ttft_ms": _ms(ttft),
        "tokens_per_second": _round(tps),
        "tokens": result.tokens,
        "baseline_ttft_ms": _ms(base_ttft),
        "baseline_tokens_per_second": _round(base_tps),
        "samples": samples,
    }
    slow = []
    if samples >= opts.min_samples:
        if ttft is not None and base_ttft and ttft > max(opts.ttft_factor * base_ttft, opts.ttft_floor):
            slow.append(
                f"time to first token {ttft * 1000:.0f} ms is over {opts.ttft_factor:g}x its baseline "
                f"{base_ttft * 1000:.0f} ms"
            )
        if tps is not None and base_tps and tps < base_tps / opts.tps_factor:
            slow.append(f"{tps:.1f} tokens/s is under 1/{opts.tps_factor:g} of its baseline {base_tps:.1f}")
    if slow:
        return warn("; ".join(slow), name, **details)
    if ttft is None:
        return ok("answered (no token: the model stopped at once)", name, **details)
    rate = f", {tps:.1f} tokens/s" if tps is not None else ""
    return ok(f"answered: first token in {ttft * 1000:.0f} ms{rate}", name, **details)


def fold(state: dict[str, Any], result: CanaryResult, opts: Options) -> dict[str, Any]:
    """The baseline with this run in: a plain mean over the first `min_samples` runs (so a
    cold first run weighs no more than the others), an EWMA after."""
    samples = int(state.get("samples", 0))
    weight = max(opts.alpha, 1.0 / (samples + 1))

    def ewma(old: float | None, new: float | None) -> float | None:
        if new is None:
            return old
        return new if old is None else old + weight * (new - old)

    return state | {
        "ttft_ewma": ewma(state.get("ttft_ewma"), result.ttft_seconds),
        "tps_ewma": ewma(state.get("tps_ewma"), result.tokens_per_second),
        "samples": samples + 1,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
