"""Runs the HTTP app in the foreground under uvicorn. SIGTERM and Ctrl-C stop accepting new
connections, let requests in flight finish (up to the grace period), then close the engines
and the store. Under systemd it reports readiness once the socket is bound, and pings the
watchdog while the event loop runs (`appliance.sd_notify`)."""

from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn

from appliance.api.app import create_app
from appliance.config import Settings
from appliance.sd_notify import Notifier

log = logging.getLogger(__name__)


class _NotifyingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, notifier: Notifier) -> None:
        super().__init__(config)
        self._notifier = notifier
        self._watchdog: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:  # lifespan done (models loaded) and the socket bound
            self._notifier.ready(f"serving on {self.config.host}:{self.config.port}")
            self._watchdog = asyncio.create_task(self._notifier.run_watchdog())

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._notifier.stopping()
        try:
            await super().shutdown(sockets)
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()


def serve(settings: Settings) -> None:
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        lifespan="on",
        log_config=None,
        access_log=True,
        timeout_graceful_shutdown=settings.server.graceful_shutdown_seconds,
        server_header=False,
        proxy_headers=False,
    )
    server = _NotifyingServer(config, Notifier())
    log.info("appliance listening on http://%s:%d", settings.server.host, settings.server.port)
    server.run()
    if not server.started:
        raise SystemExit(1)
