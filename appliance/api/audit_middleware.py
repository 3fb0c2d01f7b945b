"""Gives every authenticated-path request exactly one audit record, whatever happens to it
(failed authentication is counted per client address instead, see `auth.failures`).

The middleware creates the `RequestContext`, lets handlers fill it in, and when the response
is complete calls `Governance.complete`, holding back the response's final message until the
record is committed: a client that received a response can rely on it being in the log (the
reservation's settlement and the metrics follow once the response is sent). A
non-streaming response is held whole, so a failed audit write becomes a 503 instead (fail
closed). Streams commit before their `[DONE]` line (see `openai_routes`). A request cut short
by the client is still settled and recorded, without waiting."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar.exceptions import HTTPException
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from appliance.api.context import CONTEXT_KEY, assign_request_id
from appliance.api.errors import error_body, from_runtime
from appliance.errors import ApplianceError, AuditUnavailable
from appliance.governance import CLIENT_CLOSED, RequestContext
from appliance.logs import request_id_var
from runtime.errors import RuntimeFault

log = logging.getLogger(__name__)

UNAUDITED = frozenset({"/healthz", "/readyz"})


def status_of(exc: BaseException) -> int:
    if isinstance(exc, ApplianceError):
        return exc.status
    if isinstance(exc, RuntimeFault):
        return from_runtime(exc).status
    if isinstance(exc, HTTPException):
        return exc.status_code
    return 500


def code_of(exc: BaseException) -> str | None:
    if isinstance(exc, ApplianceError):
        return exc.code
    if isinstance(exc, RuntimeFault):
        return from_runtime(exc).code
    return None


class AuditMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNAUDITED:
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})  # type: ignore[assignment]
        request_id = assign_request_id(scope)
        services = scope["app"].state.services
        ctx = RequestContext(
            request_id=request_id,
            route=f"{scope['method']} {scope['path']}",
            client=services.trusted_proxies.client_address(scope),
        )
        state[CONTEXT_KEY] = ctx
        request_id_var.set(request_id)  # this task's log lines carry it (each request is its own task)
        governance = services.governance
        held: Message | None = None
        status = CLIENT_CLOSED
        sent_final = False

        async def send_wrapper(message: Message) -> None:
            nonlocal held, status, sent_final
            if message["type"] == "http.response.start":
                status = message["status"]
                held = message
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            final = not message.get("more_body", False)
            settle = None
            if final and not ctx.completed:
                ctx.principal = ctx.principal or scope.get("user")
                try:
                    settle = await governance.record(ctx, status)
                except AuditUnavailable as exc:
                    if held is not None:  # nothing sent yet: refuse instead of answering unrecorded
                        held, message = _error_response(exc)
                    else:
                        log.error("request %s answered but not recorded: %s", request_id, exc)
            try:
                if held is not None:
                    await send(held)
                    held = None
                await send(message)
                sent_final = sent_final or final
            finally:
                if settle is not None:  # once the answer is on its way: the client does not wait for it
                    settle()

        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException as exc:
            if not ctx.completed:
                ctx.principal = ctx.principal or scope.get("user")
                ctx.error_code = ctx.error_code or code_of(exc)
                governance.complete_nowait(ctx, status_of(exc))
            raise
        finally:
            if not ctx.completed:  # the client went away mid-response
                ctx.principal = ctx.principal or scope.get("user")
                governance.complete_nowait(ctx, status if sent_final else CLIENT_CLOSED)


def _error_response(exc: ApplianceError) -> tuple[Message, Message]:
    body = msgspec.json.encode(error_body(exc.message, exc.type, exc.code, exc.param))
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    start: Message = {"type": "http.response.start", "status": exc.status, "headers": headers}  # type: ignore[typeddict-item]
    return start, {"type": "http.response.body", "body": body, "more_body": False}  # type: ignore[typeddict-item]
