"""Runs the HTTP app in the foreground under uvicorn. SIGTERM and Ctrl-C stop accepting new
connections, let requests in flight finish (up to the grace period), then close the engines
and the store."""

from __future__ import annotations

import logging

import uvicorn

from appliance.api.app import create_app
from appliance.config import Settings

log = logging.getLogger(__name__)


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
    server = uvicorn.Server(config)
    log.info("appliance listening on http://%s:%d", settings.server.host, settings.server.port)
    server.run()
    if not server.started:
        raise SystemExit(1)
