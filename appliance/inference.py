"""Turns a chat or completion into a generation on the right engine: resolves and checks the
model, renders and counts the prompt once, sizes the completion, compiles the response
format. The slow parts (the chat template and tokeniser over a long prompt, the JSON schema
to grammar conversion) run in a worker thread, never on the event loop."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from appliance.engine_pool import EnginePool
from appliance.errors import ContextLengthExceeded, InvalidRequest
from appliance.work import INLINE_CHARS, WorkPool
from runtime.engine import (
    Engine,
    Finished,
    GenerationRequest,
    SamplingParams,
    fit_completion,
)
from runtime.errors import EngineUnavailable, RuntimeFault
from runtime.llama_engine import JSON_OBJECT_GRAMMAR, json_schema_to_grammar

_SYSTEM_ALIASES = {"developer": "system"}


@dataclass(frozen=True, slots=True)
class GenerationInput:
    """What a chat or completion request asks for, in the API's terms. Exactly one of
    `messages` (role and content strings) and `prompt` is set. `response_format` is None,
    `{"type": "json_object"}` or `{"type": "json_schema", "schema": {...}}`."""

    model: str
    max_tokens: int | None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    response_format: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Prepared:
    """A generation ready to run, with what accounting needs to know up front."""

    model: str
    engine: Engine
    request: GenerationRequest
    prompt_tokens: int


class InferenceService:
    def __init__(self, pool: EnginePool, *, default_max_tokens: int = 512, work: WorkPool | None = None) -> None:
        self.pool = pool
        self.default_max_tokens = default_max_tokens
        self._work = work or WorkPool(2)

    async def prepare_on(self, engine: Engine, name: str, spec: GenerationInput) -> Prepared:
        """Render, count and size the request for `engine` (a routing candidate, `name`)."""
        spec = replace(spec, model=name)
        # A JSON schema's grammar can take long to build whatever its size: always off the loop.
        chars = len(spec.prompt or "") + sum(len(m["content"]) for m in spec.messages or [])
        if spec.response_format is not None and spec.response_format.get("type") == "json_schema" and not getattr(engine, "remote", False):
            chars = INLINE_CHARS
        return await self._work.run_for(chars, self._prepare, engine, spec)

    def _prepare(self, engine: Engine, spec: GenerationInput) -> Prepared:
        messages = None
        if spec.messages is not None:
            messages = [{"role": _SYSTEM_ALIASES.get(m["role"], m["role"]), "content": m["content"]} for m in spec.messages]
        # A remote engine enforces response_format itself; only local ones need the grammar.
        remote = getattr(engine, "remote", False)
        sampling = replace(spec.sampling, grammar=None if remote else _grammar(spec.response_format))
        draft = GenerationRequest(
            max_tokens=1, prompt=spec.prompt, messages=messages, sampling=sampling, stop=spec.stop,
            response_format=spec.response_format,
        )
        tokens = engine.tokens_for(draft)
        max_tokens = fit_completion(len(tokens), spec.max_tokens, engine.context_length, default=self.default_max_tokens)
        request = replace(draft, max_tokens=max_tokens, tokens=tuple(tokens))
        return Prepared(spec.model, engine, request, len(tokens))

    async def count_embedding_tokens(self, engine: Engine, texts: list[str]) -> int:
        """The inputs' tokens on `engine`; `InvalidRequest` for an empty input,
        `ContextLengthExceeded` for one longer than the engine embeds."""
        if any(not t for t in texts):
            raise InvalidRequest("input must not contain empty strings", param="input")
        counts = await self._work.run_for(sum(map(len, texts)), lambda: [len(engine.tokenize(t)) for t in texts])
        longest = max(counts)
        if longest > engine.context_length:
            raise ContextLengthExceeded(
                f"An input is {longest} tokens; this model embeds at most {engine.context_length}.", param="input"
            )
        return sum(counts)


def generation_failure(finished: Finished) -> RuntimeFault:
    """The error behind a `Finished("error")` or `Finished("cancelled")`."""
    if finished.reason == "cancelled":
        return EngineUnavailable("the generation was cancelled: the server is shutting down")
    return finished.error or EngineUnavailable("the model failed mid-generation")


def _grammar(response_format: dict[str, Any] | None) -> str | None:
    if response_format is None or response_format.get("type") == "text":
        return None
    if response_format["type"] == "json_object":
        return JSON_OBJECT_GRAMMAR
    schema = response_format.get("schema")
    if not isinstance(schema, dict):
        raise InvalidRequest("response_format json_schema needs json_schema.schema", param="response_format")
    try:
        return json_schema_to_grammar(schema)
    except Exception as exc:  # the converter raises assorted types on schemas it cannot express
        raise InvalidRequest(f"response_format json_schema cannot be enforced: {exc}", param="response_format") from None


def usage_dict(finished: Finished) -> dict[str, Any]:
    return {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "total_tokens": finished.prompt_tokens + finished.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": finished.cached_tokens},
    }
