"""Prompt chunks for the decode thread, and prefix reuse: a new sequence starts from the longest
prefix whose KV is already computed, in its own slot or copied from another's stream."""

from __future__ import annotations

from typing import Any

import llama_cpp

from ._prefix_cache import Slot, SlotTable, common_prefix_len
from ._sequence import Sequence, slot_order

# A queued sequence whose prompt shares this many more tokens with a prompt still being
# prefilled than with any KV already computed waits a step, then copies that KV instead.
_DEFER_MIN_TOKENS = 16


class PrefillRows:
    """`BatchLoop`'s prefill half (a mixin: the state is the loop's)."""

    _active: list[Sequence]
    _batch: Any
    _mem: Any
    _copying: bool
    slots: SlotTable
    prompt_tokens_cached: int

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
        chosen.sort(key=slot_order)
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

    def evict_idle(self) -> bool:
        """Drop the prefix caches of idle slots to make room in the KV buffer."""
        evicted = False
        for slot in self.slots.slots:
            if not slot.busy and slot.tokens:
                llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
                slot.tokens = []
                evicted = True
        return evicted
