"""Running a plan: the first candidate that produces a first token serves the request.

Until the first token is sent, these move the request on to the next candidate, each noted
in the trail (`; fallback:<why>>next`): an open breaker, an engine error, overload, a prompt
too long for the candidate, a cold model the memory budget has no room for, no first token
before the deadline, and for a whole answer
nobody has seen yet (non-streaming, or held for a blocking guardrail) a failure mid-way or a
guardrail's "fallback" verdict. After the first token of a stream is sent, a failure can
only end the stream with an error event. Admission (rate limits, the budget reservation of
the worst case over every candidate) happens once, before the first attempt; the usage is
settled against the candidate that served.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace

from appliance.auth import Principal
from appliance.errors import ContextLengthExceeded, ModelDoesNotFit, ServiceUnavailable
from appliance.governance import Governance, RequestContext
from appliance.inference import GenerationInput, InferenceService, Prepared, generation_failure
from appliance.routing.attempt import attempt_with_fallback
from appliance.routing.breakers import Breaker, Breakers
from appliance.routing.router import Plan
from runtime.engine import Embeddings, Engine, Finished, GenerationEvent, TokenEvent
from runtime.errors import ContextOverflow, EngineOverloaded, EngineUnavailable, RuntimeFault

EngineFor = Callable[[str], Awaitable[Engine]]


class FirstTokenTimeout(EngineUnavailable):
    """The candidate produced no first token before the route's deadline."""


@dataclass(slots=True)
class Opened:
    """A generation whose first event has arrived, on the candidate at `index` of the plan."""

    index: int
    prepared: Prepared
    events: AsyncIterator[GenerationEvent]
    breaker: Breaker


class Dispatcher:
    def __init__(
        self,
        inference: InferenceService,
        governance: Governance,
        breakers: Breakers,
        engine_for: EngineFor,
        *,
        first_token_timeout: float = 30.0,
    ) -> None:
        self.inference = inference
        self.governance = governance
        self.breakers = breakers
        self._engine_for = engine_for
        self.first_token_timeout = first_token_timeout

    async def open(
        self, ctx: RequestContext, principal: Principal, spec: GenerationInput, plan: Plan, *, start: int = 0,
        note: str | None = None,
    ) -> Opened:
        """Start the generation on the first candidate from `start` that yields a first event.
        `note`: why the request comes back (for the trail: "fallback:error", "retry:<rule>").
        Raises the last candidate's error when none does (admission errors at once)."""
        if ctx.route_trail is None:
            ctx.route_trail = plan.trail
        if note is not None:
            ctx.route_trail += f"; {note}"
        last: BaseException | None = None
        timeout = (plan.route.spec.first_token_timeout_seconds if plan.route else None) or self.first_token_timeout
        for index in range(start, len(plan.candidates)):
            candidate = plan.candidates[index]
            last_one = index == len(plan.candidates) - 1
            breaker = self.breakers.get(candidate.name)
            # A model asked for by name has no alternative: its breaker is kept (shown under
            # /admin/models) but never refuses; a route's candidates are skipped while open.
            if not breaker.allow() and plan.route is not None:
                ctx.route_trail += f"; skip:breaker_open({candidate.name})"
                last = EngineUnavailable(f"the circuit breaker of {candidate.name} is open: {breaker.last_error}")
                continue
            ctx.route_trail += f">{candidate.name}"
            ctx.models_tried.append(candidate.name)
            with attempt_with_fallback(self._fallback_ready(plan, index)):
                why = await self._attempt(ctx, principal, spec, plan, index, breaker, None if last_one else timeout)
            if isinstance(why, Opened):
                return why
            why_name, last = why
            ctx.route_trail += f"; {'failed' if last_one else 'fallback'}:{why_name}"
        if last is None:
            raise ServiceUnavailable("No candidate of this route can serve the request now.")
        raise last

    def _fallback_ready(self, plan: Plan, index: int) -> bool:
        """Whether a later candidate would be tried now: one whose breaker is closed (an open
        one is skipped, a half-open one may already be probing)."""
        return any(self.breakers.get(c.name).state == "closed" for c in plan.candidates[index + 1:])

    async def _attempt(
        self, ctx: RequestContext, principal: Principal, spec: GenerationInput, plan: Plan, index: int,
        breaker: Breaker, timeout: float | None,
    ) -> Opened | tuple[str, BaseException]:
        """One candidate: the opened generation, or why it could not serve (and its error)."""
        candidate = plan.candidates[index]
        try:
            engine = await self._engine_for(candidate.name)
            prepared = await self.inference.prepare_on(engine, candidate.name, spec)
            limit = candidate.spec.max_prompt_tokens if candidate.spec else None
            if limit is not None and prepared.prompt_tokens > limit:
                raise ContextOverflow(
                    f"the prompt is {prepared.prompt_tokens} tokens; {candidate.name} takes at most {limit} on this route",
                    prompt_tokens=prepared.prompt_tokens, limit=limit,
                )
            if ctx.admission is None:
                self.governance.admit(
                    ctx, principal, candidate.name, prepared.prompt_tokens, prepared.request.max_tokens,
                    models=plan.names[index:],
                )
            events = await self._first(prepared, timeout)
        except (ContextOverflow, ContextLengthExceeded) as exc:  # too long for this one; the next may take it
            breaker.release()
            return "context", exc
        except ModelDoesNotFit as exc:  # a cold model the memory budget has no room for: not its fault
            breaker.release()
            return "no_room", exc
        except EngineOverloaded as exc:
            breaker.release()
            return "overloaded", exc
        except FirstTokenTimeout as exc:
            breaker.failure(str(exc))
            return "timeout", exc
        except EngineUnavailable as exc:
            breaker.failure(str(exc))
            return "error", exc
        except BaseException:
            breaker.release()
            raise
        self._served(ctx, candidate.name, prepared)
        if ctx.first_token_at is None:
            ctx.first_token_at = time.perf_counter()
        return Opened(index, prepared, events, breaker)

    async def complete(
        self, ctx: RequestContext, principal: Principal, spec: GenerationInput, plan: Plan, *, start: int = 0,
        note: str | None = None,
    ) -> tuple[Opened, str, Finished]:
        """The whole answer, falling back (nothing has been sent) on a failure mid-way."""
        opened = await self.open(ctx, principal, spec, plan, start=start, note=note)
        while True:
            text, finished = await self._collect(opened)
            if finished.reason not in ("error", "cancelled"):
                opened.breaker.success()
                return opened, text, finished
            if finished.reason == "cancelled":
                opened.breaker.release()
                raise generation_failure(finished)
            opened.breaker.failure(str(finished.error or "failed mid-generation"))
            if opened.index + 1 >= len(plan.candidates):
                raise generation_failure(finished)
            opened = await self.open(ctx, principal, spec, plan, start=opened.index + 1, note="fallback:error")

    async def embed(self, ctx: RequestContext, principal: Principal, texts: list[str], plan: Plan) -> Embeddings:
        """Embeddings from the first candidate that gives them."""
        ctx.route_trail = plan.trail
        last: BaseException | None = None
        for index, candidate in enumerate(plan.candidates):
            breaker = self.breakers.get(candidate.name)
            if not breaker.allow() and plan.route is not None:
                ctx.route_trail += f"; skip:breaker_open({candidate.name})"
                continue
            ctx.route_trail += f">{candidate.name}"
            ctx.models_tried.append(candidate.name)
            try:
                engine = await self._engine_for(candidate.name)
                prompt_tokens = await self.inference.count_embedding_tokens(engine, texts)
                if ctx.admission is None:
                    self.governance.admit(ctx, principal, candidate.name, prompt_tokens, 0, models=plan.names[index:])
                started = time.perf_counter()
                with attempt_with_fallback(self._fallback_ready(plan, index)):
                    result = await engine.embed(texts)
            except ContextLengthExceeded as exc:
                breaker.release()
                reason, last = "context", exc
            except ModelDoesNotFit as exc:
                breaker.release()
                reason, last = "no_room", exc
            except EngineOverloaded as exc:
                breaker.release()
                reason, last = "overloaded", exc
            except EngineUnavailable as exc:
                breaker.failure(str(exc))
                reason, last = "error", exc
            except BaseException:
                breaker.release()
                raise
            else:
                breaker.success()
                ctx.model, ctx.weights = candidate.name, engine.served_files
                if ctx.admission is not None:
                    ctx.admission.model = candidate.name
                ctx.finished = Finished("stop", result.prompt_tokens, 0, compute_seconds=time.perf_counter() - started)
                return result
            last_one = index == len(plan.candidates) - 1
            ctx.route_trail += f"; {'failed' if last_one else 'fallback'}:{reason}"
        if last is None:
            raise ServiceUnavailable("No candidate of this route can serve the request now.")
        raise last

    async def _collect(self, opened: Opened) -> tuple[str, Finished]:
        parts: list[str] = []
        try:
            async for event in opened.events:
                if isinstance(event, TokenEvent):
                    parts.append(event.text)
                else:
                    return "".join(parts), event
        except RuntimeFault as exc:  # raised mid-way rather than finished with an error: the same
            return "".join(parts), Finished("error", opened.prepared.prompt_tokens, len(parts), error=exc)
        finally:
            await opened.events.aclose()  # type: ignore[attr-defined]
        return "".join(parts), Finished("error", opened.prepared.prompt_tokens, len(parts),
                                        error=EngineUnavailable("the model ended the stream without finishing"))

    async def _first(self, prepared: Prepared, timeout: float | None) -> AsyncIterator[GenerationEvent]:
        """The stream, once its first event came (a first event that is a failure raises)."""
        stream = prepared.engine.generate(prepared.request)
        try:
            first = await asyncio.wait_for(anext(stream), timeout) if timeout else await anext(stream)
        except TimeoutError:
            await stream.aclose()  # type: ignore[attr-defined]
            raise FirstTokenTimeout(f"{prepared.model} produced no first token within {timeout:g}s") from None
        except BaseException:
            await stream.aclose()  # type: ignore[attr-defined]
            raise
        if isinstance(first, Finished) and first.reason in ("error", "cancelled"):
            await stream.aclose()  # type: ignore[attr-defined]
            raise generation_failure(first)
        return _prepend(first, stream)

    def _served(self, ctx: RequestContext, name: str, prepared: Prepared) -> None:
        ctx.model = name
        ctx.weights = prepared.engine.served_files
        if ctx.admission is not None:
            ctx.admission.model = name  # settled against the candidate that served

    def with_feedback(self, spec: GenerationInput, answer: str, feedback: str) -> GenerationInput:
        """The request again, with the rejected answer and a guardrail's feedback added."""
        if spec.messages is not None:
            messages = [*spec.messages, {"role": "assistant", "content": answer}, {"role": "user", "content": feedback}]
            return replace(spec, messages=messages)
        return replace(spec, prompt=f"{spec.prompt}{answer}\n\n{feedback}\n\n")


async def _prepend(first: GenerationEvent, rest: AsyncIterator[GenerationEvent]) -> AsyncIterator[GenerationEvent]:
    try:
        yield first
        async for event in rest:
            yield event
    finally:
        await rest.aclose()  # type: ignore[attr-defined]
