"""The HTTP/1.1 client upstream engines call with: keep-alive connections pooled per origin, on
asyncio protocols with httptools' C parser (the one uvicorn serves with), no per-request work
beyond writing the request and parsing the answer. Why not httpx here: docs/design-decisions.md.

- One request at a time per connection; a connection goes back to the pool only once its
  answer was read to the end and the server lets it stay open. A pooled connection that the
  server closed is known at once (the loop sees the hang-up), and a request whose reused
  connection dies before a byte of the answer is sent once more on a new one.
- `timeout` bounds connecting and each wait for more of the answer; the caller bounds the
  whole exchange (and any wait for a free connection slot) itself.
- Bounded: the response head to 64 KiB, `Response.read` to what the caller allows; reading
  pauses while more than 1 MiB of the body waits to be consumed.
- No redirects, cookies, proxies (proxy variables are ignored) or content codings (it asks
  for identity). `https` verifies the server with `ssl.create_default_context()`.
- Nothing is logged; errors say what failed, never a header or the URL.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
from functools import lru_cache
from typing import NamedTuple

import httptools

__all__ = ["ConnectError", "HTTPError", "ProtocolError", "Response", "Timeout", "TooLarge", "UpstreamClient"]

_MAX_HEAD = 64 * 1024
_PAUSE_AT = 1024 * 1024  # bytes of body waiting to be consumed before reading pauses


class HTTPError(Exception):
    """No (complete) answer: could not connect, timed out, or the answer was broken."""


class ConnectError(HTTPError):
    pass


class Timeout(HTTPError):
    pass


class ProtocolError(HTTPError):
    pass


class TooLarge(ProtocolError):
    """More than the caller reads."""


class _Target(NamedTuple):
    origin: tuple[str, str, int]  # scheme, host, port
    host_header: str
    path: str


@lru_cache(maxsize=256)
def _target(url: str) -> _Target:
    scheme, _, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    if scheme not in ("http", "https") or not netloc or "@" in netloc:
        raise ValueError("the URL must be http(s)://host[:port][/path]")
    host, port = netloc, 443 if scheme == "https" else 80
    if netloc.startswith("["):  # an IPv6 literal
        host, _, tail = netloc[1:].partition("]")
        if tail:
            port = int(tail.removeprefix(":"))
    elif ":" in netloc:
        host, _, digits = netloc.rpartition(":")
        port = int(digits)
    return _Target((scheme, host, port), netloc, slash + path or "/")


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; `response` is the answer being read on it, if any."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.alive = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.alive = True

    def data_received(self, data: bytes) -> None:
        if self.response is None:  # bytes nobody asked for: the connection cannot be trusted
            self.close()
            return
        self.response._feed(data)

    def eof_received(self) -> bool:
        return False  # close; a half-closed connection is of no use

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        if self.response is not None:
            self.response._lost(exc)

    def close(self) -> None:
        self.alive = False
        if self.transport is not None:
            self.transport.close()


class Response:
    """An answer whose head has arrived; the body is read with `next_chunk` or `read`, and
    `close()` must follow (it returns the connection to the pool when that is safe)."""

    def __init__(self, client: UpstreamClient, origin: tuple[str, str, int], conn: _Connection, timeout: float) -> None:
        self.status = 0
        self.reason = ""
        self.headers: dict[str, str] = {}  # names in lower case; repeated headers joined with ", "
        self._client, self._origin, self._conn, self._timeout = client, origin, conn, timeout
        self._parser = httptools.HttpResponseParser(self)
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._received = 0  # bytes received before the head was complete
        self._head_size = 0  # bytes of the headers parsed
        self._informational = False
        self._head_done = self._done = self._keep_alive = self._paused = self._closed = False
        self._until_eof = False  # a body without a length ends when the connection does
        self._error: HTTPError | None = None
        self._waiter: asyncio.Future[None] | None = None

    # -- httptools callbacks (they must not raise) ---------------------------------------------
    def on_status(self, status: bytes) -> None:
        self.reason += status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # 1xx: an interim answer, the real one follows
            self._informational, self.headers, self.reason = True, {}, ""
            return
        if self._head_size > _MAX_HEAD:
            return  # `_feed` fails it
        self.status = status
        self._until_eof = (
            "content-length" not in self.headers
            and "chunked" not in self.headers.get("transfer-encoding", "").lower()
            and status not in (204, 304)
        )
        self._head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _PAUSE_AT and not self._paused and self._conn.transport is not None:
            self._paused = True
            self._conn.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self._keep_alive = self._parser.should_keep_alive()
        self._done = True
        self._wake()

    # -- from the connection --------------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        if self._done:  # more than the answer: do not reuse the connection
            self._keep_alive = False
            return
        if not self._head_done:
            self._received += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self._done:
                self._keep_alive = False
            else:
                self._fail(ProtocolError(f"the answer is not valid HTTP/1.1 ({type(exc).__name__})"))
            return
        if not self._head_done and (self._received > _MAX_HEAD or self._head_size > _MAX_HEAD):
            self._fail(ProtocolError("the response head is too large"))

    def _lost(self, exc: Exception | None) -> None:
        if self._done:
            return
        if self._head_done and self._until_eof and exc is None:
            self._done = True
            self._wake()
        else:
            self._fail(ProtocolError("the connection closed before the answer was complete"))

    def _fail(self, error: HTTPError) -> None:
        if self._error is None:
            self._error = error
        self._conn.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _time_out(self) -> None:
        self._fail(Timeout(f"no data from the server for {self._timeout:g}s"))

    async def _wait(self) -> None:
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        timer = loop.call_later(self._timeout, self._time_out)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    # -- for the caller -------------------------------------------------------------------------
    async def _head(self) -> None:
        while not self._head_done:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def next_chunk(self) -> bytes:
        """The body bytes that arrived since the last call (waiting for some); b"" at the end.
        Raises `HTTPError` when the answer breaks off or stalls for `timeout`."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            await self._wait()
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._paused and self._conn.transport is not None:
            self._paused = False
            self._conn.transport.resume_reading()
        return data

    async def read(self, limit: int) -> bytes:
        """The whole body; `TooLarge` when it is longer than `limit` bytes."""
        parts, size = [], 0
        while data := await self.next_chunk():
            size += len(data)
            if size > limit:
                raise TooLarge(f"the answer is larger than {limit} bytes")
            parts.append(data)
        return b"".join(parts)

    @property
    def complete(self) -> bool:
        """Whether the whole body has been received (read or not)."""
        return self._done and self._error is None

    def close(self) -> None:
        """Done with the answer: the connection goes back to the pool if the answer ended
        cleanly and may be followed by another, and is closed otherwise (hanging up on a
        server still sending)."""
        if self._closed:
            return
        self._closed = True
        conn = self._conn
        conn.response = None
        if not self._done and self._error is None:
            self._error = ProtocolError("the answer was closed before its end")
            self._wake()
        reusable = self._done and self._error is None and self._keep_alive and not self._chunks and conn.alive
        self._client._release(self._origin, conn, reusable)


class UpstreamClient:
    """Pooled connections to any number of origins, for one event loop. At most
    `max_connections` requests are in flight (more wait for a slot), and at most `max_idle`
    idle connections per origin are kept, each for `keepalive_seconds`."""

    def __init__(
        self,
        *,
        max_connections: int = 100,
        max_idle: int = 32,
        keepalive_seconds: float = 4.0,  # under the 5 s after which uvicorn and node close idle connections
        ssl_context: ssl.SSLContext | None = None,
        user_agent: str = "appliance-upstream",
    ) -> None:
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._max_idle = max_idle
        self._keepalive = keepalive_seconds
        self._ssl = ssl_context
        self._user_agent = user_agent
        self._closed = False

    async def __aenter__(self) -> UpstreamClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the idle connections and refuse new requests (answers being read finish)."""
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    async def request(
        self, method: str, url: str, *, content: bytes = b"", headers: dict[str, str] | None = None, timeout: float
    ) -> Response:
        """Send the request and wait for the answer's head. The caller must `close()` the
        `Response`. Raises `HTTPError`; header values holding CR, LF or NUL are a ValueError."""
        if self._closed:
            raise ConnectError("the client is closed")
        target = _target(url)
        lines = [
            f"{method} {target.path} HTTP/1.1",
            f"Host: {target.host_header}",
            f"User-Agent: {self._user_agent}",
            "Accept-Encoding: identity",
        ]
        if content or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(content)}")
        for name, value in (headers or {}).items():
            if "\r" in value or "\n" in value or "\0" in value:
                raise ValueError(f"header {name} has a value that cannot be sent")
            lines.append(f"{name}: {value}")
        lines.append("\r\n")
        data = "\r\n".join(lines).encode("latin-1") + content
        await self._slots.acquire()
        try:
            return await self._exchange(target, data, timeout)
        except BaseException:
            self._slots.release()
            raise

    async def _exchange(self, target: _Target, data: bytes, timeout: float) -> Response:
        while True:
            conn = self._pooled(target.origin)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(target, timeout)
            response = Response(self, target.origin, conn, timeout)
            conn.response = response
            try:
                assert conn.transport is not None
                conn.transport.write(data)
                await response._head()
            except HTTPError:
                fresh_failure = not reused or response._received or not isinstance(response._error, ProtocolError)
                self._forget(response)
                if fresh_failure:
                    raise
                continue  # the server had closed the pooled connection: once more on a new one
            except BaseException:
                self._forget(response)
                raise
            return response

    def _forget(self, response: Response) -> None:
        """A response that never reached the caller: close its connection, keep its slot."""
        response._closed = True
        response._conn.response = None
        response._conn.close()

    def _pooled(self, origin: tuple[str, str, int]) -> _Connection | None:
        conns = self._idle.get(origin)
        now = time.monotonic()
        while conns:
            conn = conns.pop()
            if conn.alive and now - conn.idle_since < self._keepalive:
                return conn
            conn.close()
        return None

    async def _connect(self, target: _Target, timeout: float) -> _Connection:
        scheme, host, port = target.origin
        tls = None
        if scheme == "https":
            tls = self._ssl or _default_ssl()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    _Connection, host, port, ssl=tls, server_hostname=host if tls else None
                )
        except TimeoutError:
            raise Timeout(f"no connection within {timeout:g}s") from None
        except ssl.SSLError as exc:
            raise ConnectError(f"TLS failed: {exc.reason or type(exc).__name__}") from None
        except OSError as exc:
            raise ConnectError(_reason(exc)) from None
        return conn

    def _release(self, origin: tuple[str, str, int], conn: _Connection, reusable: bool) -> None:
        self._slots.release()
        if not reusable or self._closed:
            conn.close()
            return
        conns = self._idle.setdefault(origin, [])
        if len(conns) >= self._max_idle:
            conns.pop(0).close()
        conn.idle_since = time.monotonic()
        conns.append(conn)


def _reason(exc: OSError) -> str:
    """Why a connection failed, without the addresses asyncio puts in its messages."""
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host ({exc.strerror})"
    return os.strerror(exc.errno) if exc.errno else "connection failed"


@lru_cache(maxsize=1)
def _default_ssl() -> ssl.SSLContext:
    return ssl.create_default_context()
