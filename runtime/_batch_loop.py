"""One engine's decode loop: one llama context, many sequences, one `llama_decode` per step
(continuous batching), stepped in turn with the other engines' loops on the shared decode
thread (`_decode_thread`). Its jobs are split by module: scheduling and accounting here, decode
rows, drafting and compaction in `_decode_rows`, prompt chunks and prefix reuse in `_prefill`,
the events to the event loops in `_outbox`, the sequence itself in `_sequence`."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import llama_cpp

from ._decode_rows import DecodeRows
from ._decode_thread import DecodeThread, shared_decode_thread
from ._drafts import DraftPolicy
from ._native import Model
from ._outbox import Outbox
from ._prefill import PrefillRows
from ._prefix_cache import SlotTable
from ._sequence import Sequence, slot_order
from .errors import EngineOverloaded, EngineUnavailable, GrammarDeadEnd

__all__ = ["BatchLoop", "Sequence"]

log = logging.getLogger(__name__)


def _settle(future: concurrent.futures.Future, fn: Callable[[], Any]) -> None:
    if future.set_running_or_notify_cancel():
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)


class BatchLoop(DecodeRows, PrefillRows, Outbox):
    """Owns the generation context, used only on the decode thread; the event loop talks to it
    through `submit`/`cancel`. Attaches to `decode_thread` (default: the process's shared one)
    at once and detaches when stopped."""

    def __init__(
        self,
        model: Model,
        ctx: int,
        *,
        name: str,
        n_slots: int,
        n_batch: int,
        queue_limit: int,
        queue_timeout_s: float,
        energy_watts: float,
        drafts: DraftPolicy | None = None,
        decode_thread: DecodeThread | None = None,
    ) -> None:
        self.name = name
        self.model = model
        self.ctx = ctx
        self.n_slots = n_slots
        self.n_batch = n_batch
        self.busy_prefill_chunk = max(64, n_batch // 4)
        self.queue_limit = queue_limit
        self.queue_timeout_s = queue_timeout_s
        self.energy_watts = energy_watts
        self.slots = SlotTable(n_slots)
        self.drafts = drafts or DraftPolicy(0, max_rows=n_batch)
        self.tokens_generated = 0
        self.requests_served = 0
        self.prompt_tokens_cached = 0
        self.steps = 0
        self.slots_moved = 0
        self._copying = False  # a stream copy is queued: the next llama_decode also performs it
        self._last_shape: tuple[int, int] | None = None  # (sequences, rows each) of the last decode step
        self.busy_seconds = 0.0  # inside llama_decode
        self.failure: str | None = None
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._decoder = decode_thread or shared_decode_thread()
        self._cond = self._decoder.cond  # one lock for every loop on the thread, so any of them can wake it
        self._waiting: deque[Sequence] = deque()
        self._active: list[Sequence] = []
        self._calls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        # Work that competes with decoding for the cores (embeddings): one item per step at
        # most, and only while it has used no more decode-thread time than decoding has.
        self._shared: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._shared_debt = 0.0
        self._dirty: list[Sequence] = []
        self._stopping = False
        self._avg_request_s = 2.0
        self._stopped = threading.Event()  # set once `_shutdown` has run
        self._decoder.attach(self)

    # ----- event-loop side ---------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active_count(self) -> int:
        return len(self._active)

    @property
    def alive(self) -> bool:
        return not self._stopping and self._decoder.alive

    def submit(self, seq: Sequence) -> None:
        """Queue a sequence, or raise `EngineOverloaded`/`EngineUnavailable` at once."""
        with self._cond:
            if self._stopping or not self._decoder.alive:
                raise EngineUnavailable("engine is closed")
            free = max(0, self.n_slots - len(self._active))
            if len(self._waiting) >= self.queue_limit + free:
                raise EngineOverloaded(
                    f"engine queue is full ({self.queue_limit} waiting)", retry_after=self._retry_after()
                )
            seq.state = "waiting"
            self._waiting.append(seq)
            self._cond.notify()

    def cancel(self, seq: Sequence) -> None:
        """The consumer went away: drop a waiting sequence now, an active one at the next step."""
        seq.cancelled = True
        with self._cond:
            if seq.state == "waiting":
                self._waiting.remove(seq)
                seq.state = "done"
                self._free_sampler(seq)
            self._cond.notify()

    def call(self, fn: Callable[[], Any], *, shared: bool = False) -> concurrent.futures.Future:
        """Run `fn` on the decode thread between two steps (for work that touches the context).

        `shared` marks compute that competes with decoding, such as an embedding batch: while
        sequences decode, such items take turns with decode steps, half the time each.
        """
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                future.set_exception(EngineUnavailable("engine is closed"))
                return future
            (self._shared if shared else self._calls).append((fn, future))
            self._cond.notify()
        return future

    def stop(self) -> None:
        """Stop the loop (blocking): waiting requests get `EngineUnavailable`, active ones `cancelled`.

        Called on the decode thread itself (from a `call`), it returns at once and the loop
        shuts down at its next turn.
        """
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if not self._decoder.on_thread():
            self._stopped.wait()

    def _retry_after(self) -> float:
        backlog = (len(self._waiting) + 1) / max(1, self.n_slots)
        return float(max(1, round(backlog * self._avg_request_s)))

    # ----- decode thread ------------------------------------------------------------------

    def has_work(self) -> bool:
        """Whether the decode thread should give this loop a turn (called with `_cond` held)."""
        return bool(self._stopping or self._calls or self._shared or self._active or self._waiting)

    def run_once(self) -> None:
        """One turn: queued calls, a shared item and one step; once stopping (or dead), the shutdown."""
        try:
            if self._admit():
                self._run_calls()
                self._run_shared()
                try:
                    self._step()
                except Exception as exc:  # a bug or a llama.cpp failure: fail what runs, keep serving
                    log.exception("decode step failed (%s)", self.name)
                    self._fail_active(f"decode step failed: {exc}")
                self._flush()
                return
        except BaseException as exc:  # last resort: this loop dies, the others keep serving
            log.exception("decode loop died (%s)", self.name)
            self.failure = f"decode loop died: {exc}"
        self._shutdown()

    def _admit(self) -> bool:
        """Expire and admit waiting sequences; False once stopping."""
        with self._cond:
            if self._stopping:
                return False
            now = time.monotonic()
            self._expire_waiting(now)
            while self._waiting and len(self._active) < self.n_slots:
                seq = self._waiting.popleft()
                seq.state = "active"
                seq.admitted_at = now
                seq.slot = self.slots.acquire(seq.tokens)
                self._active.append(seq)
            return True

    def _expire_waiting(self, now: float) -> None:
        while self._waiting and now - self._waiting[0].enqueued_at > self.queue_timeout_s:
            seq = self._waiting.popleft()
            seq.state = "done"
            self._free_sampler(seq)
            waited = now - seq.enqueued_at
            self._post_error(
                seq,
                EngineOverloaded(
                    f"request waited {waited:.1f}s in the queue (limit {self.queue_timeout_s:g}s)",
                    retry_after=self._retry_after(),
                ),
            )

    def _run_calls(self) -> None:
        while self._calls:
            with self._cond:
                fn, future = self._calls.popleft()
            _settle(future, fn)

    def _run_shared(self) -> None:
        if not self._shared or (self._active and self._shared_debt > 0):
            return
        with self._cond:
            fn, future = self._shared.popleft()
        t0 = time.perf_counter()
        _settle(future, fn)
        # Idle decoding owes nothing; otherwise decode steps pay this back before the next item.
        self._shared_debt = time.perf_counter() - t0 if self._active else 0.0

    def _step(self) -> None:
        """One step: a token for every decoding sequence, then a chunk of waiting prompts.

        The two go to separate `llama_decode` calls. With one KV stream per slot, llama.cpp
        splits a batch into micro-batches of equal tokens per sequence over consecutive seq
        ids; a prompt chunk riding along with decode tokens would be cut into one micro-batch
        per prompt token, and rows out of seq_id order into one micro-batch per run.
        """
        for seq in [s for s in self._active if s.cancelled]:
            self._retire(seq, clear_kv=True)
        self._compact()
        decoding = sorted((s for s in self._active if s.pending >= 0), key=slot_order)
        if decoding:
            k = 0
            if self.drafts.enabled:
                room = min(s.max_tokens - s.completion_tokens - 1 for s in decoding)
                overall = self.drafts.first_hit_rate
                first = sum(s.hit_rate if s.hit_rate >= 0 else overall for s in decoding) / len(decoding)
                k = self.drafts.choose(len(decoding), room, first)
            self._decode(self._fill_decode(decoding, k), decode_step=True)
            self._flush()  # the streams' tokens go out now, not after the prompt chunk
        budget = self.busy_prefill_chunk if decoding else self.n_batch
        prefilling = self._fill_prefill(budget)
        if prefilling:
            self._decode(prefilling)

    def _decode(self, participants: list[Sequence], *, decode_step: bool = False) -> None:
        """Run the filled batch, then account the time and sample for every row that wants logits."""
        batch = self._batch
        t0 = time.perf_counter()
        rc = llama_cpp.llama_decode(self.ctx, batch)
        if rc == 1 and self.evict_idle():
            rc = llama_cpp.llama_decode(self.ctx, batch)
        if rc != 0:
            self._fail_batch(participants, rc)
            return
        elapsed = time.perf_counter() - t0
        self.steps += 1
        self.busy_seconds += elapsed
        self._shared_debt -= elapsed
        n_tokens = batch.n_tokens
        shape = (len(participants), n_tokens // len(participants)) if decode_step else None
        # Only a step shaped like the call before it is timed: llama.cpp rebuilds its graph when
        # the shape changes, so the first step of a shape is slower, and a step that also
        # copied a KV stream did more than decode.
        if shape is not None and shape == self._last_shape and not self._copying:
            self.drafts.record_step(*shape, elapsed)
        self._last_shape = shape
        self._copying = False
        watts = self.energy_watts
        ctx = self.ctx
        for seq in participants:
            share = elapsed * (seq.chunk or 1 + len(seq.drafts)) / n_tokens
            seq.compute_seconds += share
            seq.energy_joules += share * watts
            if not seq.chunk:
                self._advance(seq)
                continue
            seq.slot.tokens.extend(seq.tokens[seq.n_past : seq.n_past + seq.chunk])
            seq.n_past += seq.chunk
            if seq.out_index >= 0:
                try:
                    token = seq.sampler.sample(ctx, seq.out_index)
                except GrammarDeadEnd as exc:
                    self._fail(seq, exc)
                    continue
                self._on_token(seq, token)

    def _shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), deque()
            calls, self._calls = list(self._calls) + list(self._shared), deque()
            self._shared = deque()
        try:
            for seq in waiting:
                seq.state = "done"
                self._free_sampler(seq)
                self._post_error(seq, EngineUnavailable("engine closed"))
            for seq in list(self._active):
                if seq.cancelled:
                    self._retire(seq, clear_kv=True)
                else:
                    self._finish(seq, "cancelled", flush=False)
            for _, future in calls:
                if future.set_running_or_notify_cancel():
                    future.set_exception(EngineUnavailable("engine closed"))
            self._flush()
            llama_cpp.llama_batch_free(self._batch)
        finally:
            self._decoder.detach(self)
            self._stopped.set()
