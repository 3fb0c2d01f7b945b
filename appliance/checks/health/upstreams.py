"""The `upstreams` job: each registered remote upstream reached with one cheap authenticated
call, `GET {base_url}/models` with its decrypted key; one finding per upstream (its name).

401 or 403 is "fail: key refused"; no connection or no answer in time, "fail: unreachable";
another error status, "fail"; an answer without some of the models the upstream is
registered for, "warn". The key is sent only as `Authorization: Bearer`, redirects are not
followed (the key cannot be sent elsewhere), and no finding ever holds it: every text from
the upstream or httpx is scrubbed of it and of key-shaped strings.

Options (`[check.upstreams]`): `request_timeout_seconds` (5).
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from appliance.checks.findings import Finding, fail, ok, warn
from appliance.checks.registry import CheckContext, CheckJob
from appliance.errors import ApplianceError
from appliance.redaction import scrub_keys
from appliance.routing.upstream_registry import Upstream, UpstreamRegistry

__all__ = ["NAME", "check_upstream", "run", "upstreams_job"]

NAME = "upstreams"


def upstreams_job(ctx: CheckContext) -> CheckJob:
    return CheckJob(
        NAME,
        lambda: run(ctx),
        300.0,
        description="each remote upstream reachable and its key accepted (GET /models)",
        timeout_seconds=120.0,
    )


def run(ctx: CheckContext) -> list[Finding]:
    registry = ctx.services.upstreams
    upstreams = registry.list()
    if not upstreams:
        return [ok("no upstream is registered")]
    timeout = ctx.option(NAME, "request_timeout_seconds", 5.0)
    with httpx.Client(timeout=timeout, follow_redirects=False, headers={"User-Agent": "appliance-health"}) as client:
        return [check_upstream(client, registry, upstream, timeout=timeout) for upstream in upstreams]


def check_upstream(client: httpx.Client, registry: UpstreamRegistry, upstream: Upstream, *, timeout: float) -> Finding:
    name = upstream.name
    try:
        key = registry.api_key(name)
    except ApplianceError as exc:  # its messages never hold the key
        return fail(f"its API key cannot be used: {exc.message}", name)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    started = time.perf_counter()
    try:
        response = client.get(upstream.base_url + "/models", headers=headers)
    except httpx.TimeoutException:
        return fail(f"unreachable: no answer within {timeout:g} s", name)
    except httpx.HTTPError as exc:
        return fail(f"unreachable: {_clean(str(exc) or type(exc).__name__, key)}", name)
    ms = round((time.perf_counter() - started) * 1000, 1)
    details: dict[str, Any] = {"status_code": response.status_code, "latency_ms": ms}
    if response.status_code in (401, 403):
        why = "key refused" if key else "it needs an API key and none is set"
        return fail(f"{why} (HTTP {response.status_code})", name, **details)
    if response.status_code >= 300:
        return fail(f"GET /models answered HTTP {response.status_code}", name, **details)
    listed = _model_ids(response)
    if listed is None:
        return warn("reachable, but GET /models did not answer an OpenAI model list", name, **details)
    missing = [m for m in upstream.models if m not in listed]
    details |= {"models_listed": len(listed), "missing": missing}
    if missing:
        return warn(f"reachable and its key accepted, but it does not list {', '.join(missing)}", name, **details)
    return ok(f"reachable, key accepted, {len(listed)} models listed ({ms} ms)", name, **details)


def _model_ids(response: httpx.Response) -> set[str] | None:
    try:
        data = response.json()["data"]
        return {str(item["id"]) for item in data}
    except (ValueError, KeyError, TypeError):
        return None


def _clean(text: str, key: str | None) -> str:
    if key:
        text = text.replace(key, "[API_KEY]")
    return scrub_keys(text)[:300]
