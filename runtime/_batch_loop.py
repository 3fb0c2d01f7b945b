"""The decode thread: one llama context, many sequences, one `llama_decode` per step (continuous batching)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import llama_cpp

from ._drafts import DraftPolicy, PromptLookup
from ._native import Model
from ._prefix_cache import Slot, SlotTable, common_prefix_len
from ._sampler import Sampler
from ._text import TextAssembler
from .engine import Finished, FinishReason, TokenEvent
from .errors import EngineOverloaded, EngineUnavailable, GrammarDeadEnd, RuntimeFault

log = logging.getLogger(__name__)

# A queued sequence whose prompt shares this many more tokens with a prompt still being
# prefilled than with any KV already computed waits a step, then copies that KV instead.
_DEFER_MIN_TOKENS = 16
# Undrafted steps of one sequence still guess (and check the guess) every this many steps,
# to keep the hit rate measured; every step would cost one stream about 1% of its speed.
# Wider steps guess every time: each sequence's own hit rate counts in the choice.
_SHADOW_EVERY = 4
_SEQ_HIT_WEIGHT = 0.1  # EWMA weight of one of a sequence's own guesses


class Sequence:
    """One generation request as the decode thread sees it.

    The event loop creates it and reads `queue`; everything else is the decode thread's,
    except `cancelled`, which the event loop sets.
    """

    __slots__ = (
        "request_id",
        "tokens",
        "max_tokens",
        "sampler",
        "text",
        "loop",
        "queue",
        "cancelled",
        "state",
        "enqueued_at",
        "admitted_at",
        "slot",
        "n_past",
        "started",
        "cached_tokens",
        "pending",
        "out_index",
        "chunk",
        "completion_tokens",
        "compute_seconds",
        "energy_joules",
        "outbox",
        "emitted",
        "lookup",
        "drafts",
        "guess",
        "hit_rate",
    )

    def __init__(
        self,
        *,
        tokens: list[int],
        max_tokens: int,
        sampler: Sampler,
        stops: tuple[str, ...],
        loop: asyncio.AbstractEventLoop,
        request_id: str = "",
    ) -> None:
        self.request_id = request_id
        self.tokens = tokens
        self.max_tokens = max_tokens
        self.sampler: Sampler | None = sampler
        self.text = TextAssembler(stops)
        self.loop = loop
        self.queue: asyncio.Queue[list[Any] | BaseException] = asyncio.Queue()
        self.cancelled = False
        self.state = "new"  # new -> waiting -> active -> done
        self.enqueued_at = time.monotonic()
        self.admitted_at = 0.0
        self.slot: Slot | None = None
        self.n_past = 0  # prompt/completion tokens whose KV is in the slot
        self.started = False  # prefill began (prefix reuse decided)
        self.cached_tokens = 0
        self.pending = -1  # sampled token not yet decoded
        self.out_index = -1  # batch row whose logits this sequence samples from
        self.chunk = 0  # prompt tokens this sequence put in the current batch
        self.completion_tokens = 0
        self.compute_seconds = 0.0
        self.energy_joules = 0.0
        self.outbox: list[Any] = []
        self.emitted = False
        self.lookup: PromptLookup | None = None  # built at the first decode step when drafting is on
        self.drafts: list[int] = []  # draft tokens in the rows after `pending` this step
        self.guess = -1  # the depth-1 guess, drafted or not (to measure how often guesses are right)
        self.hit_rate = -1.0  # how often this sequence's depth-1 guesses are right (-1: not seen yet)


def _slot_order(seq: Sequence) -> int:
    return seq.slot.seq_id


def _settle(future: concurrent.futures.Future, fn: Callable[[], Any]) -> None:
    if future.set_running_or_notify_cancel():
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)


def _deliver(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


class BatchLoop:
    """Owns the generation context on a private thread; the event loop talks to it through `submit`/`cancel`."""

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
    ) -> None:
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
        self._cond = threading.Condition()
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
        self._thread = threading.Thread(target=self._run, name=f"decode-{name}", daemon=True)
        self._thread.start()

    # ----- event-loop side ---------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active_count(self) -> int:
        return len(self._active)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, seq: Sequence) -> None:
        """Queue a sequence, or raise `EngineOverloaded`/`EngineUnavailable` at once."""
        with self._cond:
            if self._stopping or not self._thread.is_alive():
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
        """Stop the thread (blocking): waiting requests get `EngineUnavailable`, active ones `cancelled`."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    def _retry_after(self) -> float:
        backlog = (len(self._waiting) + 1) / max(1, self.n_slots)
        return float(max(1, round(backlog * self._avg_request_s)))

    # ----- decode thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._wait_for_work():
                self._run_calls()
                self._run_shared()
                try:
                    self._step()
                except Exception as exc:  # a bug or a llama.cpp failure: fail what runs, keep serving
                    log.exception("decode step failed")
                    self._fail_active(f"decode step failed: {exc}")
                self._flush()
        except BaseException as exc:  # pragma: no cover - last resort, keeps the process alive
            log.exception("decode thread died")
            self.failure = f"decode thread died: {exc}"
        finally:
            self._shutdown()

    def _wait_for_work(self) -> bool:
        with self._cond:
            while not self._stopping:
                now = time.monotonic()
                self._expire_waiting(now)
                if self._calls or self._shared or self._active or self._waiting:
                    break
                self._flush()
                self._cond.wait()  # idle: submit(), cancel(), call() and stop() notify
            if self._stopping:
                return False
            now = time.monotonic()
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
        decoding = sorted((s for s in self._active if s.pending >= 0), key=_slot_order)
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

    def _compact(self) -> None:
        """Close gaps between busy slots: move the sequence in the highest busy slot to the
        lowest free one. Every run of consecutive busy slots costs llama.cpp a pass over the
        weights (6 or 7 sequences with a gap: 33 ms a step, against 22 ms for 8 in one run),
        and a stream copy costs about a millisecond. Only with nobody waiting: otherwise a new
        request is about to fill the gap (`_wait_for_work` admits before every step)."""
        if self._waiting:
            return
        while (gap := self.slots.gap()) is not None:
            src, dst = gap
            seq = next((s for s in self._active if s.slot is src), None)
            if seq is None:  # cannot happen: every busy slot has its sequence; never fail a step over it
                log.error("busy slot %d has no sequence", src.seq_id)
                return
            if seq.started:  # its KV follows it; a sequence not yet prefilled just changes slot
                llama_cpp.llama_memory_seq_rm(self._mem, dst.seq_id, -1, -1)
                llama_cpp.llama_memory_seq_cp(self._mem, src.seq_id, dst.seq_id, -1, -1)
                self._copying = True
                self.slots.move(src, dst)
            else:
                dst.busy, src.busy = True, False
            seq.slot = dst
            self.slots_moved += 1

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

    def _advance(self, seq: Sequence) -> None:
        """Sample a decoding sequence's row, then its draft rows for as long as each draft
        equals the token just sampled (see `_drafts`); drop the KV of the drafts that were not."""
        seq.slot.tokens.append(seq.pending)
        seq.n_past += 1
        drafts, policy = seq.drafts, self.drafts
        kept = 0
        for i in range(len(drafts) + 1):
            try:
                token = seq.sampler.sample(self.ctx, seq.out_index + i)
            except GrammarDeadEnd as exc:
                self._fail(seq, exc)
                break
            guess = drafts[i] if i < len(drafts) else seq.guess if i == 0 else -1
            if guess >= 0:
                hit = token == guess
                policy.record_guess(i + 1, hit)
                if i == 0:
                    rate = seq.hit_rate if seq.hit_rate >= 0 else policy.first_hit_rate
                    seq.hit_rate = rate + _SEQ_HIT_WEIGHT * (hit - rate)
            self._on_token(seq, token)
            if seq.state == "done" or i == len(drafts) or token != drafts[i]:
                break
            seq.slot.tokens.append(token)  # the draft row already holds this token's KV
            seq.n_past += 1
            kept += 1
        if drafts:
            policy.record_drafts(len(drafts), kept)
            llama_cpp.llama_memory_seq_rm(self._mem, seq.slot.seq_id, seq.n_past, -1)
            seq.drafts = []

    def _fill_decode(self, decoding: list[Sequence], k: int) -> list[Sequence]:
        """A row per decoding sequence, then its `k` draft rows, in seq_id order."""
        batch = self._batch
        tok, pos, nseq, sid, want = batch.token, batch.pos, batch.n_seq_id, batch.seq_id, batch.logits
        indexing = self.drafts.enabled
        guessing = k > 0 or (indexing and (len(decoding) > 1 or self.steps % _SHADOW_EVERY == 0))
        n = 0
        for seq in decoding:
            seq.out_index = n
            seq.chunk = 0
            row = [seq.pending]
            if indexing and seq.lookup is None:
                seq.lookup = PromptLookup(seq.tokens + row)
            seq.guess = -1
            if guessing:
                guesses = seq.lookup.propose(max(k, 1))
                seq.guess = guesses[0]
                seq.drafts = guesses[:k]
                row += seq.drafts
            seq_id, start = seq.slot.seq_id, seq.n_past
            for j, token in enumerate(row):
                tok[n] = token
                pos[n] = start + j
                nseq[n] = 1
                sid[n][0] = seq_id
                want[n] = 1
                n += 1
        batch.n_tokens = n
        return decoding

    def _fill_prefill(self, budget: int) -> list[Sequence]:
        """Prompt chunks, first come first served up to `budget` tokens, laid out in seq_id order."""
        chosen: list[Sequence] = []
        for seq in self._active:
            if budget <= 0:
                break
            if seq.pending >= 0:
                continue
            if not seq.started:
                if self._should_defer(seq, chosen):
                    continue
                self._start_prefill(seq)
            seq.chunk = min(budget, len(seq.tokens) - seq.n_past)
            budget -= seq.chunk
            chosen.append(seq)
        chosen.sort(key=_slot_order)
        batch = self._batch
        tok, pos, nseq, sid, want = batch.token, batch.pos, batch.n_seq_id, batch.seq_id, batch.logits
        n = 0
        for seq in chosen:
            seq_id, prompt, start, take = seq.slot.seq_id, seq.tokens, seq.n_past, seq.chunk
            for j in range(take):
                tok[n + j] = prompt[start + j]
                pos[n + j] = start + j
                nseq[n + j] = 1
                sid[n + j][0] = seq_id
                want[n + j] = 0
            n += take
            if start + take == len(prompt):
                want[n - 1] = 1
                seq.out_index = n - 1
            else:
                seq.out_index = -1
        batch.n_tokens = n
        return chosen

    def _should_defer(self, seq: Sequence, chosen: list[Sequence]) -> bool:
        """Wait a step when a prompt being prefilled in this batch holds a longer prefix than any
        KV already computed; next step the KV is there to copy instead of being computed twice."""
        _, have = self.slots.best_donor(seq.tokens)
        for other in chosen:
            if common_prefix_len(other.tokens, seq.tokens) > have + _DEFER_MIN_TOKENS:
                return True
        return False

    def _start_prefill(self, seq: Sequence) -> None:
        """Reuse the longest cached prefix: trim the slot's own KV, or copy a donor slot's stream and trim it."""
        mem, slot, prompt = self._mem, seq.slot, seq.tokens
        limit = len(prompt) - 1  # the last prompt token is always evaluated, for its logits
        own = min(common_prefix_len(slot.tokens, prompt), limit)
        if own and self._pos_min(slot) != 0:  # the cache dropped early positions (sliding window)
            own = 0
        donor, n_donor = self.slots.best_donor(prompt)
        n_donor = min(n_donor, limit)
        if donor is not None and donor is not slot and n_donor > own and self._pos_min(donor) == 0:
            # Streams copy whole (a partial cross-stream seq_cp aborts in llama.cpp); the copy
            # itself happens at the next llama_decode, the trim is bookkeeping on the cells.
            llama_cpp.llama_memory_seq_rm(mem, slot.seq_id, -1, -1)
            llama_cpp.llama_memory_seq_cp(mem, donor.seq_id, slot.seq_id, -1, -1)
            self._copying = True
            slot.tokens = list(donor.tokens)
            own = n_donor
        if llama_cpp.llama_memory_seq_rm(mem, slot.seq_id, own, -1):
            reused = own
        else:  # the memory cannot drop a tail (recurrent models): start clean
            llama_cpp.llama_memory_seq_rm(mem, slot.seq_id, -1, -1)
            reused = 0
        slot.tokens = prompt[:reused]
        seq.n_past = reused
        seq.cached_tokens = reused
        seq.started = True
        self.prompt_tokens_cached += reused

    def _pos_min(self, slot: Slot) -> int:
        return llama_cpp.llama_memory_seq_pos_min(self._mem, slot.seq_id)

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

    def evict_idle(self) -> bool:
        """Drop the prefix caches of idle slots to make room in the KV buffer."""
        evicted = False
        for slot in self.slots.slots:
            if not slot.busy and slot.tokens:
                llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
                slot.tokens = []
                evicted = True
        return evicted

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

    def _shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), deque()
            calls, self._calls = list(self._calls) + list(self._shared), deque()
            self._shared = deque()
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
