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
from appliance.errors import ApplianceError, InvalidRequest, ModelNotFound
from appliance.governance import RequestContext
from appliance.guardrails import Gate, StreamJudge, gate_for, parse_tags, principal_view
from appliance.hookspecs import Candidate
from appliance.inference import GenerationInput, generation_failure, usage_dict
from appliance.routing.breakers import Breaker
from appliance.routing.router import Need, Plan
from runtime.engine import Finished, GenerationEvent, SamplingParams, TokenEvent
from runtime.errors import RuntimeFault

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


def _headers(ctx: RequestContext) -> dict[str, str]:
    """What served the request and why (the decision trail), and the rate-limit headers."""
    headers = {"x-appliance-model": ctx.model or "", "x-appliance-route": ctx.route_trail or ctx.model or ""}
    return headers | (ctx.admission.headers if ctx.admission is not None else {})


def _need(request: Request[Principal, Any, Any], kind: str, texts: list[str], max_tokens: int | None, json_mode: bool) -> Need:
    text = "\n".join(texts)
    return Need(
        kind=kind, json_mode=json_mode, tags=parse_tags(request.headers.get("x-appliance-tags")), text=text,
        max_tokens=max_tokens, prompt_tokens_estimate=len(text) // 4,
    )


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
    json_mode = data.response_format is not None and data.response_format.type != "text"
    need = _need(request, "chat", [m.text() for m in data.messages], data.max_completion_tokens or data.max_tokens, json_mode)
    plan = services.router.plan(request.user, data.model, need)  # an unknown model is a 404 before anything else
    spec = chat_input(data)
    ctx.prompt_text = "\n".join(f"{m['role']}: {m['content']}" for m in spec.messages or [])
    gate = _gate(request, services, ctx, "chat", data.model, stream=bool(data.stream), messages=spec.messages,
                 max_tokens=spec.max_tokens, json_mode=spec.response_format is not None)
    if gate is not None:
        await gate.prepare(ctx)
        spec = gate.chat_input(spec)
    plan = await choose_route(services, plan, gate, request.user)
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    ctx.kind, ctx.response_id = "chat", ident
    if data.stream:
        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        events, judge, breaker = await _guarded_stream(services, ctx, request.user, gate, spec, plan)
        base = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": ctx.model}
        body = _sse_stream(services, ctx, events, base, _chat_choice, include_usage, opening=_chat_opening, judge=judge,
                           breaker=breaker)
        return Stream(body, media_type="text/event-stream", headers=_headers(ctx) | _SSE_HEADERS)  # type: ignore[return-value]
    text, finished = await answer(services, ctx, request.user, gate, spec, plan, streaming=False)
    ctx.answer_text = text
    payload = {
        "id": ident,
        "object": "chat.completion",
        "created": created,
        "model": ctx.model,
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
    return Response(_encode(payload), media_type="application/json", headers=_headers(ctx))  # type: ignore[arg-type]


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
    prompts = [data.prompt] if isinstance(data.prompt, str) else list(data.prompt)
    plan = services.router.plan(request.user, data.model, _need(request, "completion", prompts, data.max_tokens, False))
    if data.stream and len(prompts) > 1:
        raise InvalidRequest("stream supports a single prompt", param="prompt")
    specs = [completion_input(data, p) for p in prompts]
    ctx.prompt_text = "\n".join(prompts)
    gate = _gate(request, services, ctx, "completion", data.model, stream=bool(data.stream), prompt=prompts,
                 max_tokens=specs[0].max_tokens)
    if gate is not None:
        await gate.prepare(ctx)
        specs = [replace(spec, prompt=p) for spec, p in zip(specs, gate.view.prompt or prompts, strict=True)]
    plan = await choose_route(services, plan, gate, request.user)
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    ctx.kind, ctx.response_id = "completion", ident
    if data.stream:
        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        events, judge, breaker = await _guarded_stream(services, ctx, request.user, gate, specs[0], plan)
        base = {"id": ident, "object": "text_completion", "created": created, "model": ctx.model}
        body = _sse_stream(services, ctx, events, base, _completion_choice, include_usage, judge=judge, breaker=breaker)
        return Stream(body, media_type="text/event-stream", headers=_headers(ctx) | _SSE_HEADERS)  # type: ignore[return-value]
    if len(specs) > 1:
        await _admit_all(services, ctx, request.user, specs, plan)
    choices, results = [], []
    for index, spec in enumerate(specs):
        text, finished = await answer(services, ctx, request.user, gate, spec, plan, streaming=False)
        results.append(finished)
        choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": _finish(finished)})
    ctx.finished = _combined(results)
    ctx.answer_text = "\n".join(c["text"] for c in choices)
    payload = {
        "id": ident,
        "object": "text_completion",
        "created": created,
        "model": ctx.model,
        "choices": choices,
        "usage": usage_dict(ctx.finished),
    }
    return Response(_encode(payload), media_type="application/json", headers=_headers(ctx))  # type: ignore[arg-type]


@post("/v1/embeddings", opt=INFERENCE, name="embeddings:create", status_code=200, responses=GENERATION_ERRORS)
async def create_embeddings(
    request: Request[Principal, Any, Any], data: JSONBody[EmbeddingRequest], services: ServicesDep
) -> Response[EmbeddingList]:
    ctx = request_context(request.scope)
    ctx.user = data.user or None
    ctx.kind = "embeddings"
    texts = [data.input] if isinstance(data.input, str) else list(data.input)
    plan = services.router.plan(request.user, data.model, _need(request, "embeddings", texts, None, False))
    ctx.prompt_text = "\n".join(texts)
    if services.plugins.active("prepare_request"):
        gate = _gate(request, services, ctx, "embeddings", data.model, prompt=texts)
        if gate is not None:
            await gate.prepare(ctx)
            texts = gate.view.prompt or texts
    result = await services.dispatcher.embed(ctx, request.user, texts, plan)
    items = [
        {"object": "embedding", "index": i, "embedding": _vector(v, data.encoding_format)}
        for i, v in enumerate(result.vectors)
    ]
    payload = {
        "object": "list",
        "data": items,
        "model": ctx.model,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }
    return Response(_encode(payload), media_type="application/json", headers=_headers(ctx))  # type: ignore[arg-type]


@get("/v1/models", opt=ANY_ROLE, name="models:list", responses=errors())
async def list_models(request: Request[Principal, Any, Any], services: ServicesDep) -> ModelList:
    """The models and the routes this key may use (a route's `owned_by` is "route")."""
    created = {m.name: int(m.added_at) for m in services.models.list()}
    models = [
        Model(id=name, object="model", created=created.get(name, 0), owned_by="appliance")
        for name in services.catalog.local_names()
        if request.user.may_use(name)
    ]
    routes = [
        Model(id=r.name, object="model", created=int(r.created_at), owned_by="route")
        for r in services.router.visible_routes(request.user)
    ]
    return ModelList(object="list", data=models + routes)


@get("/v1/models/{model_id:str}", opt=ANY_ROLE, name="models:get", responses=errors(404))
async def get_model(request: Request[Principal, Any, Any], model_id: FromPath[str], services: ServicesDep) -> Model:
    route = services.router.routes.find(model_id)
    if route is not None and request.user.may_use(route.name):
        return Model(id=route.name, object="model", created=int(route.created_at), owned_by="route")
    if not request.user.may_use(model_id) or not services.catalog.known(model_id) or services.catalog.is_remote(model_id):
        raise ModelNotFound(f"The model '{model_id}' does not exist or you do not have access to it.", param="model")
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


async def choose_route(services: ServicesDep, plan: Plan, gate: Gate | None, principal: Principal) -> Plan:
    """Let the `choose_route` plugins reorder a route's candidates (or name another route the
    key may use). Plain model names are left alone: the client asked for that model."""
    if plan.route is None or not services.plugins.active("choose_route"):
        return plan
    if gate is None:  # cannot happen while a choose_route plugin is active (gate_for)
        return plan
    view = gate.view
    candidates = [
        Candidate(c.name, cost_per_1k_tokens=0.0, loaded=services.catalog.resident(c.name),
                  capabilities=services.catalog.capabilities(c.name))
        for c in plan.candidates
    ]
    chosen = await services.plugins.choose(view, principal_view(principal), candidates)
    if chosen is None or not chosen[1]:
        return plan
    return services.router.reorder(plan, chosen[1], principal, by=chosen[0])


async def _guarded_stream(
    services: ServicesDep, ctx: RequestContext, principal: Principal, gate: Gate | None, spec: GenerationInput, plan: Plan
) -> tuple[AsyncIterator[GenerationEvent], StreamJudge | None, Breaker | None]:
    """The events to stream, the guardrails reading along, and the serving candidate's
    breaker. Blocking guardrails hold the whole answer back: it is generated and judged
    before the response starts, so a rejection is still a plain 400, and a fallback verdict
    can still move it to the next candidate."""
    held, along = gate.streaming_plan(ctx) if gate is not None else ([], [])
    if gate is None or not held:
        opened = await services.dispatcher.open(ctx, principal, spec, plan)
        return opened.events, StreamJudge(gate, along) if gate is not None and along else None, opened.breaker
    text, finished = await answer(services, ctx, principal, gate, spec, plan, streaming=True, only=held)
    return _replay(text, finished), None, None


async def answer(
    services: ServicesDep, ctx: RequestContext, principal: Principal, gate: Gate | None, spec: GenerationInput,
    plan: Plan, *, streaming: bool, only: list[str] | None = None,
) -> tuple[str, Finished]:
    """A whole answer nobody has seen yet, judged by the guardrails: a "fallback" verdict
    moves it to the next candidate, a "retry" asks the same one again once, with the
    guardrail's feedback. Every generation made is billed (its compute was spent)."""
    dispatcher = services.dispatcher
    opened, text, finished = await dispatcher.complete(ctx, principal, spec, plan)
    made = [finished]
    retried = False
    while gate is not None:
        ctx.finished = made[0] if len(made) == 1 else _combined(made)  # billed even if a guardrail refuses it
        text, verdict = await gate.judge(ctx, text, streaming=streaming, finish_reason=_finish(finished), only=only)
        if verdict is None:
            break
        if verdict.action == "retry" and not retried and verdict.feedback:
            retried = True
            spec = dispatcher.with_feedback(spec, text, verdict.feedback)
            opened, text, finished = await dispatcher.complete(
                ctx, principal, spec, plan, start=opened.index, note=f"retry:{verdict.rule}"
            )
        elif verdict.action == "fallback" and opened.index + 1 < len(plan.candidates):
            opened, text, finished = await dispatcher.complete(
                ctx, principal, spec, plan, start=opened.index + 1, note=f"fallback:guardrail({verdict.rule})"
            )
        else:
            raise gate.refuse(ctx, verdict)
        made.append(finished)
    ctx.finished = made[0] if len(made) == 1 else _combined(made)
    return text, finished


async def _admit_all(services: ServicesDep, ctx: RequestContext, principal: Principal, specs: list[GenerationInput], plan: Plan) -> None:
    """Several prompts in one request are admitted together, counted on the first candidate."""
    engine = await services.catalog.engine(plan.names[0])
    prepared = [await services.inference.prepare_on(engine, plan.names[0], spec) for spec in specs]
    services.governance.admit(
        ctx, principal, plan.names[0], sum(p.prompt_tokens for p in prepared), sum(p.request.max_tokens for p in prepared),
        models=plan.names,
    )


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
    breaker: Breaker | None = None,
) -> AsyncIterator[bytes]:
    """Server-sent events; the usage and audit records are committed before `[DONE]`. With a
    `judge`, a guardrail reading along may end the stream with an error event. The serving
    candidate's `breaker` hears how the generation ended."""
    extra = {"usage": None} if include_usage else {}
    outcome: str | None = None
    ended = False  # by an error event: no `[DONE]` follows, so no client takes it for a whole answer
    parts: list[str] = []
    try:
        if opening is not None:
            yield _sse(opening(base) | extra)
        async for event in _failures_as_events(stream, ctx):
            if isinstance(event, TokenEvent):
                if event.text:
                    if judge is not None and await _judged(judge, ctx, event.text):
                        yield _stream_error(ctx, judge.failure)
                        ended = True
                        break
                    ctx.streamed_tokens += 1
                    parts.append(event.text)
                    yield _sse(choice(base, event.text, None) | extra)
                continue
            ctx.finished = event
            outcome = "failure" if event.reason == "error" else "success" if event.reason != "cancelled" else None
            if event.reason in ("error", "cancelled"):  # the stream already began: say so in-band, as OpenAI does
                yield _stream_error(ctx, from_runtime(generation_failure(event)))
                ended = True
            elif judge is not None and await _judged(judge, ctx, None, finish_reason=_finish(event)):
                yield _stream_error(ctx, judge.failure)
                ended = True
            else:
                yield _sse(choice(base, "", _finish(event)) | extra)
            if include_usage:
                yield _sse(base | {"choices": [], "usage": usage_dict(event)})
        ctx.answer_text = "".join(parts)
        await services.governance.complete(ctx, 200)
        if not ended:
            yield _DONE
    finally:
        if judge is not None:
            judge.cancel()
        if breaker is not None:
            if outcome == "success":
                breaker.success()
            elif outcome == "failure":
                breaker.failure(str(ctx.finished.error if ctx.finished else "failed mid-stream"))
            else:
                breaker.release()
        await stream.aclose()  # type: ignore[attr-defined]


async def _failures_as_events(stream: AsyncIterator[GenerationEvent], ctx: RequestContext) -> AsyncIterator[GenerationEvent]:
    """An engine that raises mid-stream (an upstream cut off, say) instead of finishing with
    an error: the same, as the `Finished` event it stands for."""
    try:
        async for event in stream:
            yield event
    except RuntimeFault as exc:
        prompt_tokens = ctx.admission.prompt_tokens if ctx.admission is not None else 0
        yield Finished("error", prompt_tokens, ctx.streamed_tokens, error=exc)


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
