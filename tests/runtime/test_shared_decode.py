"""Several engines on one decode thread, on the real default model: same answers as alone, turns
taken in rotation, one engine's close or failure leaving the others serving, the thread's life."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator

import llama_cpp
import pytest

from runtime import Finished, GenerationRequest, SamplingParams, TokenEvent
from runtime._decode_thread import DecodeThread, shared_decode_thread
from runtime.llama_engine import LlamaEngine

GREEDY = SamplingParams(temperature=0)
# The grammar cannot end before 300 letter-digit pairs, so a stream runs for all its max_tokens.
LONG = SamplingParams(temperature=0, grammar="root ::= ([a-z] [0-9]){300}")


def request(text: str, max_tokens: int = 32, sampling: SamplingParams = GREEDY) -> GenerationRequest:
    return GenerationRequest(max_tokens=max_tokens, messages=[{"role": "user", "content": text}], sampling=sampling)


async def text_of(events: AsyncIterator[object]) -> tuple[str, Finished]:
    text, finished = "", None
    async for event in events:
        if isinstance(event, TokenEvent):
            text += event.text
        else:
            finished = event
    assert isinstance(finished, Finished)
    return text, finished


def threads_named(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


@pytest.fixture
def pair(model_path: str) -> Iterator[tuple[LlamaEngine, LlamaEngine]]:
    """Two engines of the default model file on the process's shared decode thread."""
    engines = [LlamaEngine(model_path, name=name, slots=2, n_ctx_per_slot=512) for name in ("smol-a", "smol-b")]
    yield engines[0], engines[1]
    for eng in engines:
        asyncio.run(eng.close())


@pytest.fixture
def decode_calls(monkeypatch) -> list[tuple[int, object]]:
    """Every llama_decode as (thread ident, context), the real call made."""
    calls: list[tuple[int, object]] = []
    real = llama_cpp.llama_decode

    def recording(ctx, batch):
        calls.append((threading.get_ident(), ctx))
        return real(ctx, batch)

    monkeypatch.setattr(llama_cpp, "llama_decode", recording)
    return calls


def test_two_engines_share_one_thread_and_answer_as_they_do_alone(
    pair: tuple[LlamaEngine, LlamaEngine], decode_calls: list[tuple[int, object]]
) -> None:
    a, b = pair
    work = [
        (a, request("Tell me one fact about volcanoes.")),
        (a, request("Name three rivers.")),
        (b, request("Tell me one fact about owls.")),
        (b, request("Write a short sentence about bread.")),
    ]

    async def scenario() -> tuple[list[str], list[str]]:
        alone = [(await text_of(eng.generate(req)))[0] for eng, req in work]
        for eng, _ in work:
            await eng.clear_prefix_cache()
        together = await asyncio.gather(*(text_of(eng.generate(req)) for eng, req in work))
        return alone, [text for text, _ in together]

    alone, together = asyncio.run(scenario())
    assert all(alone)
    assert together == alone
    assert a._loop._decoder is b._loop._decoder is shared_decode_thread()
    assert len(threads_named("decode")) == 1
    assert not [t for t in threading.enumerate() if t.name.startswith("decode-")]
    assert {ctx for _, ctx in decode_calls} == {a._ctx, b._ctx}
    assert {ident for ident, _ in decode_calls} == {threads_named("decode")[0].ident}


def test_engines_take_steps_in_turn(
    pair: tuple[LlamaEngine, LlamaEngine], decode_calls: list[tuple[int, object]]
) -> None:
    a, b = pair

    async def scenario() -> tuple[Finished, Finished]:
        long = asyncio.create_task(text_of(a.generate(request("Write letters and digits.", 200, LONG))))
        while a.stats().active_sequences == 0:
            await asyncio.sleep(0.001)
        _, short = await text_of(b.generate(request("Write letters and digits.", 60, LONG)))
        _, longer = await long
        return longer, short

    longer, short = asyncio.run(scenario())
    assert (longer.completion_tokens, short.completion_tokens) == (200, 60)
    ctxs = [ctx for _, ctx in decode_calls]
    first_b = ctxs.index(b._ctx)
    last_b = len(ctxs) - 1 - ctxs[::-1].index(b._ctx)
    assert a._ctx in ctxs[last_b:], "the long stream outlasts the short one"
    # While both stream, each turn is one loop's step: its decode rows, perhaps a prompt chunk.
    window, longest, run = ctxs[first_b : last_b + 1], 0, 0
    for prev, ctx in zip([None, *window], window, strict=False):
        run = run + 1 if ctx is prev else 1
        longest = max(longest, run)
    assert abs(window.count(a._ctx) - window.count(b._ctx)) <= 2
    assert longest <= 2


def test_closing_one_engine_mid_stream_leaves_the_other_streaming(pair: tuple[LlamaEngine, LlamaEngine]) -> None:
    a, b = pair
    req = request("Write letters and digits.", 250, LONG)

    async def scenario() -> tuple[str, str, Finished, Finished, int]:
        alone, _ = await text_of(b.generate(req))
        await b.clear_prefix_cache()
        a_stream = a.generate(request("Write letters and digits.", 250, LONG))
        assert isinstance(await anext(a_stream), TokenEvent)
        b_tokens: list[str] = []

        async def follow() -> Finished:
            async for event in b.generate(req):
                if isinstance(event, Finished):
                    return event
                b_tokens.append(event.text)
            raise AssertionError("no Finished")

        b_task = asyncio.create_task(follow())
        while not b_tokens:
            await asyncio.sleep(0.001)
        await a.close()
        at_close = len(b_tokens)
        _, a_finished = await text_of(a_stream)
        b_finished = await b_task
        return alone, "".join(b_tokens), a_finished, b_finished, at_close

    alone, together, a_finished, b_finished, at_close = asyncio.run(scenario())
    assert a_finished.reason == "cancelled"
    assert (b_finished.reason, b_finished.completion_tokens) == ("length", 250)
    assert at_close < 250, "the other stream was still running when the engine closed"
    assert together == alone
    assert not a.health().ok and b.health().ok


def test_a_failing_step_fails_only_that_engines_sequences(pair: tuple[LlamaEngine, LlamaEngine]) -> None:
    a, b = pair
    req = request("Write letters and digits.", 120, LONG)
    loop = a._loop
    real_step = loop._step

    def failing_step() -> None:
        loop._step = real_step  # once
        raise RuntimeError("injected")

    async def scenario() -> tuple[str, str, Finished, Finished, str]:
        alone, _ = await text_of(b.generate(req))
        await b.clear_prefix_cache()
        a_stream = a.generate(request("Write letters and digits.", 120, LONG))
        b_stream = b.generate(req)
        assert isinstance(await anext(a_stream), TokenEvent)
        first = await anext(b_stream)
        assert isinstance(first, TokenEvent)
        loop._step = failing_step
        (_, a_finished), (rest, b_finished) = await asyncio.gather(text_of(a_stream), text_of(b_stream))
        after, _ = await text_of(a.generate(request("Name three rivers.")))
        return alone, first.text + rest, a_finished, b_finished, after

    alone, together, a_finished, b_finished, after = asyncio.run(scenario())
    assert a_finished.reason == "error" and "injected" in str(a_finished.error)
    assert b_finished.reason == "length" and together == alone
    assert after, "the engine whose step failed keeps serving"
    assert a.health().ok and b.health().ok


def test_a_dead_loop_reports_its_failure_and_the_others_keep_serving(pair: tuple[LlamaEngine, LlamaEngine]) -> None:
    a, b = pair

    def broken() -> None:
        raise RuntimeError("injected")

    async def scenario() -> tuple[Finished, Finished]:
        a_stream = a.generate(request("Write letters and digits.", 120, LONG))
        b_stream = b.generate(request("Write letters and digits.", 120, LONG))
        assert isinstance(await anext(a_stream), TokenEvent)
        assert isinstance(await anext(b_stream), TokenEvent)
        a._loop._run_calls = broken  # outside the step's own handler: the loop dies
        (_, a_finished), (_, b_finished) = await asyncio.gather(text_of(a_stream), text_of(b_stream))
        return a_finished, b_finished

    a_finished, b_finished = asyncio.run(scenario())
    assert a_finished.reason == "cancelled"
    assert b_finished.reason == "length"
    health = a.health()
    assert not health.ok and "decode loop died: injected" in health.detail
    assert b.health().ok and len(threads_named("decode")) == 1


def test_stop_from_the_decode_thread_does_not_deadlock(pair: tuple[LlamaEngine, LlamaEngine]) -> None:
    a, b = pair

    async def scenario() -> str:
        await asyncio.wrap_future(a._loop.call(a._loop.stop))
        await a.close()
        text, _ = await text_of(b.generate(request("Name three rivers.")))
        return text

    assert asyncio.run(scenario())
    assert not a.health().ok and b.health().ok


def test_the_thread_ends_with_its_last_engine_and_the_next_engine_starts_it(model_path: str) -> None:
    decoder = DecodeThread(name="decode-private")
    req = request("Name three rivers.")

    def serve_once() -> tuple[str, threading.Thread]:
        eng = LlamaEngine(model_path, name="smol-private", slots=2, n_ctx_per_slot=512, decode_thread=decoder)
        try:
            text, _ = asyncio.run(text_of(eng.generate(req)))
            [thread] = threads_named("decode-private")
        finally:
            asyncio.run(eng.close())
        return text, thread

    first_text, first = serve_once()
    first.join(timeout=30)
    assert not first.is_alive() and not threads_named("decode-private")
    second_text, second = serve_once()
    assert second is not first and second_text == first_text
    second.join(timeout=30)
    assert not second.is_alive()
