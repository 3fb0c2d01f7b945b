"""The upstream HTTP client (`appliance.routing.upstream_http`) against small real servers:
keep-alive and its failures, every body framing, the bounds, timeouts and TLS; and the
upstream engine's use of it (connections reused after `[DONE]`, server-sent event parsing)."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from appliance.routing import upstreams
from appliance.routing.upstream_http import ConnectError, ProtocolError, Timeout, TooLarge, UpstreamClient
from appliance.routing.upstream_registry import Upstream
from appliance.routing.upstreams import _SSE, UpstreamEngine, upstream_client
from appliance.tls import make_self_signed
from runtime.engine import Finished, GenerationRequest, TokenEvent

KEY = "sk-upstream-http-0123456789abcdefghijklmnop"

Reply = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Request:
    connection: int
    line: str
    headers: dict[str, str]
    body: bytes


@dataclass
class KeepAliveServer:
    """HTTP/1.1 on 127.0.0.1 serving any number of requests per connection; request n (over all
    connections) is answered by `replies[n]` (the last one repeats)."""

    replies: list[Reply]
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1"

    async def start(self, tls: ssl.SSLContext | None = None) -> KeepAliveServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=tls)
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        connection = self.connections
        self._writers.add(writer)
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                headers = {
                    k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append(Request(connection, head[0], headers, body))
                await self.replies[min(len(self.requests), len(self.replies)) - 1](reader, writer)
                if writer.is_closing():
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


def raw(data: bytes, *, then: str = "") -> Reply:
    """Write `data`; then "close" hangs up, "hang" says nothing more until the client leaves."""

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        if then == "close":
            writer.close()
        elif then == "hang":
            await reader.read()

    return reply


def whole(body: bytes = b'{"ok": true}', status: str = "200 OK", extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode()
        + body
    )


def chunked(*parts: bytes, content_type: str = "text/event-stream") -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    return f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + body


def event(obj: dict[str, object] | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


def delta(text: str | None = None, finish: str | None = None) -> bytes:
    d = {} if text is None else {"content": text}
    return event({"choices": [{"index": 0, "delta": d, "finish_reason": finish}]})


USAGE = event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}})
STREAM = chunked(delta("Hello"), delta(" there"), delta(finish="stop"), USAGE, event("[DONE]"))


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[KeepAliveServer]]]:
    started: list[KeepAliveServer] = []

    async def start(*replies: Reply, tls: ssl.SSLContext | None = None) -> KeepAliveServer:
        server = await KeepAliveServer(list(replies)).start(tls)
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    async with upstream_client() as c:
        yield c


def engine_for(url: str, client: UpstreamClient, *, timeout: float = 5, retries: int = 0) -> UpstreamEngine:
    upstream = Upstream(
        name="up", base_url=url, models=("m",), timeout_seconds=timeout, max_retries=retries, has_key=True
    )
    return UpstreamEngine(upstream, "m", client=client, api_key=KEY, backoff_base=0.01, backoff_cap=0.02)


async def generate(engine: UpstreamEngine) -> tuple[str, Finished]:
    request = GenerationRequest(max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    async with aclosing(engine.generate(request)) as events:
        out = [e async for e in events]
    end = out[-1]
    assert isinstance(end, Finished)
    return "".join(e.text for e in out if isinstance(e, TokenEvent)), end


async def get(client: UpstreamClient, url: str, *, limit: int = 1 << 20, timeout: float = 5) -> tuple[int, bytes]:
    response = await client.request("POST", url + "/x", content=b"{}", timeout=timeout)
    try:
        return response.status, await response.read(limit)
    finally:
        response.close()


# -- connections ----------------------------------------------------------------------------------
async def test_streams_reuse_one_connection_and_send_the_key_only_in_authorization(serve, client) -> None:
    server = await serve(raw(STREAM))
    engine = engine_for(server.url, client)
    for _ in range(5):
        text, end = await generate(engine)
        assert (text, end.reason, end.prompt_tokens, end.completion_tokens) == ("Hello there", "stop", 7, 2)
    assert server.connections == 1 and len(server.requests) == 5
    seen = server.requests[0]
    assert seen.line == "POST /v1/chat/completions HTTP/1.1"
    assert seen.headers["authorization"] == f"Bearer {KEY}" and seen.headers["accept"] == "text/event-stream"
    assert seen.headers["host"] == server.url.split("/")[2] and seen.headers["content-type"] == "application/json"
    assert json.loads(seen.body)["stream"] is True
    assert sum(KEY in v for v in seen.headers.values()) == 1


async def test_the_end_of_the_body_is_waited_for_after_done_so_the_connection_is_kept(serve, client) -> None:
    head_and_done = STREAM[: -len(b"0\r\n\r\n")]

    async def late_end(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(head_and_done)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"0\r\n\r\n")

    server = await serve(late_end)
    engine = engine_for(server.url, client)
    assert (await generate(engine))[1].reason == "stop"
    assert (await generate(engine))[1].reason == "stop"
    assert server.connections == 1


async def test_an_upstream_that_keeps_talking_after_done_is_cut_off(serve, client) -> None:
    async def chatty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(STREAM[: -len(b"0\r\n\r\n")])
        while True:  # comments, forever
            writer.write(b"%x\r\n%s\r\n" % (len(b": more\n\n"), b": more\n\n"))
            await writer.drain()
            await asyncio.sleep(0.01)

    server = await serve(chatty)
    engine = engine_for(server.url, client)
    text, end = await asyncio.wait_for(generate(engine), timeout=5)
    assert (text, end.reason) == ("Hello there", "stop")
    await generate(engine)
    assert server.connections == 2  # the first one was not kept


@pytest.mark.parametrize(
    "reply",
    [
        whole(b"abc" * 1000),
        chunked(b"abc" * 500, b"abc" * 500, content_type="application/json"),
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"abc" * 1000,
    ],
    ids=["content-length", "chunked", "until-close"],
)
async def test_every_body_framing_is_read_whole(serve, client, reply: bytes) -> None:
    server = await serve(raw(reply, then="close" if b"Connection: close" in reply else ""))
    assert await get(client, server.url) == (200, b"abc" * 1000)
    assert await get(client, server.url) == (200, b"abc" * 1000)
    assert server.connections == (2 if b"Connection: close" in reply else 1)


async def test_an_interim_answer_is_skipped(serve, client) -> None:
    server = await serve(raw(b"HTTP/1.1 100 Continue\r\n\r\n" + whole(b"done")))
    assert await get(client, server.url) == (200, b"done")


async def test_a_pooled_connection_the_server_closed_is_replaced(serve, client) -> None:
    server = await serve(raw(whole(b"one"), then="close"))  # closes without saying so
    assert await get(client, server.url) == (200, b"one")
    await asyncio.sleep(0.05)
    assert await get(client, server.url) == (200, b"one")
    assert server.connections == 2


async def test_a_reused_connection_that_dies_before_answering_is_tried_once_more(serve, client) -> None:
    server = await serve(raw(whole(b"one")), raw(b"", then="close"), raw(whole(b"two")))
    assert await get(client, server.url) == (200, b"one")
    assert await get(client, server.url) == (200, b"two")
    assert [r.connection for r in server.requests] == [1, 1, 2]


async def test_a_fresh_connection_that_dies_before_answering_is_an_error(serve, client) -> None:
    server = await serve(raw(b"", then="close"))
    with pytest.raises(ProtocolError, match="closed before"):
        await get(client, server.url)
    assert len(server.requests) == 1


async def test_requests_beyond_max_connections_wait_for_a_slot(serve) -> None:
    server = await serve(raw(whole(b"x")))
    async with UpstreamClient(max_connections=1) as client:
        first = await client.request("POST", server.url + "/x", content=b"{}", timeout=5)
        second = asyncio.create_task(get(client, server.url))
        await asyncio.sleep(0.05)
        assert not second.done()
        assert await first.read(10) == b"x"
        first.close()
        assert await asyncio.wait_for(second, 5) == (200, b"x")


async def test_a_closed_client_refuses_requests(serve) -> None:
    server = await serve(raw(whole(b"x")))
    client = UpstreamClient()
    await client.aclose()
    with pytest.raises(ConnectError, match="closed"):
        await get(client, server.url)


async def test_connection_refused_names_no_address(client) -> None:
    from tests.conftest import free_port

    port = free_port()
    with pytest.raises(ConnectError) as caught:
        await get(client, f"http://127.0.0.1:{port}/v1")
    assert str(port) not in str(caught.value) and "127.0.0.1" not in str(caught.value)


async def test_header_values_that_would_split_the_request_are_refused(client) -> None:
    with pytest.raises(ValueError, match="X-Id"):
        await client.request("POST", "http://127.0.0.1:9/v1/x", headers={"X-Id": "a\r\nEvil: 1"}, timeout=1)


# -- bounds and timeouts --------------------------------------------------------------------------
async def test_a_huge_head_is_refused(serve, client) -> None:
    server = await serve(raw(b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * 70_000 + b"\r\n\r\n", then="hang"))
    with pytest.raises(ProtocolError, match="head is too large"):
        await get(client, server.url)


async def test_a_body_longer_than_the_limit_is_refused(serve, client) -> None:
    server = await serve(raw(whole(b"a" * 5000)))
    with pytest.raises(TooLarge):
        await get(client, server.url, limit=4096)


async def test_a_big_body_is_read_while_reading_pauses_and_resumes(serve, client) -> None:
    body = bytes(range(256)) * (12 * 1024)  # 3 MiB, more than is buffered before reading pauses
    server = await serve(raw(whole(body)))
    response = await client.request("POST", server.url + "/x", timeout=5)
    await asyncio.sleep(0.2)  # let it all arrive unread
    assert response._paused
    assert await response.read(len(body)) == body and not response._paused
    response.close()
    assert await get(client, server.url, limit=len(body)) == (200, body)
    assert server.connections == 1


async def test_a_stall_mid_body_times_out_and_the_connection_is_dropped(serve, client) -> None:
    server = await serve(raw(whole(b"0123456789")[:-5], then="hang"), raw(whole(b"ok")))
    with pytest.raises(Timeout, match="0.2s"):
        await get(client, server.url, timeout=0.2)
    assert await get(client, server.url) == (200, b"ok")
    assert server.connections == 2


async def test_a_malformed_answer_is_a_protocol_error(serve, client) -> None:
    server = await serve(raw(b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n", then="hang"))
    with pytest.raises(ProtocolError, match="not valid HTTP"):
        await get(client, server.url)


async def test_an_oversized_event_ends_the_stream_with_an_error(serve, client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstreams, "_MAX_EVENT", 1024)

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(chunked(delta("Hello"))[: -len(b"0\r\n\r\n")])
        for _ in range(10):  # one line of 2 KB, in pieces: more than an event may hold
            writer.write(b"c8\r\n" + b"x" * 200 + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)
        await reader.read()

    server = await serve(big)
    text, end = await generate(engine_for(server.url, client))
    assert text == "Hello" and end.reason == "error" and "larger than 1024 bytes" in str(end.error)


# -- TLS ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pair = make_self_signed(tmp_path_factory.mktemp("tls"), ["127.0.0.1"])
    return pair.cert


def server_tls(cert: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, cert.parent / "key.pem")
    return context


async def test_an_https_upstream_is_verified_and_its_connection_reused(serve, certificate: Path) -> None:
    server = await serve(raw(STREAM), tls=server_tls(certificate))
    url = server.url.replace("http://", "https://")
    async with upstream_client(ssl_context=ssl.create_default_context(cafile=str(certificate))) as client:
        engine = engine_for(url, client)
        assert (await generate(engine))[0] == "Hello there"
        assert (await generate(engine))[0] == "Hello there"
    assert server.connections == 1 and server.requests[0].headers["authorization"] == f"Bearer {KEY}"


async def test_an_https_upstream_with_an_unknown_certificate_is_refused(serve, client, certificate: Path) -> None:
    server = await serve(raw(STREAM), tls=server_tls(certificate))
    with pytest.raises(ConnectError, match="TLS failed: CERTIFICATE_VERIFY_FAILED"):
        await get(client, server.url.replace("http://", "https://"))
    assert server.requests == []


# -- server-sent events ---------------------------------------------------------------------------
def test_events_are_parsed_across_chunk_boundaries_and_line_endings() -> None:
    stream = (
        b": a comment\r\ndata: one\r\n\r\nevent: error\rdata: two\rdata: lines\r\r"
        b"data:no-space\n\ndata\n\nid: 7\nretry: 5\ndata: last"
    )
    for size in (1, 2, 3, 7, len(stream)):
        sse = _SSE()
        events = []
        for i in range(0, len(stream), size):
            events += sse.feed(stream[i : i + size])
        events += sse.end()
        assert events == [
            ("message", b"one"),
            ("error", b"two\nlines"),
            ("message", b"no-space"),
            ("message", b""),
            ("message", b"last"),
        ], size
