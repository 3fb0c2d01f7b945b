"""Small helpers for tests that talk to a real server over HTTP as its admin."""

from __future__ import annotations

import json
import time

import httpx

from tests.conftest import Server


def admin(server: Server, method: str, path: str, **kwargs: object) -> httpx.Response:
    return httpx.request(method, server.url + path, headers={"Authorization": f"Bearer {server.admin_key}"},
                         timeout=60, **kwargs)  # type: ignore[arg-type]


def audit_records(server: Server, kind: str | None = None) -> list[dict[str, object]]:
    params = {"limit": 1000} | ({"kind": kind} if kind else {})
    response = admin(server, "GET", "/admin/audit", params=params)
    assert response.status_code == 200, response.text
    return response.json()["data"]


def request_record(server: Server, request_id: str, timeout: float = 10) -> dict[str, object]:
    """The request's audit record (written just after the response ends)."""
    deadline = time.monotonic() + timeout
    while True:
        for record in audit_records(server, "request"):
            if record["body"].get("request_id") == request_id:
                return record
        if time.monotonic() > deadline:
            raise AssertionError(f"no audit record for {request_id}")
        time.sleep(0.1)


def sse_events(response: httpx.Response) -> list[object]:
    events = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events
