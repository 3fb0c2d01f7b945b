"""OpenAI-compatible endpoints under /v1. Thin: parse, call the inference service, format."""

from __future__ import annotations

import base64
import struct
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Request, Response, get, post
from litestar.response import Stream

from runtime.engine import Finished, GenerationEvent, TokenEvent

from appliance.api.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from appliance.api.security import ANY_ROLE, roles
from appliance.api.services import Services
from appliance.auth import Principal, Role
from appliance.errors import InvalidRequest
from appliance.inference import Prepared, usage_dict

INFERENCE = roles(Role.USER, Role.OPERATOR)
_encode = msgspec.json.encode
_DONE = b"data: [DONE]\n\n"


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + _encode(obj) + b"\n\n"


def _headers(prepared: Prepared) -> dict[str, str]:
    return {"x-appliance-model": prepared.model}


@post("/v1/chat/completions", opt=INFERENCE, name="chat:create", status_code=200)
async def create_chat_completion(
    request: Request[Principal, Any, Any], data: ChatCompletionRequest, services: Services
) -> Response[Any]:
    prepared = services.inference.prepare_chat(request.user, data)
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if data.stream:
        stream = await services.inference.open_stream(prepared)
        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        body = _chat_chunks(stream, ident, created, prepared.model, include_usage)
        return Stream(body, media_type="text/event-stream", headers=_headers(prepared) | _SSE_HEADERS)
    text, finished = await services.inference.run(prepared)
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
    return Response(_encode(payload), media_type="application/json", headers=_headers(prepared))


@post("/v1/completions", opt=INFERENCE, name="completions:create", status_code=200)
async def create_completion(
    request: Request[Principal, Any, Any], data: CompletionRequest, services: Services
) -> Response[Any]:
    prompts = [data.prompt] if isinstance(data.prompt, str) else data.prompt
    prepared_all = [services.inference.prepare_completion(request.user, data, p) for p in prompts]
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if data.stream:
        if len(prepared_all) > 1:
            raise InvalidRequest("stream supports a single prompt", param="prompt")
        prepared = prepared_all[0]
        stream = await services.inference.open_stream(prepared)
        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        body = _completion_chunks(stream, ident, created, prepared.model, include_usage)
        return Stream(body, media_type="text/event-stream", headers=_headers(prepared) | _SSE_HEADERS)
    choices, prompt_tokens, completion_tokens, cached = [], 0, 0, 0
    for index, prepared in enumerate(prepared_all):
        text, finished = await services.inference.run(prepared)
        choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": _finish(finished)})
        prompt_tokens += finished.prompt_tokens
        completion_tokens += finished.completion_tokens
        cached += finished.cached_tokens
    payload = {
        "id": ident,
        "object": "text_completion",
        "created": created,
        "model": data.model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached},
        },
    }
    return Response(_encode(payload), media_type="application/json", headers=_headers(prepared_all[0]))


@post("/v1/embeddings", opt=INFERENCE, name="embeddings:create", status_code=200)
async def create_embeddings(
    request: Request[Principal, Any, Any], data: EmbeddingRequest, services: Services
) -> Response[Any]:
    result = await services.inference.embed(request.user, data)
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
    return Response(_encode(payload), media_type="application/json", headers={"x-appliance-model": data.model})


@get("/v1/models", opt=ANY_ROLE, name="models:list")
async def list_models(request: Request[Principal, Any, Any], services: Services) -> dict[str, Any]:
    created = {m.name: int(m.added_at) for m in services.models.list()}
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": created.get(name, 0), "owned_by": "appliance"}
            for name in services.inference.visible_models(request.user)
        ],
    }


@get("/v1/models/{model_id:str}", opt=ANY_ROLE, name="models:get")
async def get_model(request: Request[Principal, Any, Any], model_id: str, services: Services) -> dict[str, Any]:
    services.inference.resolve(request.user, model_id)
    created = services.models.find(model_id)
    return {"id": model_id, "object": "model", "created": int(created.added_at) if created else 0, "owned_by": "appliance"}


ROUTES = [create_chat_completion, create_completion, create_embeddings, list_models, get_model]

_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def _finish(finished: Finished) -> str:
    return "length" if finished.reason == "length" else "stop"


def _vector(values: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
    return values


async def _chat_chunks(
    stream: AsyncIterator[GenerationEvent], ident: str, created: int, model: str, include_usage: bool
) -> AsyncIterator[bytes]:
    base = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model}
    extra = {"usage": None} if include_usage else {}
    try:
        yield _sse(base | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]} | extra)
        async for event in stream:
            if isinstance(event, TokenEvent):
                if event.text:
                    yield _sse(base | {"choices": [{"index": 0, "delta": {"content": event.text}, "finish_reason": None}]} | extra)
            else:
                yield _sse(base | {"choices": [{"index": 0, "delta": {}, "finish_reason": _finish(event)}]} | extra)
                if include_usage:
                    yield _sse(base | {"choices": [], "usage": usage_dict(event)})
        yield _DONE
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


async def _completion_chunks(
    stream: AsyncIterator[GenerationEvent], ident: str, created: int, model: str, include_usage: bool
) -> AsyncIterator[bytes]:
    base = {"id": ident, "object": "text_completion", "created": created, "model": model}
    extra = {"usage": None} if include_usage else {}
    try:
        async for event in stream:
            if isinstance(event, TokenEvent):
                if event.text:
                    yield _sse(base | {"choices": [{"index": 0, "text": event.text, "logprobs": None, "finish_reason": None}]} | extra)
            else:
                yield _sse(base | {"choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": _finish(event)}]} | extra)
                if include_usage:
                    yield _sse(base | {"choices": [], "usage": usage_dict(event)})
        yield _DONE
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
