"""Speculative decoding by prompt lookup: the guesses, the policy, and on the real model that
answers never change, whatever is drafted, and that no guessed token's KV outlives its step."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from runtime import GenerationRequest, SamplingParams
from runtime._drafts import EXPLORE_EVERY, DraftPolicy, PromptLookup
from runtime.llama_engine import JSON_OBJECT_GRAMMAR, LlamaEngine
from tests.runtime.test_batching import GREEDY, request, text_of, wait_idle

MEMO = (
    "Our office will be closed on Friday for maintenance of the heating system. Staff who need "
    "access to the building should contact the facilities team before Thursday noon."
)
COPYING = f"Repeat this text exactly, word for word: {MEMO}"


# ----- guesses ----------------------------------------------------------------------------


def test_lookup_proposes_what_followed_the_longest_earlier_match() -> None:
    lookup = PromptLookup([1, 2, 3, 4, 9, 2, 3, 5, 7, 2, 3])
    # (2, 3) was last followed by 5; the triple (7, 2, 3) never occurred before.
    assert lookup.propose(1) == [5]
    lookup.push(5)  # tail (2, 3, 5): followed by 7 last time, then (3, 5, 7) by 2
    assert lookup.propose(3) == [7, 2, 3]


def test_lookup_prefers_the_longer_context_and_repeats_when_nothing_matches() -> None:
    lookup = PromptLookup([8, 1, 2, 9, 1, 3])  # 1 -> 3 (latest), but (8, 1) -> 2
    lookup.push(8)
    lookup.push(1)
    assert lookup.propose(1) == [2]
    fresh = PromptLookup([4, 5, 6])
    assert fresh.propose(2) == [6, 6]  # no earlier 6: guess the last token again


# ----- policy -----------------------------------------------------------------------------


def _measured(policy: DraftPolicy, costs: dict[tuple[int, int], float], hit_rate: float) -> None:
    for i in range(400):  # shadow guesses at depth 1, and real ones deeper
        hit = int((i + 1) * hit_rate) > int(i * hit_rate)  # evenly spread
        policy.record_guess(1, hit)
        policy.record_guess(2, hit)
    for _ in range(64):  # a long-running engine has measured each shape many times
        for (n, rows), seconds in costs.items():
            policy.choose(n, room=100)  # as the decode loop does before every step it times
            policy.record_step(n, rows, seconds)
    for _ in range(8):  # rankings are reused for a few steps: let the last one age out
        policy.choose(n, room=100)


def test_policy_drafts_where_a_wider_step_costs_little() -> None:
    policy = DraftPolicy(2, max_rows=512)
    # The build machine: 8 rows 22 ms, 8 x 2 rows 25.6 ms, 8 x 3 rows 38 ms.
    _measured(policy, {(8, 1): 0.022, (8, 2): 0.0256, (8, 3): 0.038}, hit_rate=0.45)
    choices = [policy.choose(8, room=100) for _ in range(4 * EXPLORE_EVERY)]
    # One guess per sequence, except that the close runner-up (no drafts) is re-timed, for two
    # steps, every EXPLORE_EVERY steps.
    assert choices.count(1) == 4 * EXPLORE_EVERY - 8 and choices.count(0) == 8


def test_policy_re_times_the_undrafted_step_while_drafting_and_stops_when_it_no_longer_pays() -> None:
    policy = DraftPolicy(1, max_rows=512)
    # Undrafted steps timed at long contexts (30 ms), then the context shrinks: 8 x 2 rows
    # take 24 ms and look cheaper than one row each. Truly, one row each now takes 18 ms.
    _measured(policy, {(8, 1): 0.030, (8, 2): 0.024}, hit_rate=0.35)
    assert policy.snapshot()["step_cost_vs_undrafted"]["8x2"] >= 1.0  # never cheaper than fewer rows
    choices = []
    for _ in range(4 * EXPLORE_EVERY):
        k = policy.choose(8, room=100)
        choices.append(k)
        policy.record_step(8, k + 1, 0.024 if k else 0.018)
    assert 0 in choices[: 2 * EXPLORE_EVERY + 2]  # the stale base is re-timed, though drafting looked best
    # 1.35 tokens for 1.33 times the time does not pay: only the close runner-up's re-timing drafts
    assert choices[-2 * EXPLORE_EVERY :].count(1) == 4


def test_policy_does_not_draft_where_rows_cost_what_they_would_alone() -> None:
    policy = DraftPolicy(2, max_rows=512)
    # One stream on a CPU: two rows cost twice one; drafting cannot pay at any hit rate below 1.
    _measured(policy, {(1, 1): 0.0055, (1, 2): 0.012, (1, 3): 0.0165}, hit_rate=0.6)
    assert {policy.choose(1, room=100) for _ in range(4 * EXPLORE_EVERY)} == {0}


def test_policy_tries_unmeasured_shapes_for_two_steps_then_follows_the_measurements() -> None:
    policy = DraftPolicy(2, max_rows=512)
    # Each trial runs twice: the loop times only a step shaped like the one before it.
    assert [policy.choose(4, room=100) for _ in range(2)] == [0, 0]
    policy.record_step(4, 1, 0.018)
    assert [policy.choose(4, room=100) for _ in range(2)] == [1, 1]
    policy.record_step(4, 2, 0.040)  # wider steps turned out dear
    assert [policy.choose(4, room=100) for _ in range(2)] == [2, 2]
    policy.record_step(4, 3, 0.060)
    assert policy.choose(4, room=100) == 0


def test_policy_does_not_time_steps_whose_choice_the_last_tokens_forced() -> None:
    policy = DraftPolicy(2, max_rows=512)
    policy.choose(4, room=100)
    policy.choose(4, room=100)
    policy.record_step(4, 1, 0.018)
    policy.choose(4, room=0)  # a sequence on its last token: no drafts, and the longest context
    policy.record_step(4, 1, 0.040)
    assert [policy.choose(4, room=100) for _ in range(2)] == [1, 1]
    policy.record_step(4, 2, 0.021)
    assert policy.snapshot()["step_cost_vs_undrafted"] == {"4x2": round(0.021 / 0.018, 3)}


def test_policy_respects_room_batch_size_and_fixed_mode() -> None:
    policy = DraftPolicy(3, max_rows=16, fixed=3)
    assert policy.choose(2, room=100) == 3
    assert policy.choose(2, room=1) == 1  # a sequence one token from max_tokens
    assert policy.choose(8, room=100) == 1  # 8 x 2 rows fill the batch
    assert policy.choose(16, room=100) == 0
    assert DraftPolicy(0, max_rows=512).choose(8, room=100) == 0
    with pytest.raises(ValueError):
        DraftPolicy(2, max_rows=512, fixed=3)


# ----- on the real model --------------------------------------------------------------------


@pytest.fixture(scope="module")
def drafting(served_weights) -> Iterator[LlamaEngine]:
    """Always three guesses per sequence and step: every draft path runs, not only the ones that pay."""
    eng = LlamaEngine(
        served_weights.path,
        name="smol-drafting",
        slots=8,
        n_ctx_per_slot=1024,
        always_draft=True,
        weights=served_weights,
    )
    yield eng
    asyncio.run(eng.close())


@pytest.fixture(scope="module")
def plain(served_weights) -> Iterator[LlamaEngine]:
    eng = LlamaEngine(
        served_weights.path, name="smol-plain", slots=8, n_ctx_per_slot=1024, draft_tokens=0, weights=served_weights
    )
    yield eng
    asyncio.run(eng.close())


def _answers(engine: LlamaEngine, reqs: list[GenerationRequest]) -> list[tuple[str, str, int]]:
    async def scenario() -> list[tuple[str, str, int]]:
        done = await asyncio.gather(*(text_of(engine, r) for r in reqs))
        await wait_idle(engine)
        return [(text, fin.reason, fin.completion_tokens) for text, fin in done]

    return asyncio.run(scenario())


def _mixed_requests() -> list[GenerationRequest]:
    return [
        request(COPYING, max_tokens=60, sampling=GREEDY),
        request("Write a long story about a lighthouse.", max_tokens=48, sampling=GREEDY),
        request(COPYING, max_tokens=37, sampling=SamplingParams(temperature=0.8, seed=11)),
        request("Write a haiku about rain.", max_tokens=40, sampling=SamplingParams(temperature=1.2, seed=3)),
        request(COPYING, max_tokens=50, sampling=GREEDY, stop=("heating",)),
        request(
            f"Reply with a JSON object that has the key memo: {MEMO}",
            max_tokens=45,
            sampling=SamplingParams(temperature=0, grammar=JSON_OBJECT_GRAMMAR),
        ),
        request(
            "Count from one to thirty in words.",
            max_tokens=55,
            sampling=SamplingParams(temperature=0, repeat_penalty=1.3),
        ),
        request(COPYING, max_tokens=9, sampling=GREEDY),
    ]


def test_drafting_never_changes_an_answer(drafting: LlamaEngine, plain: LlamaEngine, engine: LlamaEngine) -> None:
    reqs = _mixed_requests()
    without = _answers(plain, reqs)
    assert _answers(drafting, reqs) == without  # every step drafts 3 tokens per sequence
    assert _answers(engine, reqs) == without  # the default: drafts as measured to pay
    stopped = without[4]
    assert "heating" not in stopped[0] and stopped[1] == "stop"
    assert without[7][1:] == ("length", 9)
    stats = drafting.stats().extra["drafts"]
    assert stats["drafted"] > 0
    # Three rows a step, and the rows after a wrong guess count as drafted too: about a quarter kept.
    assert stats["kept"] > 0.15 * stats["drafted"]
    assert plain.stats().extra["drafts"]["drafted"] == 0


def test_drafted_steps_take_fewer_decode_calls_when_the_answer_copies(
    drafting: LlamaEngine, plain: LlamaEngine
) -> None:
    req = request(COPYING, max_tokens=40, sampling=GREEDY)
    steps = []
    for eng in (plain, drafting):
        before = eng.stats().extra["decode_steps"]
        _answers(eng, [req])
        steps.append(eng.stats().extra["decode_steps"] - before)
    assert steps[1] < 0.75 * steps[0]


def test_rejected_guesses_leave_no_kv_behind_and_the_prefix_cache_stays_exact(
    drafting: LlamaEngine, plain: LlamaEngine
) -> None:
    reqs = _mixed_requests()
    _answers(drafting, reqs)
    lengths = drafting.stats().extra["slot_tokens"]
    assert asyncio.run(drafting.kv_pos_max()) == [n - 1 for n in lengths]
    # A follow-up that extends an earlier conversation reuses the cached KV: same answer as
    # an engine computing it from scratch.
    follow = request(COPYING, max_tokens=30, sampling=GREEDY)
    asyncio.run(plain.clear_prefix_cache())
    assert _answers(drafting, [follow]) == _answers(plain, [follow])


def test_a_gap_between_busy_slots_is_closed_and_answers_stay(plain: LlamaEngine, monkeypatch) -> None:
    # Short and long answers together: when the short ones finish with nobody waiting, the
    # long ones are moved down so that a decode step stays one run of consecutive slots (one
    # llama.cpp micro-batch) instead of four.
    import runtime._batch_loop as batch_loop

    topics = ["owls", "copper", "jazz", "rivers", "chess", "bread", "volcanoes", "the moon"]
    reqs = [
        request(f"Tell me about {t}.", max_tokens=8 if i % 2 else 64, sampling=GREEDY) for i, t in enumerate(topics)
    ]
    alone = [_answers(plain, [r])[0] for r in reqs]
    asyncio.run(plain.clear_prefix_cache())
    moved = plain.stats().extra["slots_moved"]
    runs_per_decode_step: list[int] = []
    real_decode = batch_loop.llama_cpp.llama_decode

    def recording_decode(ctx, batch):
        if all(batch.logits[i] for i in range(batch.n_tokens)):  # decode rows only, no prompt chunk
            ids = sorted({batch.seq_id[i][0] for i in range(batch.n_tokens)})
            runs_per_decode_step.append(1 + sum(b != a + 1 for a, b in zip(ids, ids[1:], strict=False)))
        return real_decode(ctx, batch)

    monkeypatch.setattr(batch_loop.llama_cpp, "llama_decode", recording_decode)
    assert _answers(plain, reqs) == alone
    assert plain.stats().extra["slots_moved"] > moved
    split = sum(runs > 1 for runs in runs_per_decode_step)
    assert len(runs_per_decode_step) > 50
    assert split <= 2, runs_per_decode_step  # at most while prompts are still being admitted
