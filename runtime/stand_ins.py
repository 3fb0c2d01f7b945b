"""Engines without llama.cpp: `EchoEngine` measures gateway overhead, `FaultyEngine` rehearses failures."""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, Literal

from .engine import (
    Embeddings,
    EngineHealth,
    EngineStats,
    Finished,
    GenerationEvent,
    GenerationRequest,
    TokenEvent,
    fit_completion,
)
from .errors import ContextOverflow, EngineOverloaded, EngineUnavailable, InvalidGenerationRequest

__all__ = ["EchoEngine", "FaultyEngine"]

_EMBED_DIM = 64


class EchoEngine:
    """Streams the prompt's words back at once (one word = one token), honouring the protocol.

    With `messages`, the last message's content is echoed; tokens are whitespace-separated words.
    `max_tokens` cuts the echo ("length"); stop strings end it ("stop").
    """

    def __init__(self, name: str = "echo", *, context_length: int = 4096) -> None:
        self.name = name
        self.context_length = context_length
        self._closed = False
        self._active = 0
        self._tokens_generated = 0
        self._requests_served = 0

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        self._check_open()
        prompt_tokens, words = self._prepare(request)
        self._active += 1
        reason: Literal["stop", "length", "cancelled", "error"] = "cancelled"
        emitted = 0
        try:
            async for event in self._stream(request, words):
                if event is None:  # the stream hit max_tokens
                    reason = "length"
                    break
                emitted += 1
                self._tokens_generated += 1
                yield event
            else:
                reason = "stop"
            yield Finished(reason=reason, prompt_tokens=prompt_tokens, completion_tokens=emitted)
        finally:
            self._active -= 1
            self._requests_served += 1

    async def _stream(self, request: GenerationRequest, words: list[str]) -> AsyncIterator[TokenEvent | None]:
        text = ""
        for i, word in enumerate(words):
            if i >= request.max_tokens:
                yield None
                return
            piece = word if i == 0 else " " + word
            text += piece
            if any(stop and stop in text for stop in request.stop):
                return
            yield TokenEvent(piece)

    def _prepare(self, request: GenerationRequest) -> tuple[int, list[str]]:
        if (request.prompt is None) == (request.messages is None):
            raise InvalidGenerationRequest("set exactly one of prompt and messages")
        if request.max_tokens < 1:
            raise InvalidGenerationRequest("max_tokens must be at least 1")
        prompt_tokens = len(request.tokens) if request.tokens else len(self.tokens_for(request))
        if request.messages is not None:
            words = str(request.messages[-1].get("content") or "").split()
        else:
            words = (request.prompt or "").split()
        fit_completion(prompt_tokens, request.max_tokens, self.context_length, default=request.max_tokens)
        return prompt_tokens, words

    async def embed(self, texts: list[str]) -> Embeddings:
        """Hashed word and trigram counts (a real, if crude, embedding), L2-normalised; empty text gives zeros."""
        self._check_open()
        vectors = [_hashed_vector(text) for text in texts]
        return Embeddings(vectors=vectors, prompt_tokens=sum(len(self.tokenize(t)) for t in texts))

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        ids = [_word_id(w) for w in text.split()]
        return [1, *ids] if add_special else ids

    def count_chat_tokens(self, messages: list[dict[str, Any]]) -> int:
        return sum(4 + len(str(m.get("content") or "").split()) for m in messages) + 2

    def tokens_for(self, request: GenerationRequest) -> list[int]:
        if (request.prompt is None) == (request.messages is None):
            raise InvalidGenerationRequest("set exactly one of prompt and messages")
        if request.messages is not None:
            return [1] * self.count_chat_tokens(request.messages)
        return self.tokenize(request.prompt or "")

    @property
    def served_files(self) -> dict[str, str] | None:
        return None

    def health(self) -> EngineHealth:
        return EngineHealth(ok=not self._closed, detail="closed" if self._closed else "echo")

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
        )

    async def close(self) -> None:
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise EngineUnavailable(f"engine {self.name} is closed")


FaultKind = Literal["overloaded", "unavailable", "overflow", "invalid"]


class FaultyEngine(EchoEngine):
    """An `EchoEngine` that fails on purpose. All knobs are plain attributes, so tests can flip them live.

    - `fail_before`: raise that error before the first event ("overloaded", "unavailable",
      "overflow" or "invalid").
    - `fail_after_tokens`: stream that many tokens, then fail: `mid_stream="finish"` ends with
      `Finished(reason="error")`, `mid_stream="raise"` raises `EngineUnavailable` mid-stream.
    - `first_token_delay_s` / `token_delay_s`: be slow (sleeps on the event loop, never blocks it).
    - `embed_fails`: `embed` raises `EngineUnavailable`; `healthy=False` makes `health()` report failure.
    """

    def __init__(
        self,
        name: str = "faulty",
        *,
        fail_before: FaultKind | None = None,
        fail_after_tokens: int | None = None,
        mid_stream: Literal["finish", "raise"] = "finish",
        first_token_delay_s: float = 0.0,
        token_delay_s: float = 0.0,
        retry_after: float = 1.0,
        embed_fails: bool = False,
        healthy: bool = True,
        context_length: int = 4096,
    ) -> None:
        super().__init__(name, context_length=context_length)
        self.fail_before = fail_before
        self.fail_after_tokens = fail_after_tokens
        self.mid_stream = mid_stream
        self.first_token_delay_s = first_token_delay_s
        self.token_delay_s = token_delay_s
        self.retry_after = retry_after
        self.embed_fails = embed_fails
        self.healthy = healthy
        self.calls = 0

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        self.calls += 1
        self._check_open()
        self._raise_before(request)
        if self.first_token_delay_s:
            await asyncio.sleep(self.first_token_delay_s)
        emitted = 0
        async with aclosing(super().generate(request)) as events:
            async for event in events:
                if isinstance(event, TokenEvent):
                    if self.fail_after_tokens is not None and emitted >= self.fail_after_tokens:
                        if self.mid_stream == "raise":
                            raise EngineUnavailable(f"engine {self.name} failed mid-stream")
                        prompt_tokens = self._prepare(request)[0]
                        yield Finished(reason="error", prompt_tokens=prompt_tokens, completion_tokens=emitted)
                        return
                    if emitted and self.token_delay_s:
                        await asyncio.sleep(self.token_delay_s)
                    emitted += 1
                yield event

    def _raise_before(self, request: GenerationRequest) -> None:
        kind = self.fail_before
        if kind is None:
            return
        if kind == "overloaded":
            raise EngineOverloaded(f"engine {self.name} is overloaded", retry_after=self.retry_after)
        if kind == "unavailable":
            raise EngineUnavailable(f"engine {self.name} is unavailable")
        if kind == "overflow":
            raise ContextOverflow(
                f"prompt does not fit engine {self.name}",
                prompt_tokens=self.context_length + 1,
                limit=self.context_length,
            )
        if kind == "invalid":
            raise InvalidGenerationRequest(f"engine {self.name} rejects this request")
        raise ValueError(f"unknown fault {kind!r}")

    async def embed(self, texts: list[str]) -> Embeddings:
        if self.embed_fails:
            raise EngineUnavailable(f"engine {self.name} does not serve embeddings")
        return await super().embed(texts)

    def health(self) -> EngineHealth:
        if not self.healthy:
            return EngineHealth(ok=False, detail="configured unhealthy")
        return super().health()


def _word_id(word: str) -> int:
    return 3 + int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "little") % 50_000


def _hashed_vector(text: str) -> list[float]:
    """Counts of hashed words and character trigrams; similar texts share features."""
    vec = [0.0] * _EMBED_DIM
    for word in text.lower().split():
        padded = f"#{word}#"
        for feature in [word, *(padded[i : i + 3] for i in range(len(padded) - 2))]:
            h = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
            vec[h % _EMBED_DIM] += 1.0
    norm = math.sqrt(sum(v * v for v in vec))
    return [v / norm for v in vec] if norm else vec
