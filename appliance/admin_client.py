"""The running server's admin API over its local socket (`<data>/admin.sock`), for the CLI
verbs that change the live server, and for the console to come. No key is needed: the
server trusts the calling process's uid (root, the service user, the admin group).

Errors come back in the OpenAI shape and are raised as the control plane's own error types,
so the CLI reports them the same way whichever path a verb took.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import httpx

from appliance.errors import (
    ApplianceError,
    AuthenticationFailed,
    Conflict,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    RequestTooLarge,
    ServiceUnavailable,
)

_BY_STATUS: dict[int, type[ApplianceError]] = {
    400: InvalidRequest,
    401: AuthenticationFailed,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    413: RequestTooLarge,
    429: QuotaExceeded,
    503: ServiceUnavailable,
}


class LocalAdmin:
    def __init__(self, path: Path, *, timeout: float = 30.0) -> None:
        self.path = path
        self._client = httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://localhost", timeout=timeout)

    @classmethod
    def connect(cls, path: Path) -> LocalAdmin | None:
        """A client when a server is listening on `path`, else None (not running)."""
        if not path.exists():
            return None
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(path))
            except OSError:
                return None
        return cls(path)

    def request(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        try:
            response = self._client.request(method, path, json=json, params=params)
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(f"the running server did not answer on {self.path}: {exc}") from None
        if response.status_code < 400:
            return response.json()
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200] or f"HTTP {response.status_code}"
        raise _BY_STATUS.get(response.status_code, ApplianceError)(message)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> LocalAdmin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
