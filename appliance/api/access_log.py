"""The access log: one line per HTTP request, written once its response has gone out.

It replaces uvicorn's own line, which is written before the response's first byte is sent
and so sits on every request's path; here the client already has its answer (it costs a
log record, a JSON line and a write to stderr). It wraps the whole app, so requests that
no route matched are logged too. The line keeps uvicorn's shape, with the time the request
took, and carries the request id (`appliance.logs`); key-shaped strings in the path are
scrubbed as in every other line."""

from __future__ import annotations

import logging
import time

from litestar.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

log = logging.getLogger("appliance.access")


class AccessLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not log.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            log.info(
                '%s - "%s %s HTTP/%s" %s %.1fms',
                get_client_addr(scope),  # type: ignore[arg-type]
                scope["method"],
                get_path_with_query_string(scope),  # type: ignore[arg-type]
                scope["http_version"],
                status or "-",  # no response started: the client went away, or the app failed
                (time.perf_counter() - started) * 1000,
            )
