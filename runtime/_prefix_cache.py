"""Bookkeeping of which tokens each KV sequence (slot) holds, to reuse shared prompt prefixes."""

from __future__ import annotations

from dataclasses import dataclass, field


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass(eq=False, slots=True)
class Slot:
    """One llama.cpp sequence id. `tokens[i]` is the token whose KV sits at position i."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    busy: bool = False
    last_used: int = 0


class SlotTable:
    """Chooses slots and prefix donors. Owned by the decode thread; readers take snapshots."""

    def __init__(self, n_slots: int) -> None:
        self.slots = [Slot(i) for i in range(n_slots)]
        self._clock = 0

    def free_count(self) -> int:
        return sum(1 for s in self.slots if not s.busy)

    def acquire(self, prompt: list[int]) -> Slot:
        """Take a free slot next to busy ones, then the one whose cached tokens share most with `prompt`.

        Busy slots in one run of consecutive seq ids decode as one llama.cpp micro-batch; every
        gap costs another pass over the weights, which is dearer than copying a prefix from
        another slot. Among equals: the longest cached prefix, then the emptiest, least recent.
        """
        free = [s for s in self.slots if not s.busy]
        slot = max(
            free,
            key=lambda s: (
                self._busy_neighbours(s.seq_id),
                common_prefix_len(s.tokens, prompt),
                -len(s.tokens),
                -s.last_used,
            ),
        )
        slot.busy = True
        self._clock += 1
        slot.last_used = self._clock
        return slot

    def _busy_neighbours(self, i: int) -> int:
        return sum(1 for j in (i - 1, i + 1) if 0 <= j < len(self.slots) and self.slots[j].busy)

    def runs(self) -> int:
        """Runs of consecutive busy slots: the micro-batches a decode step costs."""
        busy = [s.busy for s in self.slots]
        return sum(1 for i, b in enumerate(busy) if b and (i == 0 or not busy[i - 1]))

    def release(self, slot: Slot) -> None:
        slot.busy = False

    def gap(self) -> tuple[Slot, Slot] | None:
        """(highest busy slot, lowest free slot below it), or None when the busy slots are one run from 0."""
        free = next((s for s in self.slots if not s.busy), None)
        busy = next((s for s in reversed(self.slots) if s.busy), None)
        if free is None or busy is None or free.seq_id > busy.seq_id:
            return None
        return busy, free

    def move(self, src: Slot, dst: Slot) -> None:
        """Hand `src`'s occupant to free slot `dst`, whose KV now holds a copy of `src`'s;
        `src` keeps its tokens as an idle prefix cache."""
        dst.tokens = list(src.tokens)
        dst.busy, src.busy = True, False
        self._clock += 1
        dst.last_used = self._clock

    def best_donor(self, prompt: list[int]) -> tuple[Slot | None, int]:
        """The slot (busy or not) holding the longest prefix of `prompt`, and that length."""
        best, best_n = None, 0
        for s in self.slots:
            n = common_prefix_len(s.tokens, prompt)
            if n > best_n:
                best, best_n = s, n
        return best, best_n

    def cells_used(self) -> int:
        """KV cells in use: every slot keeps its own stream, so shared prefixes are counted per slot."""
        return sum(len(s.tokens) for s in self.slots)
