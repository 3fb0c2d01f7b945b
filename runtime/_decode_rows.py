"""Decode rows for the decode thread: one row per decoding sequence plus its drafted guesses,
sampled in order and kept while each guess is what was sampled; and compaction, which closes
gaps between busy slots before a step."""

from __future__ import annotations

import logging
from typing import Any

import llama_cpp

from ._drafts import DraftPolicy, PromptLookup
from ._prefix_cache import SlotTable
from ._sequence import Sequence
from .errors import GrammarDeadEnd

log = logging.getLogger("runtime._batch_loop")

# Undrafted steps of one sequence still guess (and check the guess) every this many steps,
# to keep the hit rate measured; every step would cost one stream about 1% of its speed.
# Wider steps guess every time: each sequence's own hit rate counts in the choice.
_SHADOW_EVERY = 4
_SEQ_HIT_WEIGHT = 0.1  # EWMA weight of one of a sequence's own guesses


class DecodeRows:
    """`BatchLoop`'s decoding half (a mixin: the state is the loop's)."""

    _active: list[Sequence]
    _waiting: Any
    _batch: Any
    _mem: Any
    _copying: bool
    ctx: Any
    slots: SlotTable
    drafts: DraftPolicy
    slots_moved: int
    steps: int
    # and from `Outbox`: _on_token(seq, token), _fail(seq, error)

    def _compact(self) -> None:
        """Close gaps between busy slots: move the sequence in the highest busy slot to the
        lowest free one. Every run of consecutive busy slots costs llama.cpp a pass over the
        weights (6 or 7 sequences with a gap: 33 ms a step, against 22 ms for 8 in one run),
        and a stream copy costs about a millisecond. Only with nobody waiting: otherwise a new
        request is about to fill the gap (`_admit` admits before every step)."""
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
