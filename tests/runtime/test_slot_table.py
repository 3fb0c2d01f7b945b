"""Slot choice: busy slots stay in one run of seq ids (one llama.cpp micro-batch per decode step)."""

from __future__ import annotations

from runtime._prefix_cache import SlotTable

SYSTEM = list(range(100, 160))


def test_new_sequences_fill_the_hole_next_to_busy_slots() -> None:
    table = SlotTable(8)
    taken = [table.acquire([i]) for i in range(6)]
    assert table.runs() == 1
    table.release(taken[2])  # a request in the middle finishes
    assert table.runs() == 2
    refill = table.acquire([99])
    assert refill.seq_id == 2
    assert table.runs() == 1


def test_adjacency_beats_a_cached_prefix_in_a_distant_slot() -> None:
    table = SlotTable(8)
    slots = [table.acquire([i]) for i in range(8)]
    slots[6].tokens = SYSTEM + [1, 2, 3]  # slot 6 holds the shared system prompt
    for s in slots[3:]:
        table.release(s)
    # Slots 0-2 are busy, 3-7 free: slot 3 keeps one run; the prefix is copied from slot 6 instead.
    chosen = table.acquire(SYSTEM + [7, 8])
    assert chosen.seq_id == 3
    assert table.best_donor(SYSTEM + [7, 8]) == (slots[6], len(SYSTEM))


def test_among_equally_placed_slots_the_longest_prefix_wins() -> None:
    table = SlotTable(4)
    slots = [table.acquire([i]) for i in range(4)]
    slots[1].tokens = [5, 6, 7]
    slots[3].tokens = SYSTEM + [9]
    for s in slots:
        table.release(s)
    assert table.acquire(SYSTEM + [1]).seq_id == 3
