"""Continuous batching on the real model: batch invariance, cancellation, admission control, shutdown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from runtime import (
    EngineOverloaded,
    EngineUnavailable,
    Finished,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)
from runtime.llama_engine import LlamaEngine

GREEDY = SamplingParams(temperature=0)
# Forces a long answer: the grammar cannot end before 300 letter-digit pairs.
LONG_GRAMMAR = "root ::= ([a-z] [0-9]){300}"


def request(text: str, max_tokens: int = 24, **kwargs) -> GenerationRequest:
    return GenerationRequest(max_tokens=max_tokens, messages=[{"role": "user", "content": text}], **kwargs)


async def text_of(engine: LlamaEngine, req: GenerationRequest) -> tuple[str, Finished]:
    text, finished = "", None
    async for event in engine.generate(req):
        if isinstance(event, TokenEvent):
            text += event.text
        else:
            finished = event
    assert finished is not None
    return text, finished


async def wait_idle(engine: LlamaEngine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.stats().active_sequences or engine.stats().queue_depth:
        assert time.monotonic() < deadline, "engine did not go idle"
        await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def original_engine(model_path: str) -> Iterator[LlamaEngine]:
    """The registered Q4_1 file as it is (`weights = "original"`): its matrix products take
    ggml's per-column path, not tinyBLAS, so batch invariance is checked on it too."""
    eng = LlamaEngine(model_path, name="smol-q4_1", slots=8, n_ctx_per_slot=1024)
    yield eng
    asyncio.run(eng.close())


@pytest.fixture(params=["served", "original"])
def either_engine(request: pytest.FixtureRequest) -> LlamaEngine:
    return request.getfixturevalue("engine" if request.param == "served" else "original_engine")


def test_eight_concurrent_greedy_requests_match_each_run_alone(either_engine: LlamaEngine) -> None:
    engine = either_engine
    topics = ["volcanoes", "the moon", "bread", "chess", "rivers", "owls", "copper", "jazz"]
    reqs = [request(f"Tell me one fact about {t}.", max_tokens=32, sampling=GREEDY) for t in topics]

    async def scenario() -> tuple[list[str], list[str]]:
        alone = [(await text_of(engine, r))[0] for r in reqs]
        await engine.clear_prefix_cache()
        together = await asyncio.gather(*(text_of(engine, r) for r in reqs))
        return alone, [t for t, _ in together]

    alone, together = asyncio.run(scenario())
    assert all(alone)
    assert together == alone


def test_same_seed_is_reproducible_under_batching(engine: LlamaEngine) -> None:
    sampled = request("Write a haiku about rain.", max_tokens=24, sampling=SamplingParams(temperature=1.0, seed=7))
    others = [request(f"Count to {n}.", max_tokens=24, sampling=GREEDY) for n in range(3, 8)]

    async def scenario() -> tuple[str, str]:
        alone, _ = await text_of(engine, sampled)
        results = await asyncio.gather(text_of(engine, sampled), *(text_of(engine, r) for r in others))
        return alone, results[0][0]

    alone, batched = asyncio.run(scenario())
    assert alone == batched


def test_closing_streams_cancels_and_frees_kv(engine: LlamaEngine) -> None:
    async def scenario() -> tuple[list[int], Finished]:
        await wait_idle(engine)
        streams = [
            engine.generate(request(f"Write a long poem about the number {i}.", max_tokens=200, sampling=GREEDY))
            for i in range(8)
        ]
        for stream in streams:  # every stream running, a few tokens in
            for _ in range(3):
                assert isinstance(await anext(stream), TokenEvent)
        assert engine.stats().active_sequences == 8
        assert engine.stats().extra["busy_slot_runs"] == 1  # all eight decode as one micro-batch
        for stream in streams:
            await stream.aclose()
        await wait_idle(engine)
        positions = await engine.kv_pos_max()
        _, after = await text_of(engine, request("Say hello.", max_tokens=8, sampling=GREEDY))
        return positions, after

    positions, after = asyncio.run(scenario())
    assert positions == [-1] * 8  # llama.cpp itself holds no cell for any of the eight sequences
    assert after.completion_tokens >= 1


def test_cancelling_the_consumer_task_mid_prefill_frees_the_slot(engine: LlamaEngine) -> None:
    async def consume() -> None:
        async for _ in engine.generate(request("tell me about it " * 150, max_tokens=16, sampling=GREEDY)):
            pass

    async def scenario() -> tuple[int, int]:
        await wait_idle(engine)
        task = asyncio.create_task(consume())
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_idle(engine)
        _, finished = await text_of(engine, request("Say hi.", max_tokens=4, sampling=GREEDY))
        return engine.stats().active_sequences, finished.completion_tokens

    active, completion = asyncio.run(scenario())
    assert active == 0 and completion >= 1


def test_decode_rows_run_in_slot_order_and_apart_from_prompt_chunks(engine: LlamaEngine, monkeypatch) -> None:
    """With a KV stream per slot, llama.cpp runs a batch as micro-batches over consecutive seq ids
    with equal rows per sequence: rows out of slot order, or a prompt chunk sharing a call with
    decode rows, multiply the passes over the weights (8 decode rows once took 70 ms, not 36)."""
    import runtime._batch_loop as batch_loop

    calls: list[list[tuple[int, int, bool]]] = []
    real_decode = batch_loop.llama_cpp.llama_decode

    def recording_decode(ctx, batch):  # the real llama_decode, with its rows noted
        calls.append([(batch.seq_id[i][0], batch.pos[i], bool(batch.logits[i])) for i in range(batch.n_tokens)])
        return real_decode(ctx, batch)

    monkeypatch.setattr(batch_loop.llama_cpp, "llama_decode", recording_decode)
    lengths = [6, 30, 12, 40, 9, 24, 16, 36, 8, 28, 14, 20]  # requests end at different steps: slots free out of order
    gate = asyncio.Semaphore(8)

    async def one(i: int, n: int) -> Finished:
        async with gate:
            _, finished = await text_of(
                engine, request(f"List {n} animals, number {i}.", max_tokens=n, sampling=GREEDY)
            )
            return finished

    async def scenario() -> list[Finished]:
        await wait_idle(engine)
        return await asyncio.gather(*(one(i, n) for i, n in enumerate(lengths)))

    results = asyncio.run(scenario())
    assert all(f.reason in ("stop", "length") for f in results)
    previous: dict[int, tuple[int, bool]] = {}  # slot -> (last position, that row wanted logits)
    out_of_order = mixed = 0
    for rows in calls:
        ids = [sid for sid, _, _ in rows]
        out_of_order += ids != sorted(ids)
        has_prompt_rows = any(not want for _, _, want in rows)
        per_slot = {sid: ids.count(sid) for sid in ids}
        for sid, pos, _ in rows:
            last = previous.get(sid)
            decoding = per_slot[sid] == 1 and last is not None and last[1] and pos == last[0] + 1
            mixed += has_prompt_rows and decoding
        for sid, pos, want in rows:
            previous[sid] = (pos, want)
    assert len({sid for rows in calls for sid, _, _ in rows}) == 8
    assert out_of_order == 0
    assert mixed == 0


@pytest.fixture(scope="module")
def tiny(model_path: str) -> Iterator[LlamaEngine]:
    """One slot, one queue place, a short queue timeout."""
    eng = LlamaEngine(model_path, name="tiny", slots=1, n_ctx_per_slot=1024, queue_limit=1, queue_timeout_s=0.5)
    yield eng
    asyncio.run(eng.close())


def test_full_queue_and_queue_timeout_raise_overloaded(tiny: LlamaEngine) -> None:
    long_req = request(
        "Write letters and digits.", max_tokens=600, sampling=SamplingParams(temperature=0, grammar=LONG_GRAMMAR)
    )

    async def scenario() -> tuple[EngineOverloaded, EngineOverloaded, float, Finished]:
        running = tiny.generate(long_req)
        assert isinstance(await anext(running), TokenEvent)  # occupies the only slot
        queued = asyncio.create_task(text_of(tiny, request("Hi", max_tokens=4)))
        while tiny.stats().queue_depth == 0:
            await asyncio.sleep(0.005)
        with pytest.raises(EngineOverloaded) as full:
            await anext(tiny.generate(request("Hello", max_tokens=4)))
        started = time.monotonic()
        with pytest.raises(EngineOverloaded) as timed_out:
            await queued
        waited = time.monotonic() - started
        await running.aclose()
        await wait_idle(tiny)
        _, finished = await text_of(tiny, request("Hello", max_tokens=4, sampling=GREEDY))
        return full.value, timed_out.value, waited, finished

    full, timed_out, waited, finished = asyncio.run(scenario())
    assert full.retry_after >= 1 and "full" in str(full)
    assert "waited" in str(timed_out)
    assert waited < 5
    assert finished.completion_tokens >= 1
    assert tiny.stats().queue_depth == 0


def test_close_cancels_running_and_waiting_requests(model_path: str) -> None:
    eng = LlamaEngine(model_path, name="closing", slots=1, n_ctx_per_slot=1024, queue_limit=4)
    long_req = request(
        "Write letters and digits.", max_tokens=600, sampling=SamplingParams(temperature=0, grammar=LONG_GRAMMAR)
    )

    async def scenario() -> tuple[list[object], BaseException | None]:
        running = eng.generate(long_req)
        assert isinstance(await anext(running), TokenEvent)
        waiting = asyncio.create_task(text_of(eng, request("Hi", max_tokens=4)))
        while eng.stats().queue_depth == 0:
            await asyncio.sleep(0.005)
        await eng.close()
        rest = [event async for event in running]
        try:
            await waiting
            error = None
        except EngineUnavailable as exc:
            error = exc
        return rest, error

    rest, error = asyncio.run(scenario())
    assert isinstance(rest[-1], Finished) and rest[-1].reason == "cancelled"
    assert isinstance(error, EngineUnavailable)
    assert not eng.health().ok
    with pytest.raises(EngineUnavailable):
        asyncio.run(text_of(eng, request("Hi", max_tokens=4)))
