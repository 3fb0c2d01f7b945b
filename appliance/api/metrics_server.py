"""`[metrics] listen`: `GET /metrics` without a key, on a bind of its own, for a scraper on
this machine. Nothing else is served there. It runs on the app's event loop with uvicorn's
HTTP protocol, and is started and closed by the app's lifespan.

A bind that is not loopback needs `metrics.allow_remote = true` (checked with the settings).
Requests must name an allowed Host, as on the API port: the bind address, localhost,
127.0.0.1, ::1 or `server.allowed_hosts`, so a web page cannot read it by DNS rebinding."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from appliance.api.network import HostCheckMiddleware, allowed_hosts
from appliance.checks.metrics import CONTENT_TYPE, Metrics
from appliance.config import WILDCARD_HOSTS, Settings
from appliance.errors import ConfigError

__all__ = ["MetricsServer", "start_metrics_server"]

log = logging.getLogger(__name__)
_CLOSE_SECONDS = 5.0


class MetricsServer:
    def __init__(self, server: asyncio.Server, state: ServerState) -> None:
        self._server = server
        self._state = state

    @property
    def port(self) -> int:
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        self._server.close()
        for connection in list(self._state.connections):
            connection.shutdown()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CLOSE_SECONDS):
                while self._state.tasks:
                    await asyncio.sleep(0.05)
        for task in list(self._state.tasks):
            task.cancel()
        await self._server.wait_closed()


async def start_metrics_server(settings: Settings, metrics: Metrics) -> MetricsServer | None:
    """Listen on `metrics.listen`; None when it is not set. Raises `ConfigError` when the
    address cannot be bound."""
    if not settings.metrics.listen:
        return None
    host, port = settings.metrics.address()
    hosts = allowed_hosts(settings) | ({host.lower()} if host not in WILDCARD_HOSTS else set())
    config = uvicorn.Config(
        HostCheckMiddleware(_metrics_app(metrics), hosts),  # type: ignore[arg-type]
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        ws="none",
    )
    config.load()
    state = ServerState()

    def protocol() -> asyncio.Protocol:
        return config.http_protocol_class(config=config, server_state=state, app_state={})  # type: ignore[call-arg]

    try:
        server = await asyncio.get_running_loop().create_server(protocol, host=host, port=port)
    except OSError as exc:
        raise ConfigError(f"metrics.listen = {settings.metrics.listen!r} cannot be bound: {exc.strerror}") from None
    log.info("metrics without a key on http://%s:%d/metrics", host, port)
    return MetricsServer(server, state)


def _metrics_app(metrics: Metrics) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] != "/metrics":
            await _reply(send, 404, b"Only /metrics is served here.\n")
        elif scope["method"] not in ("GET", "HEAD"):
            await _reply(send, 405, b"Use GET.\n", [(b"allow", b"GET, HEAD")])
        else:
            body = await metrics.render()
            await _reply(send, 200, body, content_type=CONTENT_TYPE.encode(), head=scope["method"] == "HEAD")

    return app


async def _reply(
    send: Any,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    content_type: bytes = b"text/plain; charset=utf-8",
    head: bool = False,
) -> None:
    start = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": b"" if head else body})
