"""The webhook channel: each alert as a signed JSON POST, so the receiver can tell it came from
this appliance and refuse a replay.

    [alerts.channels.ops-hook]
    type = "webhook"
    url = "https://hooks.example.org/appliance"   # http or https; no user:password@ in it
    secret_file = "keys/ops-hook.secret"          # relative to the data directory; mode 0600
    timeout_seconds = 5                           # per phase (connect, write, read); at most 60
    ca_file = ""                                  # a PEM bundle for a private CA; default: the system's

The body is the alert mapping as compact JSON (sorted keys). Two headers sign it:

    X-Appliance-Timestamp: 1714564800        Unix seconds when it was sent
    X-Appliance-Signature: sha256=<hex>      HMAC-SHA256 under the secret of b"<timestamp>.<body>"

A receiver verifies it in three steps: take the raw body bytes (before parsing any JSON) and
the two headers; refuse unless the timestamp is within five minutes of its own clock and the
HMAC matches, compared in constant time (`verify_signature` does both); and, to refuse a replay
inside that window, remember the signatures accepted in the last five minutes and refuse a
repeat. A re-send of an alert differs in its body (`ts`, `sends`), so it is never taken for a
replay.

Redirects are not followed, proxy environment variables are ignored, and any status but 2xx
fails the send. Error messages and `describe()` show only scheme, host and port: a URL's path
or query often holds a token of its own.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import ssl
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

import httpx
import msgspec
from msgspec import Meta

from appliance import __version__
from appliance.checks.channels._base import (
    DEFAULT_TIMEOUT,
    ChannelError,
    describe_error,
    parse_table,
    read_secret_file,
    resolve,
    to_json,
)
from appliance.errors import ConfigError

__all__ = ["SIGNATURE_HEADER", "TIMESTAMP_HEADER", "WebhookChannel", "sign", "verify_signature"]

TIMESTAMP_HEADER = "X-Appliance-Timestamp"
SIGNATURE_HEADER = "X-Appliance-Signature"
Timeout = Annotated[float, Meta(gt=0, le=60)]
_TIMESTAMP = re.compile(r"[0-9]{1,12}")


class WebhookTable(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    url: str
    secret_file: str
    timeout_seconds: Timeout = DEFAULT_TIMEOUT
    ca_file: str = ""


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def sign(secret: bytes | str, timestamp: str, body: bytes) -> str:
    """The signature header's value for `body` sent at `timestamp`: `sha256=<hex>`."""
    digest = hmac.new(_as_bytes(secret), timestamp.encode("ascii") + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify_signature(
    secret: bytes | str,
    timestamp: str | int,
    body: bytes,
    signature: str,
    *,
    now: float,
    tolerance_seconds: float = 300,
) -> bool:
    """For a receiver: True if `signature` is ours over `timestamp` and `body` and the timestamp
    is within `tolerance_seconds` of `now`, either way. Constant-time comparison."""
    timestamp = str(timestamp)
    if not _TIMESTAMP.fullmatch(timestamp) or abs(now - int(timestamp)) > tolerance_seconds:
        return False
    expected = sign(secret, timestamp, body).encode("ascii")
    return hmac.compare_digest(expected, signature.strip().encode("utf-8", "replace"))


class WebhookChannel:
    """POSTs each alert to `url`, signed with `secret`; see the module docstring."""

    kind = "webhook"

    def __init__(
        self,
        name: str,
        url: str,
        secret: bytes,
        *,
        timeout_seconds: float = DEFAULT_TIMEOUT,
        ca_file: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        where = f"alerts.channels.{name}"
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL:
            raise ConfigError(f"{where}.url: not a valid URL") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ConfigError(f"{where}.url: expected an http:// or https:// URL with a host")
        if parsed.userinfo:
            raise ConfigError(f"{where}.url: credentials in the URL are not supported; the signature authenticates")
        if not secret:
            raise ConfigError(f"{where}: the webhook secret is empty")
        self.name = name
        self._url = url
        self.timeout_seconds = float(timeout_seconds)
        host = f"[{parsed.host}]" if ":" in parsed.host else parsed.host
        self.target = f"{parsed.scheme}://{host}:{parsed.port or (443 if parsed.scheme == 'https' else 80)}"
        self._secret = secret
        self._clock = clock
        self._ca_file = ca_file
        try:  # built once: loading the trust store per send would cost more than the POST
            self._verify = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{where}.ca_file: cannot load {ca_file}: {describe_error(exc)}") from None

    @classmethod
    def from_table(cls, name: str, table: Mapping[str, Any], *, data_dir: Path) -> WebhookChannel:
        spec = parse_table(name, table, WebhookTable)
        secret = read_secret_file(f"alerts.channels.{name}.secret_file", resolve(spec.secret_file, data_dir))
        ca_file = resolve(spec.ca_file, data_dir) if spec.ca_file else None
        return cls(name, spec.url, secret, timeout_seconds=spec.timeout_seconds, ca_file=ca_file)

    def send(self, alert: Mapping[str, Any]) -> None:
        body = to_json(dict(alert))
        timestamp = str(int(self._clock()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"appliance/{__version__}",
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self._secret, timestamp, body),
        }
        try:
            with httpx.Client(timeout=self.timeout_seconds, verify=self._verify, trust_env=False) as client:
                response = client.post(self._url, content=body, headers=headers)
        except httpx.TimeoutException:
            raise ChannelError(
                self.name, self.kind, f"POST to {self.target} timed out after {self.timeout_seconds:g}s"
            ) from None
        except httpx.HTTPError as exc:
            raise ChannelError(self.name, self.kind, f"POST to {self.target} failed: {self._reason(exc)}") from None
        if not 200 <= response.status_code < 300:
            raise ChannelError(self.name, self.kind, f"POST to {self.target} answered HTTP {response.status_code}")

    def _reason(self, exc: BaseException) -> str:
        # httpx wraps the OS error; its own text may quote the URL, whose path can be a token.
        cause = exc.__cause__ or exc.__context__
        reason = describe_error(cause if isinstance(cause, OSError) else exc)
        return reason.replace(self._url, self.target)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "target": self.target,
            "timeout_seconds": self.timeout_seconds,
            "signed": True,
            "ca_file": str(self._ca_file) if self._ca_file else None,
        }

    def __repr__(self) -> str:
        return f"WebhookChannel({self.name!r}, {self.target!r})"
