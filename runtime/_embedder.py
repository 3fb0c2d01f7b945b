"""Sentence embeddings from a second, small llama context on the same model (mean pooling)."""

from __future__ import annotations

import math
import threading

import llama_cpp

from ._native import Model, new_context
from .engine import Embeddings
from .errors import ContextOverflow, EngineUnavailable, InvalidGenerationRequest


class Embedder:
    """Created lazily; `embed` blocks, so callers run it in a worker thread. One call at a time."""

    def __init__(self, model: Model, *, n_ctx: int, n_threads: int, n_seq_max: int = 8) -> None:
        self._model = model
        self._n_ctx = n_ctx
        self._n_threads = n_threads
        self._n_seq_max = n_seq_max
        self._lock = threading.Lock()
        self._ctx = None
        self._batch = None

    def embed(self, texts: list[str]) -> Embeddings:
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise InvalidGenerationRequest("input must be a list of strings")
        token_lists = [self._tokens(t) for t in texts]
        with self._lock:
            if self._ctx is None:
                self._open()
            vectors: list[list[float]] = []
            group: list[list[int]] = []
            for tokens in token_lists:
                if group and (len(group) == self._n_seq_max or sum(map(len, group)) + len(tokens) > self._n_ctx):
                    vectors.extend(self._run(group))
                    group = []
                group.append(tokens)
            if group:
                vectors.extend(self._run(group))
        return Embeddings(vectors=vectors, prompt_tokens=sum(map(len, token_lists)))

    def _tokens(self, text: str) -> list[int]:
        tokens = self._model.tokenize(text, add_special=True)
        if not tokens:
            tokens = [self._model.bos if self._model.bos >= 0 else self._model.eos]
        if len(tokens) > self._n_ctx:
            raise ContextOverflow(
                f"input of {len(tokens)} tokens exceeds the embedding window of {self._n_ctx}",
                prompt_tokens=len(tokens),
                limit=self._n_ctx,
            )
        return tokens

    def _open(self) -> None:
        self._ctx = new_context(
            self._model,
            n_ctx=self._n_ctx,
            n_batch=self._n_ctx,
            n_seq_max=self._n_seq_max,
            n_threads=self._n_threads,
            embeddings=True,
        )
        self._batch = llama_cpp.llama_batch_init(self._n_ctx, 0, 1)

    def _run(self, group: list[list[int]]) -> list[list[float]]:
        batch, n = self._batch, 0
        for seq_id, tokens in enumerate(group):
            for pos, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = pos
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq_id
                batch.logits[n] = 1
                n += 1
        batch.n_tokens = n
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        rc = llama_cpp.llama_decode(self._ctx, batch)
        if rc != 0:
            raise EngineUnavailable(f"llama_decode returned {rc} while embedding")
        dim = self._model.n_embd
        out = []
        for seq_id in range(len(group)):
            ptr = llama_cpp.llama_get_embeddings_seq(self._ctx, seq_id)
            vec = ptr[:dim]
            norm = math.sqrt(sum(v * v for v in vec)) or 1.0
            out.append([v / norm for v in vec])
        return out

    def close(self) -> None:
        with self._lock:
            if self._batch is not None:
                llama_cpp.llama_batch_free(self._batch)
                self._batch = None
            if self._ctx is not None:
                llama_cpp.llama_free(self._ctx)
                self._ctx = None
