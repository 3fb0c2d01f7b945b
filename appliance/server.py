"""Runs the HTTP app in the foreground under uvicorn, on its TCP address (HTTPS when
`server.tls_cert` and `server.tls_key` are set) and on the local admin socket. SIGTERM and
Ctrl-C stop accepting new connections, let requests in flight finish (up to the grace
period), then close the engines and the store. Under systemd it reports readiness once the
sockets are bound, and pings the watchdog while the event loop runs (`appliance.sd_notify`).

The admin socket (`<data>/admin.sock`, mode 0660, group `server.admin_group`) needs no key:
its protocol reads the connecting process's uid with SO_PEERCRED, as PostgreSQL's peer
authentication does, and the app trusts root, the service's own user and the admin group
(`api.security`). The CLI reaches the running server through it."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import socket
import struct
from pathlib import Path
from typing import Any

import uvicorn

from appliance.api.access_log import AccessLog
from appliance.api.app import create_app
from appliance.api.network import LOCAL_PEER_PREFIX
from appliance.config import Settings, check_exposure
from appliance.errors import ConfigError
from appliance.sd_notify import Notifier

log = logging.getLogger(__name__)
_UCRED = struct.Struct("3i")  # pid, uid, gid


def _peer_credential_protocol(base: type) -> type:
    class PeerCredentials(base):  # type: ignore[misc,valid-type]
        """uvicorn's HTTP protocol, reporting the peer as its uid instead of an address."""

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            pid, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            self.client = (f"{LOCAL_PEER_PREFIX}{uid}", pid)

    return PeerCredentials


class _ApplianceServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, settings: Settings, notifier: Notifier) -> None:
        super().__init__(config)
        self._settings = settings
        self._notifier = notifier
        self._watchdog: asyncio.Task[None] | None = None
        self._admin_socket: Path | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.started:  # the lifespan failed, or the port could not be bound
            return
        if self._settings.server.admin_socket:
            await self._listen_locally(self._settings.paths.admin_socket)
        scheme = "https" if self.config.ssl else "http"
        self._notifier.ready(f"serving on {scheme}://{self.config.host}:{self.config.port}")
        self._watchdog = asyncio.create_task(self._notifier.run_watchdog())

    async def _listen_locally(self, path: Path) -> None:
        if path.exists():
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(path))
                log.error("%s is in use by another running server; not listening on it", path)
                return
            path.unlink()  # left by a server that did not stop cleanly
        protocol = _peer_credential_protocol(self.config.http_protocol_class)

        def create_protocol(_loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
            kwargs: dict[str, Any] = {"config": self.config, "server_state": self.server_state, "_loop": _loop}
            return protocol(app_state=self.lifespan.state, **kwargs)  # type: ignore[no-any-return]

        old_umask = os.umask(0o117)  # the socket is created 0660, never briefly wider
        try:
            server = await asyncio.get_running_loop().create_unix_server(create_protocol, path=str(path))
        finally:
            os.umask(old_umask)
        group = self._settings.server.admin_group
        if group:
            try:
                os.chown(path, -1, grp.getgrnam(group).gr_gid)
            except (KeyError, PermissionError) as exc:
                log.error("admin socket: cannot give group %r access: %s", group, exc)
        os.chmod(path, 0o660)
        self.servers.append(server)
        self._admin_socket = path
        log.info("local admin socket on %s", path)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._notifier.stopping()
        try:
            await super().shutdown(sockets)
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
            if self._admin_socket is not None:
                self._admin_socket.unlink(missing_ok=True)


def serve(settings: Settings) -> None:
    """Raises `ConfigError` for an exposure the settings do not allow (see `check_exposure`)."""
    check_exposure(settings)
    server_settings = settings.server
    config = uvicorn.Config(
        AccessLog(create_app(settings)),
        host=server_settings.host,
        port=server_settings.port,
        lifespan="on",
        log_config=None,
        access_log=False,  # `AccessLog` writes the line, after the response
        timeout_graceful_shutdown=server_settings.graceful_shutdown_seconds,
        server_header=False,
        proxy_headers=False,  # X-Forwarded-For is read by the app, from trusted proxies only
        ssl_certfile=server_settings.tls_cert or None,
        ssl_keyfile=server_settings.tls_key or None,
    )
    server = _ApplianceServer(config, settings, Notifier())
    scheme = "https" if server_settings.tls_cert else "http"
    log.info("appliance listening on %s://%s:%d", scheme, server_settings.host, server_settings.port)
    if scheme == "http" and server_settings.host not in ("127.0.0.1", "localhost", "::1") and not server_settings.trusted_proxies:
        log.warning(
            "serving plain HTTP on %s: API keys cross the network in clear; set server.tls_cert and server.tls_key "
            "(appliance init --tls makes a pair) or put a TLS proxy in front (server.trusted_proxies)",
            server_settings.host,
        )
    try:
        server.run()
    except OSError as exc:  # an unreadable certificate, say
        raise ConfigError(f"the server could not start: {exc}") from None
    if not server.started:
        raise SystemExit(1)
