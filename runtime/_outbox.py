"""What the decode thread tells the event loops: tokens, the last `Finished`, errors; and how a
sequence leaves the batch. Events are collected per step and handed over in one thread-safe
call per event loop."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import llama_cpp

from ._native import Model
from ._prefix_cache import SlotTable
from ._sequence import Sequence
from .engine import Finished, FinishReason, TokenEvent
from .errors import EngineUnavailable, RuntimeFault

log = logging.getLogger("runtime._batch_loop")


def _deliver(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


class Outbox:
    """`BatchLoop`'s event half (a mixin: the state is the loop's)."""

    model: Model
    _active: list[Sequence]
    _dirty: list[Sequence]
    _batch: Any
    _mem: Any
    slots: SlotTable
    tokens_generated: int
    requests_served: int
    _avg_request_s: float

    def _on_token(self, seq: Sequence, token: int) -> None:
        if token in self.model.eog:
            self._finish(seq, "stop")
            return
        seq.completion_tokens += 1
        self.tokens_generated += 1
        if seq.lookup is not None:
            seq.lookup.push(token)
        text, stopped = seq.text.push(self.model.piece(token))
        if stopped:
            if text:
                self._post(seq, TokenEvent(text))
            self._finish(seq, "stop", flush=False)
            return
        self._post(seq, TokenEvent(text))
        if seq.completion_tokens >= seq.max_tokens:
            self._finish(seq, "length")
            return
        seq.pending = token

    def _finish(
        self,
        seq: Sequence,
        reason: FinishReason,
        *,
        flush: bool = True,
        clear_kv: bool = False,
        error: RuntimeFault | None = None,
    ) -> None:
        """Post the last text and the `Finished` event, then retire the sequence."""
        if flush:
            tail = seq.text.flush()
            if tail:
                self._post(seq, TokenEvent(tail))
        self._post(
            seq,
            Finished(
                reason=reason,
                prompt_tokens=len(seq.tokens),
                completion_tokens=seq.completion_tokens,
                cached_tokens=seq.cached_tokens,
                queue_seconds=seq.admitted_at - seq.enqueued_at,
                compute_seconds=seq.compute_seconds,
                energy_joules=seq.energy_joules,
                error=error,
            ),
        )
        self._retire(seq, clear_kv=clear_kv)
        elapsed = time.monotonic() - seq.admitted_at
        self._avg_request_s = 0.9 * self._avg_request_s + 0.1 * elapsed

    def _retire(self, seq: Sequence, *, clear_kv: bool) -> None:
        """Take a sequence out of the batch and free its sampler; `clear_kv` also frees its KV cells at once."""
        self._active.remove(seq)
        seq.state = "done"
        self._free_sampler(seq)
        slot = seq.slot
        if clear_kv:
            llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
            slot.tokens = []
        self.slots.release(slot)
        self.requests_served += 1

    def _fail_batch(self, participants: list[Sequence], rc: int) -> None:
        log.error("llama_decode returned %d for a batch of %d tokens", rc, self._batch.n_tokens)
        for seq in participants:
            self._fail(seq, EngineUnavailable(f"llama_decode failed ({rc})"))

    def _fail_active(self, detail: str) -> None:
        for seq in list(self._active):
            self._fail(seq, EngineUnavailable(detail))

    def _fail(self, seq: Sequence, error: RuntimeFault) -> None:
        """Before the first event the consumer gets `error` raised; after it, `Finished("error")`."""
        if seq.emitted or seq.outbox:
            self._finish(seq, "error", flush=False, clear_kv=True, error=error)
        else:
            self._post_error(seq, error)
            self._retire(seq, clear_kv=True)

    @staticmethod
    def _free_sampler(seq: Sequence) -> None:
        if seq.sampler is not None:
            seq.sampler.free()
            seq.sampler = None

    def _post(self, seq: Sequence, event: Any) -> None:
        if not seq.outbox:
            self._dirty.append(seq)
        seq.outbox.append(event)

    def _post_error(self, seq: Sequence, exc: BaseException) -> None:
        self._send(seq.loop, [(seq.queue, exc)])

    def _flush(self) -> None:
        """Hand this step's events to the event loops: one thread-safe call per loop per step."""
        if not self._dirty:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        for seq in self._dirty:
            by_loop.setdefault(seq.loop, []).append((seq.queue, seq.outbox))
            seq.outbox = []
            seq.emitted = True
        self._dirty = []
        for loop, items in by_loop.items():
            self._send(loop, items)

    @staticmethod
    def _send(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue, Any]]) -> None:
        try:
            loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:  # the consumer's loop is closed; nobody is listening
            pass
