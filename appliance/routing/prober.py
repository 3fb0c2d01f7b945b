"""The health prober: a half-open breaker of a local model is tested by a free canary (a
couple of tokens, billed to no one and in no usage record) instead of by a user's request,
so a recovered model closes its breaker without anyone paying for the test.

Upstream models are left to real traffic: a canary there would spend tokens the upstream
bills, and the first request after the cooldown is the probe anyway.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass

from appliance.model_pool import ModelPool
from appliance.routing.breakers import Breaker, Breakers
from appliance.routing.catalog import Catalog
from runtime.engine import Engine, Finished, GenerationRequest, SamplingParams, TokenEvent
from runtime.errors import EngineOverloaded, RuntimeFault

log = logging.getLogger(__name__)

CANARY = GenerationRequest(max_tokens=2, prompt="ping", sampling=SamplingParams(temperature=0.0), request_id="canary")


@dataclass(frozen=True, slots=True)
class CanaryResult:
    """What one canary took: seconds to its first token, in all, and the tokens it got."""

    tokens: int
    ttft_seconds: float | None  # None: no token came (the model stopped at once)
    seconds: float

    @property
    def tokens_per_second(self) -> float | None:
        """The decode rate after the first token (the prompt's prefill is in the TTFT)."""
        if self.ttft_seconds is None or self.tokens < 2 or self.seconds <= self.ttft_seconds:
            return None
        return (self.tokens - 1) / (self.seconds - self.ttft_seconds)


async def run_canary(engine: Engine, request: GenerationRequest = CANARY, *, timeout: float) -> CanaryResult:
    """One free generation straight on `engine`: no governance, so no usage, cost or audit
    record, and (the caller getting `engine` by `pool.peek`) no use of the model. Raises
    `EngineOverloaded` (busy), `RuntimeFault` (it failed) or `TimeoutError`."""
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    async with aclosing(engine.generate(request)) as events:  # type: ignore[type-var]
        async with asyncio.timeout(timeout):
            async for event in events:
                if isinstance(event, TokenEvent):
                    tokens += 1
                    if first is None:
                        first = time.perf_counter() - started
                elif isinstance(event, Finished):
                    if event.reason == "error":
                        raise event.error or RuntimeFault("the canary failed")
                    break
    return CanaryResult(tokens, first, time.perf_counter() - started)


class CanaryProber:
    def __init__(self, breakers: Breakers, catalog: Catalog, *, interval_seconds: float, timeout_seconds: float = 30.0) -> None:
        self.breakers = breakers
        self.catalog = catalog
        self.interval = interval_seconds
        self.timeout = timeout_seconds
        self.canaries = 0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.probe_once()
            except Exception:  # a bug here must not stop the next round
                log.exception("health prober round failed")

    async def probe_once(self) -> dict[str, str]:
        """Probe every half-open breaker of a resident local model; their outcomes."""
        out: dict[str, str] = {}
        for breaker in self.breakers.half_open():
            pool = self.catalog.pool
            # A canary is not a use: it must not keep an idle model from being unloaded.
            engine = pool.peek(breaker.name) if isinstance(pool, ModelPool) else pool.get(breaker.name)
            if engine is None or self.catalog.is_remote(breaker.name) or not breaker.allow():
                continue  # not loaded (a canary must not load it), remote, or a request is the probe
            out[breaker.name] = await self._probe(breaker, engine)
        return out

    async def _probe(self, breaker: Breaker, engine: Engine) -> str:
        self.canaries += 1
        try:
            await run_canary(engine, CANARY, timeout=self.timeout)
        except EngineOverloaded:
            breaker.release()  # busy is not broken: the next round tries again
            return "busy"
        except (RuntimeFault, TimeoutError) as exc:
            breaker.failure(f"health probe: {exc or 'no answer in time'}")
            log.warning("health probe of %s failed: %s", breaker.name, exc)
            return "failed"
        breaker.success()
        log.info("health probe of %s succeeded: its breaker is closed", breaker.name)
        return "ok"
