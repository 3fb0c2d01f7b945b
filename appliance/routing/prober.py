"""The health prober: a half-open breaker of a local model is tested by a free canary (a
couple of tokens, billed to no one and in no usage record) instead of by a user's request,
so a recovered model closes its breaker without anyone paying for the test.

Upstream models are left to real traffic: a canary there would spend tokens the upstream
bills, and the first request after the cooldown is the probe anyway.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing

from appliance.model_pool import ModelPool
from appliance.routing.breakers import Breaker, Breakers
from appliance.routing.catalog import Catalog
from runtime.engine import Engine, Finished, GenerationRequest, SamplingParams
from runtime.errors import EngineOverloaded, RuntimeFault

log = logging.getLogger(__name__)

CANARY = GenerationRequest(max_tokens=2, prompt="ping", sampling=SamplingParams(temperature=0.0), request_id="canary")


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
            async with aclosing(engine.generate(CANARY)) as events:  # type: ignore[type-var]
                async with asyncio.timeout(self.timeout):
                    async for event in events:
                        if isinstance(event, Finished):
                            if event.reason == "error":
                                raise event.error or RuntimeFault("the canary failed")
                            break
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
