"""An OpenAI-compatible upstream that answers at once, for measuring gateways in front of it
(`bench/routing.py`): a raw asyncio HTTP/1.1 server with keep-alive, no framework, so what a
benchmark measures is the gateway and not this.

    python bench/mock_upstream.py --port 18400 [--key SECRET]

- `POST /v1/chat/completions` and `POST /v1/completions`: a fixed five-token answer, whole
  (`application/json`) or as server-sent events (`"stream": true`, chunked, with a usage
  chunk when `stream_options.include_usage` is set), naming the requested model.
- `GET /v1/models`: the one model, `echo` (any model name is answered).
- With `--key`, requests without `Authorization: Bearer SECRET` get a 401, as a real
  upstream would; the check is one comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid

WORDS = ("Hello", " from", " the", " mock", " upstream.")
_STATUS = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found", 411: b"Length Required"}


def _head(status: int, content_type: bytes, length: int | None, extra: bytes = b"") -> bytes:
    size = b"Transfer-Encoding: chunked\r\n" if length is None else b"Content-Length: %d\r\n" % length
    return b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\n%s%sConnection: keep-alive\r\n\r\n" % (
        status, _STATUS[status], content_type, size, extra,
    )


def _json(status: int, obj: object) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return _head(status, b"application/json", len(body)) + body


def _error(status: int, message: str) -> bytes:
    return _json(status, {"error": {"message": message, "type": "invalid_request_error", "code": None}})


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def answer(path: bytes, body: bytes) -> bytes:
    try:
        request = json.loads(body)
        model = request["model"]
    except (ValueError, KeyError, TypeError):
        return _error(400, "the body must be a JSON object with a model")
    chat = path.endswith(b"/chat/completions")
    prompt_tokens = max(1, len(body) // 4)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(WORDS), "total_tokens": prompt_tokens + len(WORDS)}
    ident, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
    kind = "chat.completion" if chat else "text_completion"
    if not request.get("stream"):
        text = "".join(WORDS)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"} if chat
                  else {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"})
        return _json(200, {"id": ident, "object": kind, "created": created, "model": model, "choices": [choice], "usage": usage})
    base = {"id": ident, "object": kind + (".chunk" if chat else ""), "created": created, "model": model}

    def event(obj: dict) -> bytes:
        return _chunk(b"data: " + json.dumps(base | obj, separators=(",", ":")).encode() + b"\n\n")

    def choice(text: str | None, finish: str | None) -> dict:
        if not chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": finish}

    parts = []
    if chat:
        parts.append(event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}))
    parts += [event({"choices": [choice(word, None)]}) for word in WORDS]
    parts.append(event({"choices": [choice(None, "stop")]}))
    if (request.get("stream_options") or {}).get("include_usage"):
        parts.append(event({"choices": [], "usage": usage}))
    parts.append(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    return _head(200, b"text/event-stream", None, b"Cache-Control: no-cache\r\n") + b"".join(parts)


class Upstream(asyncio.Protocol):
    """One connection: requests parsed from the buffer as they complete, answered in order."""

    key: bytes | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        out = []
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            lines = self.buffer[:end].split(b"\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if b"content-length" not in headers and lines[0].startswith(b"POST"):
                out.append(_error(411, "send Content-Length"))
                self.buffer = b""
                break
            length = int(headers.get(b"content-length", b"0"))
            if len(self.buffer) < end + 4 + length:
                break
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            out.append(self.respond(lines[0], headers, body))
        if out:
            self.transport.write(b"".join(out))  # type: ignore[attr-defined]

    def respond(self, request_line: bytes, headers: dict[bytes, bytes], body: bytes) -> bytes:
        method, path, _ = request_line.split(b" ", 2)
        path = path.split(b"?", 1)[0]
        if self.key is not None and headers.get(b"authorization") != b"Bearer " + self.key:
            return _error(401, "invalid api key")
        if method == b"POST" and path.endswith((b"/chat/completions", b"/completions")):
            return answer(path, body)
        if method == b"GET" and path.endswith(b"/models"):
            return _json(200, {"object": "list", "data": [{"id": "echo", "object": "model", "created": 0, "owned_by": "mock"}]})
        return _error(404, "no such endpoint")


async def serve(host: str, port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Upstream, host, port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18400)
    parser.add_argument("--key", help="the API key callers must send")
    args = parser.parse_args()
    Upstream.key = args.key.encode() if args.key else None
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
