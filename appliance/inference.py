"""Turns an OpenAI-style request into a generation on the right engine: resolves and checks the
model, counts the prompt, sizes the completion, builds the sampling settings."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from appliance.api.schemas import ChatCompletionRequest, CompletionRequest
from appliance.auth import Principal
from appliance.engine_pool import EnginePool
from appliance.errors import ContextLengthExceeded, InvalidRequest, ModelNotFound
from runtime.engine import Engine, Finished, GenerationEvent, GenerationRequest, SamplingParams, TokenEvent
from runtime.errors import EngineUnavailable, RuntimeFault
from runtime.llama_engine import JSON_OBJECT_GRAMMAR, json_schema_to_grammar

_SYSTEM_ALIASES = {"developer": "system"}


@dataclass(frozen=True, slots=True)
class Prepared:
    """A generation ready to run, with what accounting needs to know up front."""

    model: str
    engine: Engine
    request: GenerationRequest
    prompt_tokens: int


class InferenceService:
    def __init__(self, pool: EnginePool) -> None:
        self.pool = pool

    def resolve(self, principal: Principal, model: str) -> Engine:
        """The engine for `model`, or `ModelNotFound` when it is unknown or not allowed to the key."""
        engine = self.pool.get(model)
        if engine is None or not principal.may_use(model):
            raise ModelNotFound(f"The model '{model}' does not exist or you do not have access to it.", param="model")
        return engine

    def visible_models(self, principal: Principal) -> list[str]:
        return [name for name in self.pool.names() if principal.may_use(name)]

    # -- preparing ------------------------------------------------------------------------------
    def prepare_chat(self, principal: Principal, body: ChatCompletionRequest) -> Prepared:
        _refuse_unsupported(body)
        if body.tools:
            raise InvalidRequest("tools are not supported by the local models", param="tools")
        if body.top_logprobs:
            raise InvalidRequest("top_logprobs is not supported", param="top_logprobs")
        engine = self.resolve(principal, body.model)
        messages = [
            {"role": _SYSTEM_ALIASES.get(m.role, m.role), "content": m.text()} for m in body.messages
        ]
        prompt_tokens = engine.count_chat_tokens(messages)
        max_tokens = _size_completion(engine, prompt_tokens, body.max_completion_tokens or body.max_tokens)
        sampling = _sampling(body, grammar=_grammar(body))
        request = GenerationRequest(max_tokens=max_tokens, messages=messages, sampling=sampling, stop=_stops(body.stop))
        return Prepared(body.model, engine, request, prompt_tokens)

    def prepare_completion(self, principal: Principal, body: CompletionRequest, prompt: str) -> Prepared:
        _refuse_unsupported(body)
        if body.echo or (body.best_of or 1) > 1 or body.suffix:
            raise InvalidRequest("echo, best_of and suffix are not supported", param="echo")
        engine = self.resolve(principal, body.model)
        prompt_tokens = len(engine.tokenize(prompt))
        max_tokens = _size_completion(engine, prompt_tokens, body.max_tokens or 16)
        request = GenerationRequest(max_tokens=max_tokens, prompt=prompt, sampling=_sampling(body), stop=_stops(body.stop))
        return Prepared(body.model, engine, request, prompt_tokens)

    # -- running --------------------------------------------------------------------------------
    async def open_stream(self, prepared: Prepared) -> AsyncIterator[GenerationEvent]:
        """Start the generation and wait for its first event, so that refusals (overload,
        overflow) surface as errors before any response is sent."""
        stream = prepared.engine.generate(prepared.request)
        try:
            first = await anext(stream)
        except BaseException:
            await stream.aclose()
            raise
        return _prepend(first, stream)

    async def run(self, prepared: Prepared) -> tuple[str, Finished]:
        parts: list[str] = []
        finished: Finished | None = None
        stream = await self.open_stream(prepared)
        try:
            async for event in stream:
                if isinstance(event, TokenEvent):
                    parts.append(event.text)
                else:
                    finished = event
        finally:
            await stream.aclose()
        assert finished is not None, "engine stream ended without Finished"
        if finished.reason == "error":  # nothing was sent yet: the whole answer is an error
            raise generation_failure(finished)
        return "".join(parts), finished

    def prepare_embeddings(self, principal: Principal, model: str, texts: list[str]) -> tuple[Engine, int]:
        """Check the inputs and count their tokens; returns the engine and the token total."""
        engine = self.resolve(principal, model)
        if any(not t for t in texts):
            raise InvalidRequest("input must not contain empty strings", param="input")
        total = 0
        for text in texts:
            n = len(engine.tokenize(text))
            if n > engine.context_length:
                raise ContextLengthExceeded(
                    f"An input is {n} tokens; this model embeds at most {engine.context_length}.", param="input"
                )
            total += n
        return engine, total


def generation_failure(finished: Finished) -> RuntimeFault:
    """The error behind a `Finished("error")`; engines that give none failed for their own reasons."""
    return finished.error or EngineUnavailable("the model failed mid-generation")


async def _prepend(first: GenerationEvent, rest: AsyncIterator[GenerationEvent]) -> AsyncIterator[GenerationEvent]:
    try:
        yield first
        async for event in rest:
            yield event
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


def _refuse_unsupported(body: ChatCompletionRequest | CompletionRequest) -> None:
    if (body.n or 1) > 1:
        raise InvalidRequest("n > 1 is not supported; send separate requests", param="n")
    if body.logprobs:
        raise InvalidRequest("logprobs is not supported", param="logprobs")
    if body.logit_bias:
        raise InvalidRequest("logit_bias is not supported", param="logit_bias")


def _size_completion(engine: Engine, prompt_tokens: int, requested: int | None) -> int:
    limit = engine.context_length
    if requested is None:
        if prompt_tokens >= limit:
            raise _overflow(limit, prompt_tokens, 0)
        return limit - prompt_tokens
    if prompt_tokens + requested > limit:
        raise _overflow(limit, prompt_tokens, requested)
    return requested


def _overflow(limit: int, prompt: int, completion: int) -> ContextLengthExceeded:
    return ContextLengthExceeded(
        f"This model's maximum context length is {limit} tokens. However, you requested "
        f"{prompt + completion} tokens ({prompt} in the messages, {completion} in the completion). "
        "Please reduce the length of the messages or completion.",
        param="messages",
    )


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    return tuple(s for s in stops if s)


def _sampling(body: ChatCompletionRequest | CompletionRequest, *, grammar: str | None = None) -> SamplingParams:
    defaults = SamplingParams()
    return SamplingParams(
        temperature=defaults.temperature if body.temperature is None else body.temperature,
        top_p=defaults.top_p if body.top_p is None else body.top_p,
        seed=body.seed,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        grammar=grammar,
    )


def _grammar(body: ChatCompletionRequest) -> str | None:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return JSON_OBJECT_GRAMMAR
    spec = fmt.json_schema
    if not spec or not isinstance(spec.schema, dict):
        raise InvalidRequest("response_format json_schema needs json_schema.schema", param="response_format")
    try:
        return json_schema_to_grammar(spec.schema)
    except Exception as exc:  # the converter raises assorted types on schemas it cannot express
        raise InvalidRequest(
            f"response_format json_schema cannot be enforced: {exc}", param="response_format"
        ) from None


def usage_dict(finished: Finished) -> dict[str, Any]:
    return {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "total_tokens": finished.prompt_tokens + finished.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": finished.cached_tokens},
    }
