"""`UpstreamEngine`: the `Engine` protocol for one model of a remote OpenAI-compatible upstream
(vLLM, llama-server, another appliance), so routes can send requests there as to a local model.

What it does on the wire:
- Generation streams (`stream: true` with usage), over a shared `UpstreamClient` for
  connection pooling (`upstream_client()` builds a suitable one; engines never close it).
  The events are parsed from the body's bytes as they arrive, in one pass: no iterator
  per layer, and the stream is read to its end after `[DONE]` so the connection is reused.
- Connection failures, 5xx and 429 are retried before the first token, at most
  `max_retries` times with full-jitter backoff, and everything before the first token
  (retries and their waits included) must fit the upstream's `timeout_seconds`. Nothing is
  retried once a token has been passed on; a later failure ends the stream with
  `Finished(reason="error")`, never with a clean stop.
- Token counts for admission (`tokenize`, `count_chat_tokens`, `tokens_for`) are estimates
  (about one token per 3 characters, on the high side), since the upstream's tokenizer is not
  here; what is settled and recorded is the usage the upstream reports for the request.
- The API key is sent only as `Authorization: Bearer`; it never appears in an exception, a
  log line or a returned value, and every text the upstream sends back in an error is
  scrubbed of key-shaped strings and of the key itself. Messages name the upstream, not its
  URL, since they reach API callers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any, Literal, Protocol, TypeVar

import msgspec

from appliance.errors import ConfigError, NotFound
from appliance.redaction import scrub_keys
from appliance.routing.attempt import fallback_ready
from appliance.routing.upstream_http import HTTPError, Response, TooLarge, UpstreamClient
from appliance.routing.upstream_registry import Upstream, UpstreamRegistry
from runtime.engine import (
    Embeddings,
    EngineHealth,
    EngineStats,
    Finished,
    GenerationEvent,
    GenerationRequest,
    TokenEvent,
)
from runtime.errors import (
    ContextOverflow,
    EngineOverloaded,
    EngineUnavailable,
    InvalidGenerationRequest,
    RuntimeFault,
)

__all__ = ["PriceBook", "UpstreamEngine", "UpstreamEngines", "engines_for", "estimate_tokens", "upstream_client"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_DRAIN_SECONDS, _DRAIN_BYTES = 0.5, 64 * 1024  # what is read after `[DONE]` at most
_MAX_ERROR_BODY = 64 * 1024  # bytes of an error response read to find its message
_MAX_JSON_BODY = 64 * 1024 * 1024  # bytes of an embeddings answer
_MAX_EVENT = 4 * 1024 * 1024  # bytes of one server-sent event
_MAX_MESSAGE = 500  # characters of an upstream's error message passed on
_CONTEXT_CODES = frozenset({"context_length_exceeded", "exceed_context_size_error"})  # OpenAI's; llama-server's type

Piece = tuple[Literal["text", "finish", "usage", "error", "done"], Any]


MAX_PROMPT_OVERHEAD = 4096  # tokens: what a misreporting upstream can add to every later reservation


def estimate_tokens(text: str) -> int:
    """A generous estimate of the tokens in `text` (one per 3 characters, at least 1)."""
    return max(1, len(text) // 3)


def upstream_client(*, max_connections: int = 100, ssl_context: ssl.SSLContext | None = None) -> UpstreamClient:
    """A client for all upstream engines to share: pooled connections, no redirects followed
    (an upstream cannot send the key elsewhere), no cookies kept (requests stay independent),
    no proxy; each engine sets its own timeout per request. `ssl_context` verifies https
    upstreams (default: `ssl.create_default_context()`, the system's CAs)."""
    return UpstreamClient(max_connections=max_connections, max_idle=max_connections // 4 or 1, ssl_context=ssl_context)


def engines_for(
    registry: UpstreamRegistry, client: UpstreamClient, *, context_length: int = 8192
) -> list[UpstreamEngine]:
    """One engine per (upstream, model) the registry holds, named `upstream/model`."""
    engines = []
    for upstream in registry.list():
        key = registry.api_key(upstream.name)
        for model in upstream.models:
            engines.append(UpstreamEngine(upstream, model, client=client, api_key=key, context_length=context_length))
    return engines


class PriceBook(Protocol):
    """Where per-token prices go (`appliance.metering.costs.CostModel` is one)."""

    def set_price(self, model: str, input_per_1k: float, output_per_1k: float) -> None: ...

    def forget_price(self, model: str) -> None: ...


class UpstreamEngines:
    """The engines of every registered (upstream, model), kept in step with `registry`: after
    each change made through that registry instance, the next `get` or `names` rebuilds what
    changed (an unchanged upstream keeps its engine, and so its stats and health). Streams in
    flight on a replaced engine finish on it. `get` and `names` are what
    `Catalog(remote=..., remote_names=...)` takes; `prices`, when given, is told each
    engine's per-1k-token prices under the engine's name."""

    def __init__(
        self,
        registry: UpstreamRegistry,
        client: UpstreamClient,
        *,
        context_length: int = 8192,
        prices: PriceBook | None = None,
    ) -> None:
        self._registry = registry
        self.client = client
        self._context_length = context_length
        self._prices = prices
        self._engines: dict[str, UpstreamEngine] = {}
        self._keys: dict[str, str | None] = {}
        self._revision: int | None = None

    def get(self, name: str) -> UpstreamEngine | None:
        return self._current().get(name)

    def names(self) -> list[str]:
        return list(self._current())

    def refresh(self) -> None:
        """Re-read the registry now (for changes made by another process or instance)."""
        self._revision = None
        self._current()

    async def close(self) -> None:
        """Close every engine; `client` stays open (whoever made it closes it)."""
        for engine in self._engines.values():
            await engine.close()

    def _current(self) -> dict[str, UpstreamEngine]:
        revision = self._registry.revision
        if revision == self._revision:
            return self._engines
        engines: dict[str, UpstreamEngine] = {}
        keys: dict[str, str | None] = {}
        for upstream in self._registry.list():
            try:
                keys[upstream.name] = key = self._registry.api_key(upstream.name)
            except (ConfigError, NotFound) as exc:  # one unreadable key (or a concurrent delete) spares the others
                log.error("upstream %s is left out: %s", upstream.name, exc)
                continue
            for model in upstream.models:
                old = self._engines.get(f"{upstream.name}/{model}")
                if old is not None and _same(old.upstream, upstream) and self._keys.get(upstream.name) == key:
                    engine = old
                else:
                    engine = UpstreamEngine(
                        upstream, model, client=self.client, api_key=key, context_length=self._context_length
                    )
                engines[engine.name] = engine
        if self._prices is not None:
            for name in self._engines.keys() - engines.keys():
                self._prices.forget_price(name)
            for name, engine in engines.items():
                up = engine.upstream
                self._prices.set_price(name, up.prompt_price_per_1k, up.completion_price_per_1k)
        self._engines, self._keys, self._revision = engines, keys, revision
        return engines


class _Retry(Exception):
    """An attempt failed in a way worth another try; `error` is what to raise when out of tries."""

    def __init__(self, error: RuntimeFault, *, wait: float = 0.0, unanswered: bool = False) -> None:
        super().__init__(str(error))
        self.error = error
        self.wait = wait
        self.unanswered = unanswered  # no connection, or lost before an answer: not a status worth another try


class UpstreamEngine:
    """Serves `model` from `upstream`. `api_key` is the upstream's key in clear (from
    `UpstreamRegistry.api_key`), or None to send no Authorization header. `context_length`
    is what admission assumes the upstream's window is; the upstream has the last word.

    `backoff_base` and `backoff_cap` shape the retry waits: attempt n waits a uniform random
    time in [0, min(cap, base * 2**n)], or a 429's Retry-After when that is longer.
    """

    remote = True

    def __init__(
        self,
        upstream: Upstream,
        model: str,
        *,
        client: UpstreamClient,
        api_key: str | None = None,
        context_length: int = 8192,
        backoff_base: float = 0.25,
        backoff_cap: float = 4.0,
    ) -> None:
        if model not in upstream.models:
            raise ValueError(f"upstream {upstream.name} does not list model {model!r}")
        self.upstream = upstream
        self.model = model
        self.name = f"{upstream.name}/{model}"
        self.context_length = context_length
        self._client = client
        self._key = api_key or None
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._timeout = upstream.timeout_seconds
        self._stream_headers = self._headers(stream=True)
        self._json_headers = self._headers(stream=False)
        self._closed = False
        self._open: set[Response] = set()
        self._active = 0
        self._requests_served = 0
        self._tokens_generated = 0
        self._retries = 0
        # What the upstream counts beyond our estimate of a prompt (its chat template, a default
        # system prompt): the largest seen, added to later estimates so reservations cover it.
        self._prompt_overhead = 0
        self._failures = 0
        self._last_error: str | None = None

    def __repr__(self) -> str:
        return f"UpstreamEngine({self.name!r})"

    # -- generation -----------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        self._check_open()
        path, body = self._generation_body(request)
        content = _json_bytes(body)
        prompt_estimate = len(request.tokens) if request.tokens else len(self.tokens_for(request))
        chat = request.messages is not None
        started = time.monotonic()
        self._active += 1
        try:
            try:
                stream, pieces = await self._retrying(
                    lambda: self._open_stream(path, content, chat, prompt_estimate, request.request_id),
                    give_up=f"upstream {self.upstream.name}: no first token within {self.upstream.timeout_seconds:g}s",
                )
            except RuntimeFault as exc:
                self._note_failure(exc)
                raise
            chunks = 0
            usage: dict[str, Any] | None = None
            finish: str | None = None
            failure: EngineUnavailable | None = None
            try:
                while pieces:  # each batch ends at a "done" or an "error", if it has one
                    for kind, value in pieces:
                        if kind == "text":
                            chunks += 1
                            yield TokenEvent(value)
                        elif kind == "finish":
                            finish = value
                        elif kind == "usage":
                            usage = value
                        elif kind == "error":
                            said = self._clean(value["message"])
                            failure = EngineUnavailable(f"upstream {self.upstream.name} failed mid-stream: {said}")
                        else:  # [DONE]
                            finish = finish or "stop"
                    if pieces[-1][0] in ("done", "error"):
                        break
                    pieces = await stream.next()
            except HTTPError as exc:
                failure = EngineUnavailable(f"upstream {self.upstream.name} failed mid-stream: {self._describe(exc)}")
            finally:
                self._close_response(stream.response)
            yield self._finished(failure, finish, usage, chunks, prompt_estimate, started)
        finally:
            self._active -= 1
            self._requests_served += 1

    def _finished(
        self,
        failure: EngineUnavailable | None,
        finish: str | None,
        usage: dict[str, Any] | None,
        chunks: int,
        prompt_estimate: int,
        started: float,
    ) -> Finished:
        """The one `Finished` of a stream that got as far as a first token (or a clean end)."""
        if failure is None and finish is None:  # the connection ended cleanly, the answer did not
            failure = EngineUnavailable(f"upstream {self.upstream.name} ended the stream before it finished")
        if failure is not None and self._closed:
            failure = EngineUnavailable(f"engine {self.name} was closed mid-stream")
        prompt_tokens, completion_tokens, cached = _usage(usage, prompt_estimate, chunks)
        unseen = prompt_tokens - (prompt_estimate - self._prompt_overhead)
        self._prompt_overhead = min(MAX_PROMPT_OVERHEAD, max(self._prompt_overhead, unseen))
        self._tokens_generated += completion_tokens
        compute = time.monotonic() - started
        if failure is not None:
            self._note_failure(failure)
            return Finished("error", prompt_tokens, completion_tokens, cached, compute_seconds=compute, error=failure)
        self._last_error = None
        reason: Literal["stop", "length"] = "length" if finish == "length" else "stop"
        return Finished(reason, prompt_tokens, completion_tokens, cached, compute_seconds=compute)

    async def _open_stream(
        self, path: str, content: bytes, chat: bool, prompt_estimate: int, request_id: str
    ) -> tuple[_Stream, list[Piece]]:
        """One attempt: send, check the status, and read up to the first token. Raises `_Retry`
        or the final error; on success the caller owns (and closes) the stream's response."""
        headers = self._stream_headers | {"X-Request-Id": request_id} if request_id else self._stream_headers
        response = await self._send(path, content, headers)
        try:
            if response.status != 200:
                raise await self._refusal(response, prompt_estimate)
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                raise EngineUnavailable(f"upstream {self.upstream.name} did not answer with an event stream")
            stream = _Stream(response, chat)
            return stream, await self._read_head(stream, prompt_estimate)
        except BaseException:
            self._close_response(response)
            raise

    async def _read_head(self, stream: _Stream, prompt_estimate: int) -> list[Piece]:
        """The pieces up to the first text (or the end, for an empty answer), and any that came
        with it; an error before the first text is raised."""
        head: list[Piece] = []
        try:
            while pieces := await stream.next():
                for kind, value in pieces:
                    if kind == "error":
                        raise self._stream_refusal(value, prompt_estimate)
                    if kind in ("text", "done"):
                        return head + pieces
                head += pieces
        except HTTPError as exc:
            raise _Retry(
                EngineUnavailable(f"upstream {self.upstream.name} failed: {self._describe(exc)}"), unanswered=True
            ) from None
        if not any(kind == "finish" for kind, _ in head):
            raise _Retry(
                EngineUnavailable(f"upstream {self.upstream.name} closed the stream before the first token"), unanswered=True
            )
        return head

    def _generation_body(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        if (request.prompt is None) == (request.messages is None):
            raise InvalidGenerationRequest("set exactly one of prompt and messages")
        if request.max_tokens < 1:
            raise InvalidGenerationRequest("max_tokens must be at least 1")
        sampling = request.sampling
        body: dict[str, Any] = {
            "model": self.model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": request.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "presence_penalty": sampling.presence_penalty,
            "frequency_penalty": sampling.frequency_penalty,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if request.stop:
            body["stop"] = list(request.stop)
        if request.response_format is not None:
            body["response_format"] = _response_format(request.response_format)
        if request.messages is not None:
            return "/chat/completions", body | {"messages": request.messages}
        return "/completions", body | {"prompt": request.prompt}

    # -- embeddings -------------------------------------------------------------------------------
    async def embed(self, texts: list[str]) -> Embeddings:
        """The upstream's vectors, L2-normalised as the protocol promises; retried like generation."""
        self._check_open()
        estimate = sum(estimate_tokens(t) for t in texts)
        try:
            return await self._retrying(
                lambda: self._embed_once(texts, estimate),
                give_up=f"upstream {self.upstream.name}: no answer within {self.upstream.timeout_seconds:g}s",
            )
        except RuntimeFault as exc:
            self._note_failure(exc)
            raise

    async def _embed_once(self, texts: list[str], estimate: int) -> Embeddings:
        response = await self._send(
            "/embeddings", _json_bytes({"model": self.model, "input": texts}), self._json_headers
        )
        try:
            if response.status != 200:
                raise await self._refusal(response, estimate)
            try:
                payload = _decode(await response.read(_MAX_JSON_BODY))
                rows = sorted(payload["data"], key=lambda row: row.get("index", 0))
                vectors = [_normalised([float(x) for x in row["embedding"]]) for row in rows]
            except (msgspec.DecodeError, ValueError, KeyError, TypeError, AttributeError):
                raise EngineUnavailable(
                    f"upstream {self.upstream.name} sent embeddings this server cannot read"
                ) from None
            except TooLarge:
                raise EngineUnavailable(
                    f"upstream {self.upstream.name} sent embeddings larger than this server reads"
                ) from None
            except HTTPError as exc:
                raise _Retry(
                    EngineUnavailable(f"upstream {self.upstream.name} failed: {self._describe(exc)}"), unanswered=True
                ) from None
            if len(vectors) != len(texts):
                raise EngineUnavailable(
                    f"upstream {self.upstream.name} sent {len(vectors)} vectors for {len(texts)} texts"
                )
            usage = payload.get("usage") if isinstance(payload, dict) else None
            prompt_tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
            self._last_error = None
            return Embeddings(
                vectors=vectors, prompt_tokens=prompt_tokens if isinstance(prompt_tokens, int) else estimate
            )
        finally:
            self._close_response(response)

    # -- token estimates (admission only; settlement uses the upstream's reported usage) --------
    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """Placeholder ids, as many as `estimate_tokens(text)`: the count is what matters."""
        return [0] * estimate_tokens(text)

    def count_chat_tokens(self, messages: list[dict[str, Any]]) -> int:
        return sum(4 + estimate_tokens(_content_text(m.get("content"))) for m in messages) + 2

    def tokens_for(self, request: GenerationRequest) -> list[int]:
        """The estimate admission reserves for, with the overhead this upstream was seen to add."""
        if (request.prompt is None) == (request.messages is None):
            raise InvalidGenerationRequest("set exactly one of prompt and messages")
        if request.messages is not None:
            return [0] * (self.count_chat_tokens(request.messages) + self._prompt_overhead)
        return [0] * (estimate_tokens(request.prompt or "") + self._prompt_overhead)

    # -- state ----------------------------------------------------------------------------------
    @property
    def served_files(self) -> dict[str, str] | None:
        """What answers, for the audit log: the upstream, its URL and the model (never the key)."""
        return {"upstream": self.upstream.name, "base_url": self.upstream.base_url, "model": self.model}

    def health(self) -> EngineHealth:
        """Not ok once closed, or while the latest request failed upstream (until one succeeds)."""
        if self._closed:
            return EngineHealth(ok=False, detail="closed")
        if self._last_error is not None:
            return EngineHealth(ok=False, detail=self._last_error)
        return EngineHealth(ok=True, detail=f"remote upstream {self.upstream.name}")

    def stats(self) -> EngineStats:
        return EngineStats(
            model=self.name,
            slots=0,
            active_sequences=self._active,
            queue_depth=0,
            queue_limit=0,
            kv_cells_used=0,
            kv_cells_total=0,
            tokens_generated=self._tokens_generated,
            requests_served=self._requests_served,
            extra={
                "remote": True,
                "upstream": self.upstream.name,
                "retries": self._retries,
                "failures": self._failures,
            },
        )

    async def close(self) -> None:
        """Refuse new work and end the streams in flight (with `Finished("error")`). The shared
        client is the caller's to close."""
        self._closed = True
        for response in list(self._open):
            self._close_response(response)

    # -- helpers --------------------------------------------------------------------------------
    async def _retrying(self, attempt: Callable[[], Awaitable[T]], *, give_up: str) -> T:
        """Run `attempt` until it succeeds, retrying `_Retry` failures up to `max_retries` times,
        all within `timeout_seconds`; then `EngineUnavailable(give_up)`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.upstream.timeout_seconds
        tries = 0
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    try:
                        return await attempt()
                    except _Retry as retry:
                        if retry.unanswered and fallback_ready():  # the route's next candidate is the quicker way
                            raise retry.error from None
                        wait = max(retry.wait, random.uniform(0, min(self._backoff_cap, self._backoff_base * 2**tries)))
                        if tries >= self.upstream.max_retries or loop.time() + wait >= deadline:
                            raise retry.error from None
                        tries += 1
                        self._retries += 1
                        log.warning("%s: %s; retry %d in %.2fs", self.name, retry.error, tries, wait)
                        await asyncio.sleep(wait)
        except TimeoutError:
            raise EngineUnavailable(give_up) from None

    async def _send(self, path: str, content: bytes, headers: dict[str, str]) -> Response:
        try:
            response = await self._client.request(
                "POST", self._url(path), content=content, headers=headers, timeout=self._timeout
            )
        except HTTPError as exc:
            raise _Retry(
                EngineUnavailable(f"cannot reach upstream {self.upstream.name}: {self._describe(exc)}"), unanswered=True
            ) from None
        self._open.add(response)
        return response

    def _close_response(self, response: Response) -> None:
        self._open.discard(response)
        response.close()

    async def _refusal(self, response: Response, prompt_estimate: int) -> Exception:
        """The error (or `_Retry`) for a non-200 answer, with the upstream's own message."""
        status = response.status
        raw = await _read_capped(response)
        try:
            detail = _error_detail(json.loads(raw), raw.decode("utf-8", "replace"))
        except ValueError:
            detail = {"message": raw.decode("utf-8", "replace"), "code": None}
        said = self._clean(detail["message"]) or response.reason
        name = self.upstream.name
        if status == 429:
            wait = _retry_after(response.headers.get("retry-after"))
            return _Retry(
                EngineOverloaded(f"upstream {name} is rate limiting (429): {said}", retry_after=wait), wait=wait
            )
        if status >= 500:
            return _Retry(EngineUnavailable(f"upstream {name} answered {status}: {said}"))
        if detail["code"] in _CONTEXT_CODES:
            return ContextOverflow(f"upstream {name}: {said}", prompt_tokens=prompt_estimate, limit=self.context_length)
        if status in (401, 403):  # our credentials, not the caller's request: the admin must fix the upstream
            return EngineUnavailable(f"upstream {name} refused this server's credentials ({status}): {said}")
        if status == 404:
            return EngineUnavailable(f"upstream {name} does not serve model {self.model!r} here (404): {said}")
        if 400 <= status < 500:
            return InvalidGenerationRequest(f"upstream {name} refused the request ({status}): {said}")
        return EngineUnavailable(f"upstream {name} answered {status}")

    def _stream_refusal(self, detail: dict[str, Any], prompt_estimate: int) -> RuntimeFault:
        """An error event before the first token."""
        said = self._clean(detail["message"])
        if detail["code"] in _CONTEXT_CODES:
            return ContextOverflow(
                f"upstream {self.upstream.name}: {said}", prompt_tokens=prompt_estimate, limit=self.context_length
            )
        return EngineUnavailable(f"upstream {self.upstream.name} failed: {said}")

    def _headers(self, *, stream: bool) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream" if stream else "application/json"}
        if self._key is not None:
            headers["Authorization"] = f"Bearer {self._key}"
        return headers

    def _url(self, path: str) -> str:
        return self.upstream.base_url + path

    def _clean(self, text: str) -> str:
        """Upstream-provided text made safe to pass on: no key, nothing key-shaped, bounded."""
        if self._key is not None:
            text = text.replace(self._key, "[API_KEY]")
        return scrub_keys(text)[:_MAX_MESSAGE].strip()

    def _describe(self, exc: BaseException) -> str:
        detail = self._clean(str(exc))
        return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__

    def _note_failure(self, exc: RuntimeFault) -> None:
        if isinstance(exc, EngineUnavailable | EngineOverloaded):  # the caller's own mistakes say nothing of health
            self._failures += 1
            self._last_error = str(exc)
            log.warning("%s: %s", self.name, exc)

    def _check_open(self) -> None:
        if self._closed:
            raise EngineUnavailable(f"engine {self.name} is closed")


def _same(a: Upstream, b: Upstream) -> bool:
    """The same settings (a set that changed nothing still moves `updated_at`)."""
    return replace(a, updated_at=0.0) == replace(b, updated_at=0.0)


class _Stream:
    """An upstream's server-sent events, read as pieces: text, finish reasons, usage, an error
    or the end."""

    def __init__(self, response: Response, chat: bool) -> None:
        self.response = response
        self._chat = chat
        self._events = _SSE()

    async def next(self) -> list[Piece]:
        """The pieces of the next bytes to arrive; [] at the end of the body. A batch stops at
        its "done" or "error" piece, and after a "done" the body has been read to its end."""
        while True:
            data = await self.response.next_chunk()
            pieces = _pieces(self._events.feed(data) if data else self._events.end(), self._chat)
            if pieces and pieces[-1][0] == "done":
                await _drain(self.response)
            if pieces or not data:
                return pieces


class _SSE:
    """Server-sent events from a body's bytes as they arrive: (event name, data). The name is
    "message" when none is given; lines end in LF, CRLF or CR."""

    def __init__(self) -> None:
        self._rest = b""
        self._event = ""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[tuple[str, bytes]]:
        buffer = self._rest + chunk if self._rest else chunk
        if b"\r" in buffer:
            held = buffer.endswith(b"\r")  # maybe the first half of a CRLF
            buffer = buffer[:-1] if held else buffer
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n") + (b"\r" if held else b"")
        lines = buffer.split(b"\n")
        self._rest = lines.pop()
        if len(self._rest) > _MAX_EVENT or sum(map(len, self._data)) > _MAX_EVENT:
            raise TooLarge(f"a server-sent event is larger than {_MAX_EVENT} bytes")
        return self._lines(lines)

    def end(self) -> list[tuple[str, bytes]]:
        """The events still held once the body has ended (a last one without its blank line)."""
        lines = [self._rest.rstrip(b"\r")] if self._rest else []
        self._rest = b""
        return self._lines([*lines, b""])

    def _lines(self, lines: list[bytes]) -> list[tuple[str, bytes]]:
        events = []
        for line in lines:
            if not line:
                if self._data:
                    events.append((self._event or "message", b"\n".join(self._data)))
                self._event, self._data = "", []
            elif line[0] != 58:  # ":" starts a comment
                field, _, value = line.partition(b":")
                value = value[1:] if value[:1] == b" " else value
                if field == b"data":
                    self._data.append(value)
                elif field == b"event":
                    self._event = value.decode("utf-8", "replace")
        return events


def _pieces(events: list[tuple[str, bytes]], chat: bool) -> list[Piece]:
    """What the events say, up to and including a "done" or an "error"."""
    pieces: list[Piece] = []
    for event, data in events:
        if data.strip() == b"[DONE]":
            pieces.append(("done", None))
            return pieces
        try:
            obj = _decode(data)
        except msgspec.DecodeError:
            obj = None
        if event == "error" or (isinstance(obj, dict) and "error" in obj):
            pieces.append(("error", _error_detail(obj, data.decode("utf-8", "replace"))))
            return pieces
        if not isinstance(obj, dict):
            pieces.append(("error", {"message": "sent an event that is not a JSON object", "code": None}))
            return pieces
        if isinstance(obj.get("usage"), dict):
            pieces.append(("usage", obj["usage"]))
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            if chat:
                delta = choice.get("delta")
                text = delta.get("content") if isinstance(delta, dict) else None
            else:
                text = choice.get("text")
            if isinstance(text, str) and text:
                pieces.append(("text", text))
            if isinstance(choice.get("finish_reason"), str):
                pieces.append(("finish", choice["finish_reason"]))
    return pieces


async def _drain(response: Response) -> None:
    """Read the rest of a finished stream (its last chunk, usually here already), so that the
    connection goes back to the pool instead of being closed: otherwise every request opens a
    new connection, and a new TLS handshake to an https upstream. Bounded: an upstream that
    keeps talking after `[DONE]` is cut off."""
    if response.complete:
        return
    with contextlib.suppress(TimeoutError, HTTPError):
        async with asyncio.timeout(_DRAIN_SECONDS):
            seen = 0
            while data := await response.next_chunk():
                seen += len(data)
                if seen > _DRAIN_BYTES:
                    return


async def _read_capped(response: Response) -> bytes:
    body = b""
    try:
        while len(body) < _MAX_ERROR_BODY and (chunk := await response.next_chunk()):
            body += chunk
    except HTTPError:
        pass  # the status says enough
    return body[:_MAX_ERROR_BODY]


_json_bytes = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def _error_detail(obj: Any, raw: str) -> dict[str, Any]:
    """{"message", "code"} of an OpenAI-style error body (or of whatever else was sent)."""
    error = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(error, dict):
        message = error.get("message")
        code = error.get("code") if isinstance(error.get("code"), str) else error.get("type")
        return {"message": message if isinstance(message, str) else json.dumps(error), "code": code}
    if isinstance(error, str):
        return {"message": error, "code": None}
    return {"message": raw, "code": None}


def _retry_after(value: str | None) -> float:
    """Seconds from a Retry-After header (seconds or an HTTP date); 1 when absent or unreadable."""
    if not value:
        return 1.0
    try:
        seconds = float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return 1.0
    return max(0.0, seconds) if math.isfinite(seconds) else 1.0


def _usage(usage: dict[str, Any] | None, prompt_estimate: int, chunks: int) -> tuple[int, int, int]:
    """(prompt, completion, cached) tokens as the upstream reports them, else estimated (one
    token per streamed chunk, which is how OpenAI-compatible servers stream)."""

    def count(value: Any, fallback: int) -> int:
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else fallback

    if usage is None:
        return prompt_estimate, chunks, 0
    details = usage.get("prompt_tokens_details")
    cached = count(details.get("cached_tokens"), 0) if isinstance(details, dict) else 0
    return count(usage.get("prompt_tokens"), prompt_estimate), count(usage.get("completion_tokens"), chunks), cached


def _response_format(fmt: dict[str, Any]) -> dict[str, Any]:
    """Our `{"type": "json_schema", "schema": S}` in OpenAI's shape; anything else as it is."""
    if fmt.get("type") == "json_schema" and "schema" in fmt and "json_schema" not in fmt:
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name") or "response", "schema": fmt["schema"]}}
    return fmt


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) if isinstance(part, dict) else str(part) for part in content)
    return "" if content is None else str(content)


def _normalised(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm else vector
