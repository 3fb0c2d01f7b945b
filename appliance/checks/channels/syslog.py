"""The syslog channel: each alert as one RFC 5424 message, and the transport the audit
forwarder shares.

    [alerts.channels.siem]
    type = "syslog"
    address = "udp://siem.example.org:514"   # see below
    facility = "daemon"                      # kern, user, daemon, auth, authpriv, local0..local7, ...
    app_name = "appliance"                   # APP-NAME: printable US-ASCII, at most 48 characters
    timeout_seconds = 5                      # connect and send; at most 60

Addresses:
    udp://host[:514]              RFC 5426; a message over 8192 bytes has its MSG cut to fit.
                                  Delivery cannot be confirmed: a refusal (ICMP) shows only on a
                                  later send over the same socket, and a channel opens one per
                                  alert (the audit forwarder keeps its own and does see it).
    tcp://host[:601]              RFC 6587 octet-counting framing (`<length> <message>`)
    unix:///dev/log               a local datagram socket (rsyslog, syslog-ng, journald)
    unix-stream:///run/x.sock     a local stream socket, octet-counted like TCP

Each alert: MSGID `alert.<event>`, severity err for fail, warning for warn, notice for a
resolve, info otherwise, structured data `[alert@32473 id=... rule=... details="<json>"]`
(32473 is the enterprise number RFC 5612 reserves for examples) and MSG `FAIL disk: <summary>`.
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta

from appliance.checks.channels._base import DEFAULT_TIMEOUT, ChannelError, describe_error, parse_table, to_json
from appliance.checks.channels.rfc5424 import FACILITIES, SEVERITIES, format_rfc5424
from appliance.errors import ConfigError

__all__ = ["SyslogAddress", "SyslogChannel", "SyslogTransport", "alert_severity", "parse_address"]

SD_ID = "alert@32473"
UDP_MAX_BYTES = 8192  # rsyslog's default maxMessageSize; keeps clear of IP fragmentation limits
_DEFAULT_PORTS = {"udp": 514, "tcp": 601}


@dataclass(frozen=True, slots=True)
class SyslogAddress:
    scheme: str  # udp | tcp | unix | unix-stream
    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def stream(self) -> bool:
        return self.scheme in ("tcp", "unix-stream")

    @property
    def max_bytes(self) -> int | None:
        return UDP_MAX_BYTES if self.scheme == "udp" else None

    def __str__(self) -> str:
        if self.path:
            return f"{self.scheme}://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_address(address: str, *, where: str = "address") -> SyslogAddress:
    """`udp://host:port`, `tcp://host:port`, `unix:///path` or `unix-stream:///path`."""
    try:
        parts = urlsplit(address)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{where}: {address!r} is not a syslog address: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme in ("unix", "unix-stream"):
        if parts.netloc or not parts.path.startswith("/"):
            raise ConfigError(f"{where}: a unix socket address is unix:///absolute/path, got {address!r}")
        return SyslogAddress(scheme, path=parts.path)
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ConfigError(f"{where}: expected udp://host:port, tcp://host:port or unix:///path, got {address!r}")
    if parts.username or parts.password or parts.path.strip("/") or parts.query:
        raise ConfigError(f"{where}: a syslog address is only scheme://host:port, got {address!r}")
    return SyslogAddress(scheme, host=parts.hostname, port=port or _DEFAULT_PORTS[scheme])


class SyslogTransport:
    """One connection to a receiver, opened on the first send and again after a failure. Not
    for concurrent use: give each sender its own. `send` raises `OSError`."""

    def __init__(self, address: SyslogAddress, *, timeout_seconds: float = DEFAULT_TIMEOUT) -> None:
        self.address = address
        self.timeout_seconds = timeout_seconds
        self._sock: socket.socket | None = None

    def send(self, message: bytes) -> None:
        frame = f"{len(message)} ".encode("ascii") + message if self.address.stream else message
        reused = self._sock is not None and not self._peer_closed()
        if not reused:
            self.close()
        try:
            self._socket().sendall(frame)
        except OSError:
            self.close()
            if not reused:
                raise
            # A kept socket can go stale (the receiver restarted): one fresh try, which for a
            # datagram cannot duplicate, since the failed send delivered nothing.
            self._socket().sendall(frame)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            self._sock = self._connect()
        return self._sock

    def _connect(self) -> socket.socket:
        address = self.address
        if address.scheme == "tcp":
            return socket.create_connection((address.host, address.port), timeout=self.timeout_seconds)
        if address.scheme == "udp":
            family, kind, proto, _, sockaddr = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_DGRAM)[0]
            sock = socket.socket(family, kind, proto)
            target: Any = sockaddr
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM if address.stream else socket.SOCK_DGRAM)
            target = address.path
        try:
            sock.settimeout(self.timeout_seconds)
            sock.connect(target)  # a connected datagram socket reports ICMP refusals
        except OSError:
            sock.close()
            raise
        return sock

    def _peer_closed(self) -> bool:
        """Whether a stream receiver hung up. Writing to such a socket "succeeds" into the
        kernel's buffer and the message is lost, so look before each send."""
        if self._sock is None or not self.address.stream:
            return False
        poller = select.poll()  # a zero-timeout look first: recv on a socket with a timeout waits
        poller.register(self._sock, select.POLLIN)
        if not poller.poll(0):
            return False  # nothing to read: still connected
        try:
            return self._sock.recv(1, socket.MSG_PEEK) == b""  # readable: returns at once
        except OSError:
            return True


def alert_severity(alert: Mapping[str, Any]) -> int:
    if alert.get("event") == "resolve":
        return SEVERITIES["notice"]
    return {"fail": SEVERITIES["err"], "warn": SEVERITIES["warning"]}.get(
        str(alert.get("severity")), SEVERITIES["info"]
    )


def alert_line(alert: Mapping[str, Any]) -> str:
    """`FAIL disk: free disk 3% (< 10%)`, or `RESOLVED disk: ...`; the SMTP subject uses it too."""
    label = "RESOLVED" if alert.get("event") == "resolve" else str(alert.get("severity") or "info").upper()
    return f"{label} {alert.get('rule', '?')}: {alert.get('summary', '')}"


class SyslogTable(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    address: str
    facility: str = "daemon"
    app_name: str = "appliance"
    timeout_seconds: Annotated[float, Meta(gt=0, le=60)] = DEFAULT_TIMEOUT


class SyslogChannel:
    """Sends each alert as one RFC 5424 message over a connection of its own (alerts are rare,
    and a fresh connection per send keeps concurrent sends apart)."""

    kind = "syslog"

    def __init__(
        self,
        name: str,
        address: SyslogAddress,
        *,
        facility: str = "daemon",
        app_name: str = "appliance",
        timeout_seconds: float = DEFAULT_TIMEOUT,
    ) -> None:
        where = f"alerts.channels.{name}"
        if facility not in FACILITIES:
            raise ConfigError(f"{where}.facility: expected one of {sorted(FACILITIES)}, got {facility!r}")
        if not (0 < len(app_name) <= 48 and all(33 <= ord(ch) <= 126 for ch in app_name)):
            raise ConfigError(f"{where}.app_name: expected 1-48 printable US-ASCII characters, got {app_name!r}")
        self.name = name
        self.address = address
        self.facility = facility
        self.app_name = app_name
        self.timeout_seconds = float(timeout_seconds)

    @classmethod
    def from_table(cls, name: str, table: Mapping[str, Any], *, data_dir: Path) -> SyslogChannel:
        spec = parse_table(name, table, SyslogTable)
        address = parse_address(spec.address, where=f"alerts.channels.{name}.address")
        return cls(name, address, facility=spec.facility, app_name=spec.app_name, timeout_seconds=spec.timeout_seconds)

    def message(self, alert: Mapping[str, Any]) -> bytes:
        appliance = alert.get("appliance") or {}
        params = {
            key: alert.get(key) for key in ("id", "rule", "check", "subject", "severity", "event", "state", "sends")
        }
        params["version"] = appliance.get("version")
        params["details"] = to_json(alert.get("details") or {}).decode("utf-8")
        return format_rfc5424(
            facility=FACILITIES[self.facility],
            severity=alert_severity(alert),
            msg=alert_line(alert),
            timestamp=float(alert.get("ts") or time.time()),
            hostname=appliance.get("host") or socket.gethostname(),
            app_name=self.app_name,
            procid=os.getpid(),
            msgid=f"alert.{alert.get('event', 'open')}",
            structured_data=[(SD_ID, params)],
            max_bytes=self.address.max_bytes,
        )

    def send(self, alert: Mapping[str, Any]) -> None:
        message = self.message(alert)
        transport = SyslogTransport(self.address, timeout_seconds=self.timeout_seconds)
        try:
            transport.send(message)
        except OSError as exc:
            raise ChannelError(self.name, self.kind, f"send to {self.address} failed: {describe_error(exc)}") from None
        finally:
            transport.close()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "target": str(self.address),
            "facility": self.facility,
            "app_name": self.app_name,
            "timeout_seconds": self.timeout_seconds,
        }

    def __repr__(self) -> str:
        return f"SyslogChannel({self.name!r}, {str(self.address)!r})"
