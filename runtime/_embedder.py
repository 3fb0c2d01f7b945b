"""Sentence embeddings from a second, small llama context on the same model (mean pooling)."""

from __future__ import annotations

import math
import threading

import llama_cpp

from ._native import Model, new_context
from .errors import ContextOverflow, EngineUnavailable, InvalidGenerationRequest

# Tokens per llama_decode. In embedding mode llama.cpp also computes and keeps a row of
# logits (49,152 floats for the default model) for every input token: one 900-token input
# took the process from 414 to 767 MB. Short inputs are packed up to this many tokens; a
# longer one runs alone, in chunks that continue its sequence, and its mean is the
# token-weighted mean of the chunks' means.
_CHUNK_TOKENS = 64


class Embedder:
    """Created lazily. `plan` runs anywhere; `run` must run on the decode thread (`BatchLoop.call`).

    llama.cpp computes on OpenMP threads, and libgomp keeps a team of them per calling thread.
    Once a second team exists (an embedding call from a worker thread), there are more OpenMP
    threads than cores, and libgomp cuts its spin-waiting at barriers to almost nothing for
    every team: chat ran at half speed for good after one embeddings request. Running
    embeddings on the decode thread, which every engine shares, taking turns with decode steps,
    keeps one team.
    """

    def __init__(self, model: Model, *, n_ctx: int, n_threads: int, n_seq_max: int = 8) -> None:
        self._model = model
        self._n_ctx = n_ctx
        self._n_threads = n_threads
        self._n_seq_max = n_seq_max
        self._lock = threading.Lock()
        self._ctx = None
        self._batch = None

    def plan(self, texts: list[str]) -> tuple[list[list[list[int]]], int]:
        """Tokenise and pack the inputs, in order, into groups of up to `n_seq_max` inputs and
        `_CHUNK_TOKENS` tokens (a longer input is a group of its own). Returns the groups and
        the token count."""
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise InvalidGenerationRequest("input must be a list of strings")
        token_lists = [self._tokens(t) for t in texts]
        groups: list[list[list[int]]] = []
        group: list[list[int]] = []
        for tokens in token_lists:
            if group and (len(group) == self._n_seq_max or sum(map(len, group)) + len(tokens) > _CHUNK_TOKENS):
                groups.append(group)
                group = []
            group.append(tokens)
        if group:
            groups.append(group)
        return groups, sum(map(len, token_lists))

    def run(self, group: list[list[int]]) -> list[list[float]]:
        """Unit-length mean-pooled embeddings of one group from `plan`."""
        with self._lock:
            if self._ctx is None:
                self._open()
            return self._run(group)

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
            n_batch=_CHUNK_TOKENS,
            n_seq_max=self._n_seq_max,
            n_threads=self._n_threads,
            embeddings=True,
        )
        self._batch = llama_cpp.llama_batch_init(_CHUNK_TOKENS, 0, 1)

    def _run(self, group: list[list[int]]) -> list[list[float]]:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        if len(group) == 1 and len(group[0]) > _CHUNK_TOKENS:
            return [_unit(self._long_mean(group[0]))]
        self._decode([(seq_id, 0, tokens) for seq_id, tokens in enumerate(group)])
        return [_unit(self._seq_mean(seq_id)) for seq_id in range(len(group))]

    def _long_mean(self, tokens: list[int]) -> list[float]:
        total = [0.0] * self._model.n_embd
        for start in range(0, len(tokens), _CHUNK_TOKENS):
            chunk = tokens[start : start + _CHUNK_TOKENS]
            self._decode([(0, start, chunk)])
            total = [t + v * len(chunk) for t, v in zip(total, self._seq_mean(0), strict=True)]
        return [t / len(tokens) for t in total]

    def _decode(self, pieces: list[tuple[int, int, list[int]]]) -> None:
        """One llama_decode of (seq_id, first position, tokens) pieces, every token an output."""
        batch, n = self._batch, 0
        for seq_id, start, tokens in pieces:
            for i, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = start + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq_id
                batch.logits[n] = 1
                n += 1
        batch.n_tokens = n
        rc = llama_cpp.llama_decode(self._ctx, batch)
        if rc != 0:
            raise EngineUnavailable(f"llama_decode returned {rc} while embedding")

    def _seq_mean(self, seq_id: int) -> list[float]:
        """The mean of the sequence's token embeddings over the last llama_decode."""
        return llama_cpp.llama_get_embeddings_seq(self._ctx, seq_id)[: self._model.n_embd]

    def close(self) -> None:
        with self._lock:
            if self._batch is not None:
                llama_cpp.llama_batch_free(self._batch)
                self._batch = None
            if self._ctx is not None:
                llama_cpp.llama_free(self._ctx)
                self._ctx = None


def _unit(vec: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]
