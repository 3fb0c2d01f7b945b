"""EchoEngine and FaultyEngine keep the Engine protocol, so gateway tests can lean on them."""

from __future__ import annotations

import asyncio
import math

import pytest

from runtime import (
    ContextOverflow,
    Engine,
    EngineOverloaded,
    EngineUnavailable,
    Finished,
    GenerationRequest,
    InvalidGenerationRequest,
    TokenEvent,
)
from runtime.stand_ins import EchoEngine, FaultyEngine


async def events(engine: Engine, request: GenerationRequest) -> list[object]:
    return [event async for event in engine.generate(request)]


def run(engine: Engine, request: GenerationRequest) -> list[object]:
    return asyncio.run(events(engine, request))


def test_echo_streams_the_prompt_words_then_one_finished() -> None:
    engine = EchoEngine(context_length=64)
    assert isinstance(engine, Engine)
    out = run(engine, GenerationRequest(max_tokens=10, prompt="the quick brown fox"))
    assert "".join(e.text for e in out[:-1]) == "the quick brown fox"
    assert out[-1] == Finished(reason="stop", prompt_tokens=5, completion_tokens=4)
    chat = run(engine, GenerationRequest(max_tokens=2, messages=[{"role": "user", "content": "one two three"}]))
    assert [e.text for e in chat[:-1]] == ["one", " two"] and chat[-1].reason == "length"
    stopped = run(engine, GenerationRequest(max_tokens=10, prompt="a b c d", stop=("c",)))
    assert "".join(e.text for e in stopped[:-1]) == "a b" and stopped[-1].reason == "stop"
    assert engine.stats().requests_served == 3 and engine.stats().active_sequences == 0


def test_echo_limits_embeddings_and_close() -> None:
    engine = EchoEngine(context_length=8)
    with pytest.raises(ContextOverflow):
        run(engine, GenerationRequest(max_tokens=4, prompt="one two three four five"))
    with pytest.raises(InvalidGenerationRequest):
        run(engine, GenerationRequest(max_tokens=4))
    vectors = asyncio.run(engine.embed(["red apple", "red apple pie", "tax law"])).vectors
    assert all(math.isclose(sum(x * x for x in v), 1.0) for v in vectors)
    assert engine.count_chat_tokens([{"role": "user", "content": "a b"}]) > 2
    asyncio.run(engine.close())
    assert not engine.health().ok
    with pytest.raises(EngineUnavailable):
        run(engine, GenerationRequest(max_tokens=4, prompt="x"))


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("overloaded", EngineOverloaded),
        ("unavailable", EngineUnavailable),
        ("overflow", ContextOverflow),
        ("invalid", InvalidGenerationRequest),
    ],
)
def test_faulty_raises_before_the_first_event(kind: str, error: type[Exception]) -> None:
    engine = FaultyEngine(fail_before=kind, retry_after=3.0)
    with pytest.raises(error) as info:
        run(engine, GenerationRequest(max_tokens=4, prompt="a b c"))
    if kind == "overloaded":
        assert info.value.retry_after == 3.0
    engine.fail_before = None  # knobs flip live
    assert run(engine, GenerationRequest(max_tokens=4, prompt="a b c"))[-1].reason == "stop"
    assert engine.calls == 2


def test_faulty_fails_mid_stream_both_ways() -> None:
    finishing = FaultyEngine(fail_after_tokens=2)
    out = run(finishing, GenerationRequest(max_tokens=10, prompt="a b c d e"))
    assert [type(e) for e in out] == [TokenEvent, TokenEvent, Finished]
    assert out[-1].reason == "error" and out[-1].completion_tokens == 2
    raising = FaultyEngine(fail_after_tokens=1, mid_stream="raise")

    async def partial() -> list[object]:
        seen = []
        with pytest.raises(EngineUnavailable):
            async for event in raising.generate(GenerationRequest(max_tokens=10, prompt="a b c")):
                seen.append(event)
        return seen

    assert len(asyncio.run(partial())) == 1
    assert raising.stats().active_sequences == 0


def test_faulty_is_slow_without_blocking_the_loop() -> None:
    engine = FaultyEngine(first_token_delay_s=0.05, token_delay_s=0.02)

    async def scenario() -> tuple[float, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        task = asyncio.create_task(ticker())
        loop = asyncio.get_running_loop()
        start = loop.time()
        await events(engine, GenerationRequest(max_tokens=10, prompt="a b c d"))
        elapsed = loop.time() - start
        task.cancel()
        return elapsed, ticks

    elapsed, ticks = asyncio.run(scenario())
    assert elapsed >= 0.05 + 3 * 0.02
    assert ticks >= 5


def test_faulty_embed_and_health_knobs() -> None:
    engine = FaultyEngine(embed_fails=True, healthy=False)
    with pytest.raises(EngineUnavailable):
        asyncio.run(engine.embed(["x"]))
    assert not engine.health().ok
    engine.healthy = True
    assert engine.health().ok
