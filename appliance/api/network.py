"""Where a request comes from and where it was sent: the client address (through trusted
proxies only), the Host allow-list against DNS rebinding, and connections on the local admin
socket, which carry the peer's uid instead of an address."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

import msgspec
from litestar.types import ASGIApp, Receive, Scope, Send

from appliance.api.errors import error_body
from appliance.config import WILDCARD_HOSTS, Settings

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# The admin socket's protocol reports the peer as ("local-uid:<uid>", <pid>): no TCP peer can
# have such an address, so it cannot be forged over the network.
LOCAL_PEER_PREFIX = "local-uid:"
UNCHECKED_PATHS = frozenset({"/healthz"})  # liveness probes may use any Host
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class TrustedProxies:
    """The reverse proxies whose X-Forwarded-For is believed (`server.trusted_proxies`)."""

    def __init__(self, entries: Iterable[str] = ()) -> None:
        self.networks: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(e, strict=False) for e in entries)

    def client_address(self, scope: Scope) -> str:
        return client_address(scope, self.networks)


def local_uid(scope: Scope) -> int | None:
    """The uid of the process on the other end of the admin socket, or None for TCP."""
    client = scope.get("client")
    if client and isinstance(client[0], str) and client[0].startswith(LOCAL_PEER_PREFIX):
        return int(client[0].removeprefix(LOCAL_PEER_PREFIX))
    return None


def client_address(scope: Scope, trusted: tuple[IPNetwork, ...]) -> str:
    """The client's address: the TCP peer, or, when the peer is a trusted proxy, the nearest
    address in X-Forwarded-For that is not one (read right to left, as proxies append)."""
    client = scope.get("client")
    if not client:
        return ""
    peer = str(client[0])
    if peer.startswith(LOCAL_PEER_PREFIX):
        return peer
    if not trusted or not _is_trusted(peer, trusted):
        return peer
    forwarded = [v for k, v in scope.get("headers", []) if k == b"x-forwarded-for"]
    hops = [h.strip() for value in forwarded for h in value.decode("latin-1").split(",") if h.strip()]
    for hop in reversed(hops):
        if not _is_trusted(hop, trusted):
            return hop if _is_ip(hop) else peer
    return peer


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_trusted(address: str, trusted: tuple[IPNetwork, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


def allowed_hosts(settings: Settings) -> frozenset[str]:
    names = {*_LOOPBACK_NAMES, *(h.lower().rstrip(".") for h in settings.server.allowed_hosts)}
    if settings.server.host not in WILDCARD_HOSTS:
        names.add(settings.server.host.lower().strip("[]"))
    return frozenset(names)


def host_of(header: str) -> str:
    """`Example.LAN:8080` -> `example.lan`; `[::1]:8080` -> `::1`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else ""
    name, _, _ = header.partition(":") if header.count(":") == 1 else (header, "", "")
    return name.rstrip(".")


class HostCheckMiddleware:
    """403 in the OpenAI error shape for a Host that is not on the allow-list, or no Host at
    all: a web page that rebinds its own name to this box's address cannot reach the API.
    Liveness probes (`/healthz`) and the local admin socket are not checked."""

    def __init__(self, app: ASGIApp, hosts: frozenset[str]) -> None:
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNCHECKED_PATHS or local_uid(scope) is not None:
            await self.app(scope, receive, send)
            return
        host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), "")
        if host_of(host) in self.hosts:
            await self.app(scope, receive, send)
            return
        await _refuse(send, "This server does not answer for that Host." if host else "A Host header is required.")


async def _refuse(send: Send, message: str) -> None:
    body = msgspec.json.encode(error_body(message, "invalid_request_error", "host_not_allowed"))
    headers: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    start: Any = {"type": "http.response.start", "status": 403, "headers": headers}
    await send(start)
    await send({"type": "http.response.body", "body": body, "more_body": False})
