"""Remote upstreams: the engine against a real second appliance and against a small real HTTP
server that misbehaves on cue, the encrypted key store, the registry and its CLI."""

from __future__ import annotations

import asyncio
import json
import math
import os
import sqlite3
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from appliance.errors import ConfigError, InvalidRequest, NotFound
from appliance.routing.attempt import attempt_with_fallback, fallback_ready
from appliance.routing.secrets import SecretBox
from appliance.routing.upstream_http import UpstreamClient
from appliance.routing.upstream_registry import KEEP, Upstream, UpstreamRegistry
from appliance.routing.upstreams import UpstreamEngine, UpstreamEngines, engines_for, upstream_client
from appliance.store import Store
from appliance.upstreams_cli import upstreams
from runtime.engine import Engine, Finished, GenerationEvent, GenerationRequest, SamplingParams, TokenEvent
from runtime.errors import ContextOverflow, EngineOverloaded, EngineUnavailable, InvalidGenerationRequest
from tests.admin_helpers import ACTOR, audit_of
from tests.conftest import MODEL_NAME, free_port, init_data_dir, run_cli, start_server, stop_server

SECRET = "sk-upstream-0123456789abcdefghijklmnopqrstuvwxyzSECRET"  # key-shaped: scrub_keys knows "sk-"
ODD_SECRET = "Zq7Kp2Lm9Xv4Rt8Wn3Bc6Hd1Fg5Js0Ty"  # not key-shaped: only the literal replacement hides it


def chat(text: str = "Say hello.", **kwargs: Any) -> GenerationRequest:
    return GenerationRequest(max_tokens=kwargs.pop("max_tokens", 8), messages=[{"role": "user", "content": text}], **kwargs)


async def collect(engine: UpstreamEngine, request: GenerationRequest) -> list[GenerationEvent]:
    async with aclosing(engine.generate(request)) as events:
        return [event async for event in events]


def text_of(events: list[GenerationEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TokenEvent))


def finished(events: list[GenerationEvent]) -> Finished:
    ends = [e for e in events if isinstance(e, Finished)]
    assert len(ends) == 1 and events[-1] is ends[0]
    return ends[0]


# -- a real HTTP server that fails on cue ---------------------------------------------------------
Behaviour = Callable[["FaultServer", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class FaultServer:
    """HTTP/1.1 on 127.0.0.1, answering attempt n with `script[n]` (the last one repeats)."""

    script: tuple[Behaviour, ...]
    seen: list[Seen] = field(default_factory=list)
    client_closed: asyncio.Event = field(default_factory=asyncio.Event)
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _stopping: bool = False

    @property
    def attempts(self) -> int:
        return len(self.seen)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1"

    async def start(self) -> FaultServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        self._stopping = True
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.seen.append(Seen(head[0].split(" ")[1], headers, json.loads(body) if body else {}))
            behaviour = self.script[min(len(self.seen), len(self.script)) - 1]
            await behaviour(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def wait_for_hang_up(self, reader: asyncio.StreamReader) -> None:
        """Block until the client goes away (or the server stops)."""
        await reader.read(1)
        if not self._stopping:
            self.client_closed.set()


def answer(status: int, body: dict[str, Any] | str, headers: dict[str, str] | None = None) -> Behaviour:
    async def run(server: FaultServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = (json.dumps(body) if isinstance(body, dict) else body).encode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            f"Connection: close\r\n{extra}\r\n".encode() + data
        )
        await writer.drain()

    return run


def oai_error(message: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}


def stream(*events: dict[str, Any] | str, then: str = "close") -> Behaviour:
    """Server-sent events in chunked encoding; dicts are `data:` JSON. `then`: "close" ends the
    body properly, "drop" cuts the connection mid-body, "hang" waits for the client to leave."""

    async def run(server: FaultServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for event in events:
            data = (f"data: {json.dumps(event)}\n\n" if isinstance(event, dict) else event).encode()
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
        if then == "close":
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        elif then == "drop":
            writer.transport.abort()
        else:
            await server.wait_for_hang_up(reader)

    return run


def hang() -> Behaviour:
    """Accept the request and never answer."""

    async def run(server: FaultServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.wait_for_hang_up(reader)

    return run


def delta(text: str | None = None, finish: str | None = None, role: str | None = None) -> dict[str, Any]:
    d = {k: v for k, v in (("role", role), ("content", text)) if v is not None}
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": d, "finish_reason": finish}]}


def usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}


DONE = "data: [DONE]\n\n"
HELLO = stream(delta(role="assistant"), delta("Hello"), delta(" world"), delta(finish="stop"), usage(11, 2), DONE)


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    async with upstream_client() as c:
        yield c


@pytest.fixture
async def fault() -> AsyncIterator[Callable[..., Awaitable[FaultServer]]]:
    started: list[FaultServer] = []

    async def start(*script: Behaviour) -> FaultServer:
        server = await FaultServer(script).start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


def fault_engine(
    server: FaultServer, client: UpstreamClient, *, timeout: float = 10, retries: int = 2, key: str | None = SECRET
) -> UpstreamEngine:
    upstream = Upstream(
        name="faulty", base_url=server.url, models=("m",), timeout_seconds=timeout, max_retries=retries, has_key=bool(key)
    )
    return UpstreamEngine(upstream, "m", client=client, api_key=key, backoff_base=0.01, backoff_cap=0.05)


def assert_secret_free(exc: BaseException | None, *secrets: str) -> None:
    assert exc is not None
    for secret in secrets:
        assert secret not in str(exc) and secret not in repr(exc) and secret not in repr(exc.args)


# -- the engine against faults --------------------------------------------------------------------
async def test_503_twice_is_retried_and_the_request_is_sent_as_openai_expects(fault: Any, client: UpstreamClient) -> None:
    server = await fault(answer(503, oai_error("warming up")), answer(503, oai_error("warming up")), HELLO)
    engine = fault_engine(server, client)
    assert isinstance(engine, Engine) and engine.remote
    request = chat(
        stop=("END",),
        sampling=SamplingParams(temperature=0.3, top_p=0.9, seed=7, presence_penalty=0.5),
        response_format={"type": "json_schema", "schema": {"type": "object"}},
    )
    events = await collect(engine, request)
    assert text_of(events) == "Hello world"
    end = finished(events)
    assert (end.reason, end.prompt_tokens, end.completion_tokens, end.error) == ("stop", 11, 2, None)
    assert end.compute_seconds > 0
    assert server.attempts == 3
    seen = server.seen[-1]
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["authorization"] == f"Bearer {SECRET}"
    body = seen.body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (body["model"], body["max_tokens"], body["stop"], body["seed"]) == ("m", 8, ["END"], 7)
    assert (body["temperature"], body["top_p"], body["presence_penalty"], body["frequency_penalty"]) == (0.3, 0.9, 0.5, 0.0)
    assert body["messages"] == [{"role": "user", "content": "Say hello."}]
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "response", "schema": {"type": "object"}}}
    assert engine.stats().requests_served == 1 and engine.stats().extra["retries"] == 2
    assert engine.health().ok


@pytest.mark.parametrize("retries", [0, 2])
async def test_retries_are_bounded(fault: Any, client: UpstreamClient, retries: int) -> None:
    server = await fault(answer(503, oai_error("down for maintenance")))
    engine = fault_engine(server, client, retries=retries)
    with pytest.raises(EngineUnavailable, match="503") as caught:
        await collect(engine, chat())
    assert server.attempts == retries + 1
    assert_secret_free(caught.value, SECRET)
    health = engine.health()
    assert not health.ok and "503" in health.detail


async def test_connection_refused_is_retried_then_unavailable(client: UpstreamClient) -> None:
    upstream = Upstream(name="gone", base_url=f"http://127.0.0.1:{free_port()}/v1", models=("m",), max_retries=2)
    engine = UpstreamEngine(upstream, "m", client=client, backoff_base=0.01, backoff_cap=0.05)
    with pytest.raises(EngineUnavailable, match="cannot reach upstream gone"):
        await collect(engine, chat())
    assert engine.stats().extra["retries"] == 2


async def test_with_a_fallback_ready_an_unreachable_upstream_fails_at_once(client: UpstreamClient) -> None:
    upstream = Upstream(name="gone", base_url=f"http://127.0.0.1:{free_port()}/v1", models=("m",), max_retries=2)
    engine = UpstreamEngine(upstream, "m", client=client, backoff_base=5, backoff_cap=5)  # a retry would wait seconds
    with attempt_with_fallback(True), pytest.raises(EngineUnavailable, match="cannot reach upstream gone"):
        await asyncio.wait_for(collect(engine, chat()), 2)
    assert engine.stats().extra["retries"] == 0
    assert not fallback_ready()  # the attempt's setting ends with it


async def test_with_a_fallback_ready_a_stream_cut_before_its_first_token_falls_back_at_once(
    fault: Any, client: UpstreamClient
) -> None:
    server = await fault(stream(delta(role="assistant"), then="drop"), HELLO)
    engine = fault_engine(server, client)
    with attempt_with_fallback(True), pytest.raises(EngineUnavailable, match="faulty"):
        await collect(engine, chat())
    assert server.attempts == 1 and engine.stats().extra["retries"] == 0
    events = await collect(engine, chat())  # the last candidate (no fallback) still retries the same cut
    assert text_of(events) == "Hello world" and server.attempts == 2


async def test_with_a_fallback_ready_an_upstream_that_answers_503_is_still_retried(fault: Any, client: UpstreamClient) -> None:
    server = await fault(answer(503, oai_error("warming up")), answer(503, oai_error("warming up")), HELLO)
    engine = fault_engine(server, client)
    with attempt_with_fallback(True):
        events = await collect(engine, chat())
    assert text_of(events) == "Hello world" and server.attempts == 3


async def test_429_with_retry_after_past_the_deadline_is_overloaded_at_once(fault: Any, client: UpstreamClient) -> None:
    server = await fault(answer(429, oai_error("slow down", "rate_limit_exceeded"), {"Retry-After": "120"}))
    with pytest.raises(EngineOverloaded) as caught:
        await collect(fault_engine(server, client, timeout=5), chat())
    assert caught.value.retry_after == 120
    assert server.attempts == 1


async def test_429_with_a_short_retry_after_is_retried(fault: Any, client: UpstreamClient) -> None:
    server = await fault(answer(429, oai_error("slow down"), {"Retry-After": "0"}), HELLO)
    events = await collect(fault_engine(server, client), chat())
    assert text_of(events) == "Hello world" and server.attempts == 2


async def test_context_length_exceeded_is_context_overflow(fault: Any, client: UpstreamClient) -> None:
    message = "This model's maximum context length is 4096 tokens."
    server = await fault(answer(400, oai_error(message, "context_length_exceeded")))
    with pytest.raises(ContextOverflow, match="maximum context length is 4096") as caught:
        await collect(fault_engine(server, client), chat())
    assert server.attempts == 1 and caught.value.limit == 8192


async def test_other_4xx_is_an_invalid_request_with_the_upstreams_scrubbed_message(fault: Any, client: UpstreamClient) -> None:
    said = f"temperature too hot; your key {ODD_SECRET} and another sk-live-9f8e7d6c5b4a39281706abcdefABCDEF12"
    server = await fault(answer(422, oai_error(said)))
    engine = fault_engine(server, client, key=ODD_SECRET)
    with pytest.raises(InvalidGenerationRequest, match="temperature too hot") as caught:
        await collect(engine, chat())
    assert server.attempts == 1
    assert_secret_free(caught.value, ODD_SECRET, "sk-live-9f8e7d6c5b4a39281706abcdefABCDEF12")
    assert engine.health().ok  # the caller's mistake says nothing about the upstream


async def test_refused_credentials_are_unavailable_and_never_echo_the_key(fault: Any, client: UpstreamClient) -> None:
    server = await fault(answer(401, oai_error(f"Incorrect API key provided: Bearer {SECRET}", "invalid_api_key")))
    with pytest.raises(EngineUnavailable, match="credentials") as caught:
        await collect(fault_engine(server, client), chat())
    assert_secret_free(caught.value, SECRET)
    assert server.attempts == 1


@pytest.mark.parametrize("behaviour", [hang(), stream(delta(role="assistant"), then="hang")], ids=["no-headers", "no-token"])
async def test_no_first_token_within_the_deadline_is_unavailable(
    fault: Any, client: UpstreamClient, behaviour: Behaviour
) -> None:
    server = await fault(behaviour)
    engine = fault_engine(server, client, timeout=1, retries=2)
    with pytest.raises(EngineUnavailable, match="no first token within 1s"):
        await asyncio.wait_for(collect(engine, chat()), timeout=10)
    assert server.attempts == 1
    await asyncio.wait_for(server.client_closed.wait(), timeout=5)  # the abandoned attempt was hung up


@pytest.mark.parametrize(
    "ending",
    [
        f"event: error\ndata: {json.dumps(oai_error('backend exploded with key ' + SECRET))}\n\n",
        f"data: {json.dumps(oai_error('backend exploded'))}\n\n",
    ],
    ids=["event-error", "data-error"],
)
async def test_an_error_event_after_tokens_finishes_with_error(fault: Any, client: UpstreamClient, ending: str) -> None:
    server = await fault(stream(delta("one"), delta(" two"), ending))
    events = await collect(fault_engine(server, client), chat())
    assert text_of(events) == "one two"
    end = finished(events)
    assert end.reason == "error" and isinstance(end.error, EngineUnavailable)
    assert "backend exploded" in str(end.error) and end.completion_tokens == 2
    assert_secret_free(end.error, SECRET)
    assert server.attempts == 1  # never retried after the first token


@pytest.mark.parametrize("then", ["drop", "close"])
async def test_a_stream_cut_after_tokens_finishes_with_error(fault: Any, client: UpstreamClient, then: str) -> None:
    server = await fault(stream(delta("one"), delta(" two"), then=then))
    engine = fault_engine(server, client)
    events = await collect(engine, chat())
    assert text_of(events) == "one two"
    end = finished(events)
    assert end.reason == "error" and isinstance(end.error, EngineUnavailable)
    assert server.attempts == 1
    assert not engine.health().ok


async def test_a_completion_without_usage_is_estimated_and_length_is_kept(fault: Any, client: UpstreamClient) -> None:
    server = await fault(
        stream({"choices": [{"index": 0, "text": "a b"}]}, {"choices": [{"index": 0, "text": " c", "finish_reason": "length"}]}, DONE)
    )
    engine = fault_engine(server, client, key=None)
    events = await collect(engine, GenerationRequest(max_tokens=2, prompt="Once upon a time"))
    assert text_of(events) == "a b c"
    end = finished(events)
    assert (end.reason, end.completion_tokens) == ("length", 2)
    assert end.prompt_tokens == len(engine.tokens_for(GenerationRequest(max_tokens=2, prompt="Once upon a time")))
    assert server.seen[0].path == "/v1/completions" and server.seen[0].body["prompt"] == "Once upon a time"
    assert "authorization" not in server.seen[0].headers


async def test_closing_the_iterator_hangs_up_on_the_upstream(fault: Any, client: UpstreamClient) -> None:
    server = await fault(stream(delta("first"), then="hang"))
    engine = fault_engine(server, client)
    events = engine.generate(chat())
    assert await anext(events) == TokenEvent("first")
    await events.aclose()  # type: ignore[attr-defined]
    await asyncio.wait_for(server.client_closed.wait(), timeout=5)
    assert engine.stats().active_sequences == 0


async def test_close_ends_streams_in_flight_with_error(fault: Any, client: UpstreamClient) -> None:
    server = await fault(stream(delta("first"), then="hang"))
    engine = fault_engine(server, client)
    async with aclosing(engine.generate(chat())) as events:
        assert await anext(events) == TokenEvent("first")
        await engine.close()
        end = await asyncio.wait_for(anext(events), timeout=5)
    assert isinstance(end, Finished) and end.reason == "error" and "closed" in str(end.error)
    with pytest.raises(EngineUnavailable, match="closed"):
        await collect(engine, chat())
    assert not engine.health().ok


# -- the engine against a real appliance ----------------------------------------------------------
@dataclass(frozen=True)
class Peer:
    url: str
    key: str


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Peer]:
    """A second, real appliance serving the default model: the upstream."""
    data_dir = tmp_path_factory.mktemp("upstream-peer")
    (data_dir / "appliance.toml").write_text("[runtime]\nslots = 2\nctx_per_slot = 1024\n")
    init_data_dir(data_dir, model_path)
    user = json.loads(run_cli("keys", "create", "--name", "router", "--role", "user", "--json", data_dir=data_dir).stdout)
    proc, url, _ = start_server(data_dir)
    try:
        yield Peer(url + "/v1", user["key"])
    finally:
        stop_server(proc)


def peer_engine(peer: Peer, client: UpstreamClient, *, key: str | None = None) -> UpstreamEngine:
    upstream = Upstream(name="peer", base_url=peer.url, models=(MODEL_NAME,), has_key=True, timeout_seconds=60)
    return UpstreamEngine(upstream, MODEL_NAME, client=client, api_key=key or peer.key, context_length=1024)


async def test_a_chat_streams_through_a_real_appliance_with_its_usage(peer: Peer, client: UpstreamClient) -> None:
    engine = peer_engine(peer, client)
    request = chat("Name three colours.", max_tokens=12, sampling=SamplingParams(temperature=0.0))
    events = await collect(engine, request)
    end = finished(events)
    assert text_of(events).strip() and end.reason in ("stop", "length") and end.error is None
    direct = httpx.post(
        f"{peer.url}/chat/completions",
        headers={"Authorization": f"Bearer {peer.key}"},
        json={"model": MODEL_NAME, "messages": request.messages, "max_tokens": 12, "temperature": 0.0},
        timeout=60,
    ).json()
    assert (end.prompt_tokens, end.completion_tokens) == (
        direct["usage"]["prompt_tokens"],
        direct["usage"]["completion_tokens"],
    )
    assert text_of(events) == direct["choices"][0]["message"]["content"]
    assert engine.served_files == {"upstream": "peer", "base_url": peer.url, "model": MODEL_NAME}


async def test_a_completion_streams_through_a_real_appliance(peer: Peer, client: UpstreamClient) -> None:
    events = await collect(
        peer_engine(peer, client), GenerationRequest(max_tokens=6, prompt="The capital of France is", sampling=SamplingParams(temperature=0.0))
    )
    end = finished(events)
    assert text_of(events) and end.reason == "length" and end.completion_tokens == 6
    assert end.prompt_tokens > 0


async def test_embeddings_through_a_real_appliance(peer: Peer, client: UpstreamClient) -> None:
    result = await peer_engine(peer, client).embed(["a cat sat", "on the mat"])
    assert len(result.vectors) == 2 and result.prompt_tokens > 0
    assert all(math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, rel_tol=1e-5) for v in result.vectors)


async def test_a_prompt_too_long_for_the_real_appliance_is_context_overflow(peer: Peer, client: UpstreamClient) -> None:
    with pytest.raises(ContextOverflow):
        await collect(peer_engine(peer, client), chat(max_tokens=5000))


async def test_a_wrong_key_for_the_real_appliance_is_refused_without_showing_it(peer: Peer, client: UpstreamClient) -> None:
    wrong = "apl_0123456789ab_" + "Q" * 43
    engine = peer_engine(peer, client, key=wrong)
    with pytest.raises(EngineUnavailable, match="credentials") as caught:
        await collect(engine, chat())
    assert_secret_free(caught.value, wrong)
    with pytest.raises(EngineUnavailable) as caught_embed:
        await engine.embed(["x"])
    assert_secret_free(caught_embed.value, wrong)
    assert wrong not in engine.health().detail


# -- the key box and the registry -----------------------------------------------------------------
@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "appliance.db").open()
    yield s
    s.close()


@pytest.fixture
def box(tmp_path: Path) -> SecretBox:
    return SecretBox(tmp_path / "keys" / "upstreams.fernet")


@pytest.fixture
def registry(store: Store, box: SecretBox) -> UpstreamRegistry:
    return UpstreamRegistry(store, audit_of(store), box)


def admin_records(store: Store) -> list[dict[str, Any]]:
    return [json.loads(r["body"]) for r in store.query("SELECT body FROM audit WHERE kind = 'admin' ORDER BY idx")]


def test_the_key_file_is_owner_only_and_the_key_never_in_clear_on_disk(
    registry: UpstreamRegistry, store: Store, box: SecretBox, tmp_path: Path
) -> None:
    registry.set("vllm", base_url="http://10.0.0.5:8000/v1/", models=["llama"], api_key=ODD_SECRET, actor=ACTOR)
    assert stat.S_IMODE(box.key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(box.key_path.parent.stat().st_mode) == 0o700
    assert registry.api_key("vllm") == ODD_SECRET
    assert registry.get("vllm").base_url == "http://10.0.0.5:8000/v1"
    store.close()
    for path in tmp_path.glob("appliance.db*"):
        assert ODD_SECRET.encode() not in path.read_bytes(), path
    conn = sqlite3.connect(tmp_path / "appliance.db")
    (enc,) = conn.execute("SELECT api_key_enc FROM upstreams").fetchone()
    conn.close()
    assert enc and ODD_SECRET not in enc


def test_set_replace_and_delete_are_audited_without_the_key(registry: UpstreamRegistry, store: Store) -> None:
    first = registry.set("peer", base_url="https://peer.example/v1", models=["a"], api_key=SECRET, actor=ACTOR)
    assert first.has_key and first.to_dict()["api_key"] == "set" and SECRET not in json.dumps(first.to_dict())
    kept = registry.set("peer", base_url="https://peer.example/v1", models=["a", "b"], timeout_seconds=5, actor=ACTOR)
    assert kept.has_key and kept.models == ("a", "b") and kept.created_at == first.created_at
    registry.set("peer", base_url="https://peer.example/v1", models=["a"], api_key=ODD_SECRET, actor=ACTOR)
    assert registry.api_key("peer") == ODD_SECRET
    removed = registry.set("peer", base_url="https://peer.example/v1", models=["a"], api_key=None, actor=ACTOR)
    assert not removed.has_key and registry.api_key("peer") is None
    gone = registry.delete("peer", actor=ACTOR)
    assert gone.name == "peer" and registry.list() == []

    records = admin_records(store)
    assert [r["action"] for r in records] == ["upstreams.set"] * 4 + ["upstreams.delete"]
    assert all(r["target"] == "peer" and r["actor"] == ACTOR.info for r in records)
    keys = [(r["before"] and r["before"]["api_key_state"], r["after"] and r["after"]["api_key_state"]) for r in records]
    assert keys == [(None, "changed"), ("set", "set"), ("set", "changed"), ("set", None), (None, None)]
    assert records[0]["before"] is None and records[-1]["after"] is None
    assert records[1]["before"]["models"] == ["a"] and records[1]["after"]["models"] == ["a", "b"]
    bodies = " ".join(r["body"] for r in store.query("SELECT body FROM audit"))
    assert SECRET not in bodies and ODD_SECRET not in bodies


@pytest.mark.parametrize(
    "url",
    ["file:///etc/passwd", "http://user:pw@host", "http://user@host/v1", "ftp://x", "http://h/?q=1", "http://h/v1#frag",
     "http://", "https:///v1", "http://h:99999", "http://h /v1", "http://[::1/v1", "http://hé/v1", "localhost:8000", ""],
)
def test_base_urls_that_are_not_plain_http_are_refused(registry: UpstreamRegistry, url: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        registry.set("u", base_url=url, models=["m"], actor=ACTOR)
    assert caught.value.param == "base_url"
    assert registry.list() == []


@pytest.mark.parametrize(
    ("field", "value"),
    [("name", "Bad Name"), ("name", "-x"), ("name", "x" * 65), ("models", []), ("models", [""]), ("models", "llama"), ("models", ["a\x00"]),
     ("prompt_price_per_1k", -1.0), ("completion_price_per_1k", float("nan")), ("timeout_seconds", 0),
     ("timeout_seconds", 601), ("max_retries", 6), ("max_retries", True), ("api_key", "two words"), ("api_key", "")],
)
def test_bad_settings_are_refused_naming_the_parameter(registry: UpstreamRegistry, field: str, value: Any) -> None:
    settings: dict[str, Any] = {"base_url": "http://127.0.0.1:8080", "models": ["m"], "actor": ACTOR}
    name = value if field == "name" else "u"
    if field != "name":
        settings[field] = value
    with pytest.raises(InvalidRequest) as caught:
        registry.set(name, **settings)
    assert caught.value.param == field
    if field == "api_key":
        assert value not in caught.value.message or not value


@pytest.mark.parametrize("name", ["nope", "Not A Name", "\ud800"])
def test_unknown_upstreams_are_not_found(registry: UpstreamRegistry, name: str) -> None:
    for call in (lambda: registry.get(name), lambda: registry.api_key(name), lambda: registry.delete(name, actor=ACTOR)):
        with pytest.raises(NotFound):
            call()


def test_a_damaged_key_file_or_token_is_a_config_error_that_shows_no_secret(tmp_path: Path) -> None:
    key_path = tmp_path / "keys" / "upstreams.fernet"
    good = SecretBox(key_path)
    token = good.encrypt(ODD_SECRET)
    assert ODD_SECRET not in token and good.decrypt(token) == ODD_SECRET
    with pytest.raises(ConfigError, match="cannot be decrypted") as bad_token:
        good.decrypt(token[:-8] + "AAAAAAAA")
    assert ODD_SECRET not in bad_token.value.message
    with pytest.raises(ConfigError, match="not the key"):
        SecretBox(tmp_path / "other.fernet").decrypt(token)  # a new key file, not the one it was made with
    garbage = "not-a-fernet-key-but-secret-looking-0123456789"
    key_path.write_text(garbage)
    with pytest.raises(ConfigError, match="damaged") as bad_file:
        SecretBox(key_path).encrypt("x")
    assert garbage not in bad_file.value.message


def test_a_read_only_registry_refuses_changes(store: Store) -> None:
    with pytest.raises(RuntimeError):
        UpstreamRegistry(store).set("u", base_url="http://h", models=["m"], api_key=KEEP, actor=ACTOR)


async def test_engines_for_builds_one_engine_per_model_with_its_key(registry: UpstreamRegistry, client: UpstreamClient) -> None:
    registry.set("a", base_url="http://127.0.0.1:1/v1", models=["x", "y"], api_key=ODD_SECRET, actor=ACTOR)
    registry.set("b", base_url="http://127.0.0.1:2", models=["z"], actor=ACTOR)
    engines = engines_for(registry, client)
    assert [e.name for e in engines] == ["a/x", "a/y", "b/z"]
    assert all(ODD_SECRET not in json.dumps(e.served_files) and ODD_SECRET not in repr(e) for e in engines)
    assert engines[0].tokenize("abcdefghi") == [0, 0, 0] and engines[0].count_chat_tokens([{"content": "abc"}]) == 7


class Prices:
    """A price book as the cost model keeps it."""

    def __init__(self) -> None:
        self.book: dict[str, tuple[float, float]] = {}

    def set_price(self, model: str, input_per_1k: float, output_per_1k: float) -> None:
        self.book[model] = (input_per_1k, output_per_1k)

    def forget_price(self, model: str) -> None:
        self.book.pop(model, None)


async def test_upstream_engines_follow_the_registry(registry: UpstreamRegistry, client: UpstreamClient) -> None:
    prices = Prices()
    engines = UpstreamEngines(registry, client, prices=prices)
    assert engines.names() == [] and engines.get("a/x") is None
    registry.set("a", base_url="http://127.0.0.1:1/v1", models=["x", "y"], prompt_price_per_1k=0.5, actor=ACTOR)
    assert engines.names() == ["a/x", "a/y"] and prices.book == {"a/x": (0.5, 0.0), "a/y": (0.5, 0.0)}
    first = engines.get("a/x")
    assert first is not None and first.stats().model == "a/x"
    registry.set("a", base_url="http://127.0.0.1:1/v1", models=["x", "y"], prompt_price_per_1k=0.5, actor=ACTOR)
    assert engines.get("a/x") is first  # nothing changed: the same engine, its stats kept
    registry.set("a", base_url="http://127.0.0.1:1/v1", models=["x"], api_key=ODD_SECRET, actor=ACTOR)
    assert engines.names() == ["a/x"] and engines.get("a/x") is not first and list(prices.book) == ["a/x"]
    registry.delete("a", actor=ACTOR)
    assert engines.names() == [] and prices.book == {}


# -- the CLI on the database (no server running) --------------------------------------------------
def cli(*args: str, data_dir: Path, env: dict[str, str] | None = None) -> Any:
    result = CliRunner().invoke(upstreams, [*args, "--data-dir", str(data_dir)], env=env, catch_exceptions=False)
    return result


def test_the_cli_sets_lists_and_deletes_offline_reading_the_key_from_a_file_or_the_environment(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    key_file = tmp_path / "key.txt"
    key_file.write_text(ODD_SECRET + "\n")
    out = cli("set", "peer", "--base-url", "http://127.0.0.1:9/v1", "--model", "a", "--model", "b",
              "--api-key-file", str(key_file), "--prompt-price", "0.5", "--json", data_dir=data_dir)
    assert out.exit_code == 0, out.output
    shown = json.loads(out.output)
    assert shown["api_key"] == "set" and shown["models"] == ["a", "b"] and shown["prompt_price_per_1k"] == 0.5
    assert ODD_SECRET not in out.output

    out = cli("set", "peer", "--base-url", "http://127.0.0.1:9/v1", "--model", "a", "--json", data_dir=data_dir)
    assert json.loads(out.output)["api_key"] == "set"  # kept
    out = cli("set", "peer", "--base-url", "http://127.0.0.1:9/v1", "--model", "a", "--api-key-env", "PEER_KEY",
              data_dir=data_dir, env={"PEER_KEY": SECRET})
    assert out.exit_code == 0 and "key set" in out.output and SECRET not in out.output

    out = cli("set", "peer", "--base-url", "http://127.0.0.1:9", "--model", "a", "--no-api-key", "--api-key-env", "X", data_dir=data_dir)
    assert out.exit_code == 1 and "at most one" in out.output
    out = cli("set", "peer", "--base-url", "ftp://x", "--model", "a", data_dir=data_dir)
    assert out.exit_code == 1 and "base_url" in out.output

    listed = json.loads(cli("list", "--json", data_dir=data_dir).output)
    assert [u["name"] for u in listed] == ["peer"] and listed[0]["api_key"] == "set"
    assert cli("delete", "peer", data_dir=data_dir).output.strip() == "deleted upstream peer"
    assert cli("delete", "peer", data_dir=data_dir).exit_code == 1

    with Store(data_dir / "appliance.db").open() as s:
        bodies = [r["body"] for r in s.query("SELECT body FROM audit WHERE kind = 'admin'")]
    assert len(bodies) == 4 and all('"kind":"cli"' in b.replace(" ", "") for b in bodies)
    assert not any(ODD_SECRET in b or SECRET in b for b in bodies)
    assert stat.S_IMODE(os.stat(data_dir / "keys" / "upstreams.fernet").st_mode) == 0o600
