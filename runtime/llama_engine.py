"""`LlamaEngine`: the Engine protocol over llama.cpp, with continuous batching on the decode
thread that every engine in the process shares."""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import AsyncIterator
from typing import Any

import llama_cpp

from ._batch_loop import BatchLoop, Sequence
from ._chat_template import ChatTemplate, PromptBuilder
from ._decode_thread import DecodeThread
from ._drafts import DraftPolicy
from ._embedder import Embedder
from ._native import Model, new_context
from ._sampler import JSON_OBJECT_GRAMMAR, build_sampler, json_schema_to_grammar
from .engine import (
    Embeddings,
    EngineHealth,
    EngineStats,
    Finished,
    GenerationEvent,
    GenerationRequest,
    fit_completion,
)
from .errors import ContextOverflow, EngineUnavailable, InvalidGenerationRequest
from .weights import ServedWeights

__all__ = ["JSON_OBJECT_GRAMMAR", "LlamaEngine", "json_schema_to_grammar"]


class LlamaEngine:
    """Runs one GGUF model: `slots` sequences decode together, each with `n_ctx_per_slot` tokens of context.

    The constructor loads the model and blocks for about a second; from async code use
    `await LlamaEngine.open(...)` (or `asyncio.to_thread(LlamaEngine, ...)`).

    `max_tokens` is taken as given: clamping it to the context window is the API layer's
    job; a request whose prompt plus `max_tokens` exceeds `n_ctx_per_slot` raises
    `ContextOverflow`.

    `weights` says what `model_path` is (the registered file or a re-encoding of it, see
    `runtime.weights`): the engine loads the adapter a re-encoding may need from it, and
    reports it in `stats`.

    `draft_tokens` caps the guessed tokens a sequence may add to a decode step (speculative
    decoding by prompt lookup, see `runtime._drafts`; 0 turns it off). How many it adds is
    measured as it runs, unless `always_draft` fixes it at the cap. Answers are the same either way.

    Decode steps run on `decode_thread`, by default the one the process shares (see
    `runtime._decode_thread`): engines take steps in turn instead of competing for the cores.
    """

    def __init__(
        self,
        model_path: str,
        *,
        name: str,
        n_ctx_per_slot: int = 2048,
        slots: int = 8,
        n_threads: int | None = None,
        n_batch: int = 512,
        n_gpu_layers: int = 0,
        queue_limit: int = 64,
        queue_timeout_s: float = 30.0,
        embeddings: bool = True,
        energy_watts: float = 0.0,
        weights: ServedWeights | None = None,
        draft_tokens: int = 3,
        always_draft: bool = False,
        decode_thread: DecodeThread | None = None,
    ) -> None:
        if slots < 1 or n_ctx_per_slot < 8 or n_batch < slots or queue_limit < 0 or draft_tokens < 0:
            raise ValueError(
                "need slots >= 1, n_ctx_per_slot >= 8, n_batch >= slots, queue_limit >= 0, draft_tokens >= 0"
            )
        # A drafted step has at most twice as many rows as there are slots: wider ones cost more
        # than they bring here, and each row's logits and activations add to peak RSS (8 x 4
        # rows took the default model's server from 394 to 404 MB).
        drafts = DraftPolicy(
            draft_tokens, max_rows=min(n_batch, 2 * slots), fixed=draft_tokens if always_draft else None
        )
        self.name = name
        self.context_length = n_ctx_per_slot
        self._slots = slots
        self._queue_limit = queue_limit
        self._n_gpu_layers = n_gpu_layers
        self._weights = weights
        self._closed = False
        threads = n_threads or os.cpu_count() or 1
        adapter = weights.adapter_path if weights is not None else ""
        self._model = Model(model_path, n_gpu_layers=n_gpu_layers, adapter_path=adapter)
        try:
            self._ctx = new_context(
                self._model, n_ctx=slots * n_ctx_per_slot, n_batch=n_batch, n_seq_max=slots, n_threads=threads
            )
        except BaseException:
            self._model.free()
            raise
        self._n_ctx = llama_cpp.llama_n_ctx(self._ctx)
        self._template = ChatTemplate(
            self._model.chat_template,
            bos_token=self._model.special_text(self._model.bos),
            eos_token=self._model.special_text(self._model.eos),
        )
        self._prompts = PromptBuilder(self._template, self._model.control_texts)
        self._embedder = Embedder(self._model, n_ctx=n_ctx_per_slot, n_threads=threads) if embeddings else None
        self._loop = BatchLoop(
            self._model,
            self._ctx,
            name=name,
            n_slots=slots,
            n_batch=n_batch,
            queue_limit=queue_limit,
            queue_timeout_s=queue_timeout_s,
            energy_watts=energy_watts,
            drafts=drafts,
            decode_thread=decode_thread,
        )

    @classmethod
    async def open(cls, model_path: str, **kwargs: Any) -> LlamaEngine:
        """Load off the event loop."""
        return await asyncio.to_thread(cls, model_path, **kwargs)

    # ----- Engine protocol ----------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        if self._closed:
            raise EngineUnavailable(f"engine {self.name} is closed")
        if request.max_tokens < 1:
            raise InvalidGenerationRequest("max_tokens must be at least 1")
        tokens = list(request.tokens) if request.tokens else self.tokens_for(request)
        fit_completion(len(tokens), request.max_tokens, self.context_length, default=request.max_tokens)
        sampler = build_sampler(self._model, request.sampling)
        seq = Sequence(
            tokens=tokens,
            max_tokens=request.max_tokens,
            sampler=sampler,
            stops=tuple(request.stop),
            loop=asyncio.get_running_loop(),
            request_id=request.request_id,
        )
        try:
            self._loop.submit(seq)
        except BaseException:
            sampler.free()
            raise
        try:
            while True:
                item = await seq.queue.get()
                if isinstance(item, BaseException):
                    raise item
                for event in item:
                    yield event
                    if isinstance(event, Finished):
                        return
        finally:
            if seq.state != "done":
                self._loop.cancel(seq)

    async def embed(self, texts: list[str]) -> Embeddings:
        if self._embedder is None:
            raise EngineUnavailable(f"engine {self.name} does not serve embeddings")
        if self._closed:
            raise EngineUnavailable(f"engine {self.name} is closed")
        groups, n_tokens = self._embedder.plan(texts)
        vectors: list[list[float]] = []
        for group in groups:  # one group per call, so decode steps run in between
            run = functools.partial(self._embedder.run, group)
            vectors += await asyncio.wrap_future(self._loop.call(run, shared=True))
        return Embeddings(vectors=vectors, prompt_tokens=n_tokens)

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """Tokens as the engine feeds them for a completion prompt (special-token text is parsed)."""
        return self._model.tokenize(text, add_special=add_special, parse_special=True)

    def count_chat_tokens(self, messages: list[dict[str, Any]]) -> int:
        return len(self._chat_tokens(messages))

    @property
    def served_files(self) -> dict[str, str] | None:
        w = self._weights
        if w is None:
            return None
        files = {"encoding": w.encoding, "sha256": w.sha256}
        return files | {"adapter_sha256": w.adapter_sha256} if w.adapter_sha256 else files

    def health(self) -> EngineHealth:
        if self._closed:
            return EngineHealth(ok=False, detail="closed")
        if self._loop.failure or not self._loop.alive:
            return EngineHealth(ok=False, detail=self._loop.failure or "decode thread stopped")
        return EngineHealth(ok=True, detail=f"{self._loop.active_count}/{self._slots} slots busy")

    def stats(self) -> EngineStats:
        loop = self._loop
        slot_tokens = [len(s.tokens) for s in loop.slots.slots]
        return EngineStats(
            model=self.name,
            slots=self._slots,
            active_sequences=loop.active_count,
            queue_depth=loop.queue_depth,
            queue_limit=self._queue_limit,
            kv_cells_used=loop.slots.cells_used(),
            kv_cells_total=self._n_ctx,
            tokens_generated=loop.tokens_generated,
            requests_served=loop.requests_served,
            n_gpu_layers=self._n_gpu_layers,
            extra={
                "n_ctx_per_slot": self.context_length,
                "slot_tokens": slot_tokens,
                "prompt_tokens_cached": loop.prompt_tokens_cached,
                "decode_steps": loop.steps,
                "busy_slot_runs": loop.slots.runs(),  # llama.cpp micro-batches per decode step
                "slots_moved": loop.slots_moved,  # sequences moved to close gaps between busy slots
                "decode_busy_seconds": round(loop.busy_seconds, 3),
                "weights": self._weights.to_dict() if self._weights else None,
                "cpu_variant": self._model.backend.variant,  # llama.cpp CPU kernels (runtime.cpu)
                "buffer_types": self._model.buffer_types,  # MiB of weights per layout (CPU_REPACK: repacked)
                "drafts": loop.drafts.snapshot(),
            },
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._loop.stop)
        await asyncio.to_thread(self._free)

    # ----- helpers -------------------------------------------------------------------------

    async def clear_prefix_cache(self) -> None:
        """Forget the KV that idle slots keep for prefix reuse (running sequences are untouched)."""
        await asyncio.wrap_future(self._loop.call(self._loop.evict_idle))

    async def kv_pos_max(self) -> list[int]:
        """Highest KV position llama.cpp holds for each slot's sequence (-1: empty). For diagnostics and tests."""
        mem = llama_cpp.llama_get_memory(self._ctx)
        future = self._loop.call(lambda: [llama_cpp.llama_memory_seq_pos_max(mem, i) for i in range(self._slots)])
        return await asyncio.wrap_future(future)

    def tokens_for(self, request: GenerationRequest) -> list[int]:
        if (request.prompt is None) == (request.messages is None):
            raise InvalidGenerationRequest("set exactly one of prompt and messages")
        self._refuse_certain_overflow(request)
        if request.messages is not None:
            tokens = self._chat_tokens(request.messages)
        else:
            tokens = self.tokenize(request.prompt)
        if not tokens:  # empty prompt on a model that adds no BOS: start from BOS (or EOS) alone
            model = self._model
            tokens = [model.bos if model.bos >= 0 else model.eos]
        return tokens

    def _refuse_certain_overflow(self, request: GenerationRequest) -> None:
        """A prompt that cannot fit whatever it tokenises to is refused before the chat
        template and the tokeniser spend a core on it (a 4 MB prompt took about a second)."""
        if request.messages is not None:
            chars = sum(len(str(m.get("content") or "")) for m in request.messages)
        else:
            chars = len(request.prompt or "")
        at_least = chars // self._model.max_token_bytes
        if at_least > self.context_length:
            raise ContextOverflow(
                f"This model's maximum context length is {self.context_length} tokens; the prompt alone "
                f"is at least {at_least} tokens. Please reduce the length of the messages.",
                prompt_tokens=at_least,
                limit=self.context_length,
            )

    def _chat_tokens(self, messages: list[dict[str, Any]]) -> list[int]:
        model = self._model
        tokens: list[int] = []
        for text, special in self._prompts.segments(messages):
            tokens += model.tokenize(text, add_special=False, parse_special=special)
        if model.add_bos and model.bos >= 0 and (not tokens or tokens[0] != model.bos):
            tokens.insert(0, model.bos)
        return tokens

    def _free(self) -> None:
        if self._embedder is not None:
            self._embedder.close()
        llama_cpp.llama_free(self._ctx)
        self._model.free()
