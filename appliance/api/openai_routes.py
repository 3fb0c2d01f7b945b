"""OpenAI-compatible endpoints under /v1. Thin: parse, prepare, admit, run, format."""

from __future__ import annotations

import base64
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import msgspec
from litestar import Request, Response, get, post
from litestar.params import FromPath, JSONBody
from litestar.response import Stream

from appliance.api.context import request_context
from appliance.api.errors import error_body, from_runtime
from appliance.api.responses import (
    ChatCompletion,
    Completion,
    EmbeddingList,
    Model,
    ModelList,
    errors,
)
from appliance.api.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from appliance.api.security import ANY_ROLE, roles
from appliance.api.services import ServicesDep
from appliance.auth import Principal, Role
from appliance.errors import ApplianceError, InvalidRequest
from appliance.governance import RequestContext
from appliance.guardrails import Gate, StreamJudge, gate_for, parse_tags
from appliance.inference import GenerationInput, Prepared, generation_failure, usage_dict
from runtime.engine import Finished, GenerationEvent, SamplingParams, TokenEvent

INFERENCE = roles(Role.USER, Role.OPERATOR)
GENERATION_ERRORS = errors(400, 404, 413, 503)
_encode = msgspec.json.encode
_DONE = b"data: [DONE]\n\n"
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
_STREAM_DESCRIPTION = (
    "The completion; with `stream: true`, `text/event-stream` chunks instead, ending in `data: [DONE]`, "
    "or in an error event in the OpenAI shape when the generation fails mid-way."
)

ChunkFn = Callable[[dict[str, Any], str, Any], dict[str, Any]]


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + _encode(obj) + b"\n\n"


def _admit(services: ServicesDep, ctx: RequestContext, principal: Principal, prepared: list[Prepared]) -> dict[str, str]:
    """Record the routing decision on the context and admit the request; returns headers."""
    first = prepared[0]
    ctx.model = first.model
    ctx.models_tried = [first.model]
    ctx.weights = first.engine.served_files
    admission = services.governance.admit(
        ctx,
        principal,
        first.model,
        sum(p.prompt_tokens for p in prepared),
        sum(p.request.max_tokens for p in prepared),
    )
    return {"x-appliance-model": first.model, "x-appliance-route": first.model} | admission.headers


def _refuse_unsupported(body: ChatCompletionRequest | CompletionRequest) -> None:
    if (body.n or 1) > 1:
        raise InvalidRequest("n > 1 is not supported; send separate requests", param="n")
    if body.logprobs:
        raise InvalidRequest("logprobs is not supported", param="logprobs")
    if body.logit_bias:
        raise InvalidRequest("logit_bias is not supported", param="logit_bias")


def _sampling(body: ChatCompletionRequest | CompletionRequest) -> SamplingParams:
    defaults = SamplingParams()
    return SamplingParams(
        temperature=defaults.temperature if body.temperature is None else body.temperature,
        top_p=defaults.top_p if body.top_p is None else body.top_p,
        seed=body.seed,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
    )


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    return tuple(s for s in stops if s)


def chat_input(body: ChatCompletionRequest) -> GenerationInput:
    _refuse_unsupported(body)
    if body.tools:
        raise InvalidRequest("tools are not supported by the local models", param="tools")
    if body.top_logprobs:
        raise InvalidRequest("top_logprobs is not supported", param="top_logprobs")
    fmt = body.response_format
    response_format: dict[str, Any] | None = None
    if fmt is not None and fmt.type != "text":
        response_format = {"type": fmt.type}
        if fmt.type == "json_schema":
            spec = fmt.json_schema
            response_format["schema"] = spec.schema if spec else None
    return GenerationInput(
        model=body.model,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        sampling=_sampling(body),
        stop=_stops(body.stop),
        messages=[{"role": m.role, "content": m.text()} for m in body.messages],
        response_format=response_format,
    )


def completion_input(body: CompletionRequest, prompt: str) -> GenerationInput:
    _refuse_unsupported(body)
    if body.echo or (body.best_of or 1) > 1 or body.suffix:
        raise InvalidRequest("echo, best_of and suffix are not supported", param="echo")
    return GenerationInput(
        model=body.model, max_tokens=body.max_tokens or 16, sampling=_sampling(body), stop=_stops(body.stop), prompt=prompt
    )


@post(
    "/v1/chat/completions",
    opt=INFERENCE,
    name="chat:create",
    status_code=200,
    responses=GENERATION_ERRORS,
    response_description=_STREAM_DESCRIPTION,
)
async def create_chat_completion(
    request: Request[Principal, Any, Any], data: JSONBody[ChatCompletionRequest], services: ServicesDep
) -> Response[ChatCompletion]:
    ctx = request_context(request.scope)
    ctx.user = data.user or None
    services.inference.resolve(request.user, data.model)  # an unknown model is a 404 before anything else
    spec = chat_input(data)
    ctx.prompt_text = "\n".join(f"{m['role']}: {m['content']}" for m in spec.messages or [])
    gate = _gate(request, services, ctx, "chat", data.model, stream=bool(data.stream), messages=spec.messages,
                 max_tokens=spec.max_tokens, json_mode=spec.response_format is not None)
    if gate is not None:
        await gate.prepare(ctx)
        spec = gate.chat_input(spec)
    prepared = await services.inference.prepare(request.user, spec)
    headers = _admit(services, ctx, request.user, [prepared])
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if data.stream:
        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        base = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": prepared.model}
        events, judge = await _guarded_stream(services, ctx, gate, prepared)
        body = _sse_stream(services, ctx, events, base, _chat_choice, include_usage, opening=_chat_opening, judge=judge)
        return Stream(body, media_type="text/event-stream", headers=headers | _SSE_HEADERS)  # type: ignore[return-value]
    text, finished = await services.inference.run(prepared)
    ctx.finished = finished
    if gate is not None:
        text = await gate.check(ctx, text, streaming=False, finish_reason=_finish(finished))
    payload = {
        "id": ident,
        "object": "chat.completion",
        "created": created,
        "model": prepared.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": _finish(finished),
            }
        ],
        "usage": usage_dict(finished),
    }
    return Response(_encode(payload), media_type="application/json", headers=headers)  # type: ignore[arg-type]


@post(
    "/v1/completions",
    opt=INFERENCE,
    name="completions:create",
    status_code=200,
    responses=GENERATION_ERRORS,
    response_description=_STREAM_DESCRIPTION,
)
async def create_completion(
    request: Request[Principal, Any, Any], data: JSONBody[CompletionRequest], services: ServicesDep
) -> Response[Completion]:
    ctx = request_context(request.scope)
    ctx.user = data.user or None
    services.inference.resolve(request.user, data.model)
    prompts = [data.prompt] if isinstance(data.prompt, str) else list(data.prompt)
    if data.stream and len(prompts) > 1:
        raise InvalidRequest("stream supports a single prompt", param="prompt")
    specs = [completion_input(data, p) for p in prompts]
    ctx.prompt_text = "\n".join(prompts)
    gate = _gate(request, services, ctx, "completion", data.model, stream=bool(data.stream), prompt=prompts,
                 max_tokens=specs[0].max_tokens)
    if gate is not None:
        await gate.prepare(ctx)
        specs = [replace(spec, prompt=p) for spec, p in zip(specs, gate.view.prompt or prompts, strict=True)]
    prepared_all = [await services.inference.prepare(request.user, spec) for spec in specs]
    headers = _admit(services, ctx, request.user, prepared_all)
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if data.stream:
        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        base = {"id": ident, "object": "text_completion", "created": created, "model": data.model}
        events, judge = await _guarded_stream(services, ctx, gate, prepared_all[0])
        body = _sse_stream(services, ctx, events, base, _completion_choice, include_usage, judge=judge)
        return Stream(body, media_type="text/event-stream", headers=headers | _SSE_HEADERS)  # type: ignore[return-value]
    choices, results = [], []
    for index, prepared in enumerate(prepared_all):
        text, finished = await services.inference.run(prepared)
        results.append(finished)
        ctx.finished = _combined(results)
        if gate is not None:
            text = await gate.check(ctx, text, streaming=False, finish_reason=_finish(finished))
        choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": _finish(finished)})
    assert ctx.finished is not None
    payload = {
        "id": ident,
        "object": "text_completion",
        "created": created,
        "model": data.model,
        "choices": choices,
        "usage": usage_dict(ctx.finished),
    }
    return Response(_encode(payload), media_type="application/json", headers=headers)  # type: ignore[arg-type]


@post("/v1/embeddings", opt=INFERENCE, name="embeddings:create", status_code=200, responses=GENERATION_ERRORS)
async def create_embeddings(
    request: Request[Principal, Any, Any], data: JSONBody[EmbeddingRequest], services: ServicesDep
) -> Response[EmbeddingList]:
    ctx = request_context(request.scope)
    ctx.user = data.user or None
    services.inference.resolve(request.user, data.model)
    texts = [data.input] if isinstance(data.input, str) else list(data.input)
    ctx.prompt_text = "\n".join(texts)
    if services.plugins.active("prepare_request"):
        gate = _gate(request, services, ctx, "embeddings", data.model, prompt=texts)
        if gate is not None:
            await gate.prepare(ctx)
            texts = gate.view.prompt or texts
    engine, prompt_tokens = await services.inference.prepare_embeddings(request.user, data.model, texts)
    ctx.model, ctx.models_tried, ctx.weights = data.model, [data.model], engine.served_files
    admission = services.governance.admit(ctx, request.user, data.model, prompt_tokens, 0)
    started = time.perf_counter()
    result = await engine.embed(texts)
    ctx.finished = Finished("stop", result.prompt_tokens, 0, compute_seconds=time.perf_counter() - started)
    items = [
        {"object": "embedding", "index": i, "embedding": _vector(v, data.encoding_format)}
        for i, v in enumerate(result.vectors)
    ]
    payload = {
        "object": "list",
        "data": items,
        "model": data.model,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }
    headers = {"x-appliance-model": data.model, "x-appliance-route": data.model} | admission.headers
    return Response(_encode(payload), media_type="application/json", headers=headers)  # type: ignore[arg-type]


@get("/v1/models", opt=ANY_ROLE, name="models:list", responses=errors())
async def list_models(request: Request[Principal, Any, Any], services: ServicesDep) -> ModelList:
    created = {m.name: int(m.added_at) for m in services.models.list()}
    return ModelList(
        object="list",
        data=[
            Model(id=name, object="model", created=created.get(name, 0), owned_by="appliance")
            for name in services.inference.visible_models(request.user)
        ],
    )


@get("/v1/models/{model_id:str}", opt=ANY_ROLE, name="models:get", responses=errors(404))
async def get_model(request: Request[Principal, Any, Any], model_id: FromPath[str], services: ServicesDep) -> Model:
    services.inference.resolve(request.user, model_id)
    record = services.models.find(model_id)
    return Model(id=model_id, object="model", created=int(record.added_at) if record else 0, owned_by="appliance")


ROUTES = [create_chat_completion, create_completion, create_embeddings, list_models, get_model]


def _gate(
    request: Request[Principal, Any, Any], services: ServicesDep, ctx: RequestContext, kind: Any, model: str, **fields: Any
) -> Gate | None:
    return gate_for(
        services.plugins,
        ctx,
        request.user,
        kind,
        model,
        tags=parse_tags(request.headers.get("x-appliance-tags")),
        keeps_text=services.governance.keeps_text(request.user),
        **fields,
    )


async def _guarded_stream(
    services: ServicesDep, ctx: RequestContext, gate: Gate | None, prepared: Prepared
) -> tuple[AsyncIterator[GenerationEvent], StreamJudge | None]:
    """The events to stream, and the guardrails reading along. Blocking guardrails hold the
    whole answer back: it is generated and judged before the response starts, so a rejection
    is still a plain 400 (and the routing layer may still fall back)."""
    held, along = gate.streaming_plan(ctx) if gate is not None else ([], [])
    if gate is None or not held:
        stream = await services.inference.open_stream(prepared)
        return stream, StreamJudge(gate, along) if gate is not None and along else None
    text, finished = await services.inference.run(prepared)
    ctx.finished = finished
    text = await gate.check(ctx, text, streaming=True, finish_reason=_finish(finished), only=held)
    return _replay(text, finished), None


async def _replay(text: str, finished: Finished) -> AsyncIterator[GenerationEvent]:
    """A held answer, sent as one piece."""
    yield TokenEvent(text)
    yield finished


def _finish(finished: Finished) -> str:
    return "length" if finished.reason == "length" else "stop"


def _combined(results: list[Finished]) -> Finished:
    return Finished(
        reason=results[-1].reason,
        prompt_tokens=sum(r.prompt_tokens for r in results),
        completion_tokens=sum(r.completion_tokens for r in results),
        cached_tokens=sum(r.cached_tokens for r in results),
        queue_seconds=sum(r.queue_seconds for r in results),
        compute_seconds=sum(r.compute_seconds for r in results),
        energy_joules=sum(r.energy_joules for r in results),
    )


def _vector(values: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
    return values


def _chat_opening(base: dict[str, Any]) -> dict[str, Any]:
    return base | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}


def _chat_choice(base: dict[str, Any], text: str, finish: str | None) -> dict[str, Any]:
    delta = {"content": text} if finish is None else {}
    return base | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _completion_choice(base: dict[str, Any], text: str, finish: str | None) -> dict[str, Any]:
    return base | {"choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


async def _sse_stream(
    services: ServicesDep,
    ctx: RequestContext,
    stream: AsyncIterator[GenerationEvent],
    base: dict[str, Any],
    choice: ChunkFn,
    include_usage: bool,
    *,
    opening: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    judge: StreamJudge | None = None,
) -> AsyncIterator[bytes]:
    """Server-sent events; the usage and audit records are committed before `[DONE]`. With a
    `judge`, a guardrail reading along may end the stream with an error event."""
    extra = {"usage": None} if include_usage else {}
    try:
        if opening is not None:
            yield _sse(opening(base) | extra)
        async for event in stream:
            if isinstance(event, TokenEvent):
                if event.text:
                    if judge is not None and await _judged(judge, ctx, event.text):
                        yield _stream_error(ctx, judge.failure)
                        break
                    ctx.streamed_tokens += 1
                    yield _sse(choice(base, event.text, None) | extra)
                continue
            ctx.finished = event
            if event.reason in ("error", "cancelled"):  # the stream already began: say so in-band, as OpenAI does
                yield _stream_error(ctx, from_runtime(generation_failure(event)))
            elif judge is not None and await _judged(judge, ctx, None, finish_reason=_finish(event)):
                yield _stream_error(ctx, judge.failure)
            else:
                yield _sse(choice(base, "", _finish(event)) | extra)
            if include_usage:
                yield _sse(base | {"choices": [], "usage": usage_dict(event)})
        await services.governance.complete(ctx, 200)
        yield _DONE
    finally:
        if judge is not None:
            judge.cancel()
        await stream.aclose()  # type: ignore[attr-defined]


async def _judged(judge: StreamJudge, ctx: RequestContext, text: str | None, *, finish_reason: str | None = None) -> bool:
    """Feed the judge (`text`, or the end); whether the stream must end here."""
    try:
        if text is not None:
            rejected = judge.feed(text) is not None
        else:
            rejected = await judge.finish(finish_reason) is not None
    except ApplianceError as exc:  # a guardrail that fails closed has failed
        judge.failure = exc
        rejected = True
    else:
        if rejected:
            judge.failure = judge.refusal()
    ctx.guardrails = judge.outcomes()
    return rejected


def _stream_error(ctx: RequestContext, failure: ApplianceError) -> bytes:
    ctx.error_code = failure.code
    return _sse(error_body(failure.message, failure.type, failure.code, failure.param))
