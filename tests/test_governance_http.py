"""Governance end to end over real HTTP: audit records for requests and admin actions,
prompt retention, token budgets, rate limits, and the budget invariant under concurrency."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import MODEL_NAME, Server, run_cli, start_server, stop_server

CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8, "temperature": 0}


def _key(server: Server, *args: str) -> dict[str, Any]:
    out = run_cli("keys", "create", "--name", "gov-test", *args, "--json", data_dir=server.data_dir)
    return json.loads(out.stdout)


def _audit(server: Server, **params: Any) -> list[dict[str, Any]]:
    r = httpx.get(server.url + "/admin/audit", params=params | {"limit": 10_000}, headers={"Authorization": f"Bearer {server.admin_key}"})
    assert r.status_code == 200, r.text
    return r.json()["data"]


def _record_for(server: Server, request_id: str) -> dict[str, Any]:
    matches = [r for r in _audit(server) if r["body"].get("request_id") == request_id]
    assert len(matches) == 1, f"expected one audit record for {request_id}, found {len(matches)}"
    return matches[0]


def test_each_request_gets_one_audit_record_with_principal_tokens_and_cost(server: Server) -> None:
    key = _key(server, "--role", "user")
    r = httpx.post(server.base_url + "/chat/completions", json=CHAT | {"user": "alice@example.org"},
                   headers={"Authorization": f"Bearer {key['key']}"}, timeout=60)
    assert r.status_code == 200
    record = _record_for(server, r.headers["x-request-id"])
    body = record["body"]
    assert record["kind"] == "request" and record["key_id"] == key["id"] and record["team_id"] == "default"
    assert body["principal"] == {"key_id": key["id"], "key_name": "gov-test", "team": "default", "role": "user"}
    assert body["route"] == "POST /v1/chat/completions"
    assert body["model"] == MODEL_NAME and body["models_tried"] == [MODEL_NAME]
    assert body["outcome"] == "ok" and body["status"] == 200
    usage = r.json()["usage"]
    assert body["tokens"] == {"prompt": usage["prompt_tokens"], "completion": usage["completion_tokens"],
                              "cached": usage["prompt_tokens_details"]["cached_tokens"]}
    assert body["cost"] > 0 and body["latency_ms"] > 0 and body["client"] == "127.0.0.1"
    assert body["user"] == "alice@example.org"
    assert set(body["prompt"]) == {"sha256"} and len(body["prompt"]["sha256"]) == 64  # the default policy
    assert key["key"] not in json.dumps(record)


def test_streamed_requests_are_recorded_before_done(server: Server) -> None:
    key = _key(server, "--role", "user")
    with httpx.stream("POST", server.base_url + "/chat/completions", json=CHAT | {"stream": True},
                      headers={"Authorization": f"Bearer {key['key']}"}, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
        request_id = r.headers["x-request-id"]
    assert lines[-1] == "data: [DONE]"
    body = _record_for(server, request_id)["body"]
    assert body["outcome"] == "ok" and body["tokens"]["completion"] >= 1


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize(("policy", "kept"), [
    ("none", None),
    ("sha256", None),
    ("redacted", "user: Mail [EMAIL] about it"),
    ("full", "user: Mail bob@corp.example about it"),
])
def test_prompt_retention_per_key(server: Server, policy: str, kept: str | None) -> None:
    text = "user: Mail bob@corp.example about it"
    key = _key(server, "--role", "user", "--prompt-retention", policy)
    chat = CHAT | {"messages": [{"role": "user", "content": "Mail bob@corp.example about it"}]}
    r = httpx.post(server.base_url + "/chat/completions", json=chat, headers={"Authorization": f"Bearer {key['key']}"}, timeout=60)
    assert r.status_code == 200
    record = _record_for(server, r.headers["x-request-id"])
    prompt = record["body"].get("prompt")
    if policy == "none":
        assert prompt is None and "content" not in record
    elif policy == "sha256":
        assert prompt == {"sha256": _sha(text)} and "content" not in record
    else:  # the hashed body holds the digest; the kept text sits beside it, erasable
        assert prompt == {"kept": policy, "sha256": _sha(kept)}
        assert record["content"] == {"prompt": kept}
        assert "bob@corp.example" not in json.dumps(record["body"])


def test_admin_actions_record_who_what_before_and_after(server: Server) -> None:
    admin = {"Authorization": f"Bearer {server.admin_key}"}
    created = httpx.post(server.url + "/admin/keys", json={"name": "audited", "role": "user"}, headers=admin)
    revoked = httpx.delete(server.url + f"/admin/keys/{created.json()['id']}", headers=admin)
    create_rec = _record_for(server, created.headers["x-request-id"])
    revoke_rec = _record_for(server, revoked.headers["x-request-id"])
    assert create_rec["kind"] == "admin" and create_rec["body"]["action"] == "keys.create"
    assert create_rec["body"]["actor"]["role"] == "admin"
    assert create_rec["body"]["before"] is None and create_rec["body"]["after"]["name"] == "audited"
    assert created.json()["key"] not in json.dumps(create_rec)
    assert revoke_rec["body"]["action"] == "keys.revoke"
    assert revoke_rec["body"]["before"]["status"] == "active" and revoke_rec["body"]["after"]["status"] == "revoked"


def test_cli_admin_actions_are_audited_too(server: Server) -> None:
    # With the server running, the CLI goes through its admin socket: the local admin, by uid.
    key = _key(server, "--role", "user")
    run_cli("keys", "revoke", key["id"], data_dir=server.data_dir)
    records = [r for r in _audit(server, kind="admin") if r["body"].get("target") == key["id"]]
    assert [r["body"]["action"] for r in records] == ["keys.create", "keys.revoke"]
    assert all(r["body"]["actor"]["kind"] == "local" and r["body"]["actor"]["uid"] == os.getuid() for r in records)


def test_token_budget_is_a_hard_stop_with_a_clear_429(server: Server) -> None:
    key = _key(server, "--role", "user")
    admin = {"Authorization": f"Bearer {server.admin_key}"}
    budget = httpx.post(server.url + "/admin/budgets", headers=admin,
                        json={"scope": "key", "scope_id": key["id"], "amount": 120, "unit": "tokens", "period": "day"})
    assert budget.status_code == 201, budget.text
    client = openai.OpenAI(base_url=server.base_url, api_key=key["key"], max_retries=0)
    ok = 0
    with pytest.raises(openai.RateLimitError) as info:
        for _ in range(10):
            client.chat.completions.create(**CHAT)
            ok += 1
    assert 1 <= ok <= 4
    assert info.value.code == "insufficient_quota"
    assert "budget" in info.value.message and "resets at" in info.value.message
    assert int(info.value.response.headers["retry-after"]) > 0
    spent = sum(r["tokens"] for r in httpx.get(server.url + "/admin/usage", params={"by": "key", "key_id": key["id"]}, headers=admin).json()["data"])
    assert spent <= 120


def test_rate_limit_429_with_openai_headers(server: Server) -> None:
    key = _key(server, "--role", "user", "--rpm", "2")
    headers = {"Authorization": f"Bearer {key['key']}"}
    first = httpx.post(server.base_url + "/chat/completions", json=CHAT, headers=headers, timeout=60)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    httpx.post(server.base_url + "/chat/completions", json=CHAT, headers=headers, timeout=60)
    third = httpx.post(server.base_url + "/chat/completions", json=CHAT, headers=headers, timeout=60)
    assert third.status_code == 429
    assert third.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(third.headers["retry-after"]) >= 1
    assert third.headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-ratelimit-reset-requests" in third.headers


def test_budget_invariant_under_64_concurrent_requests_and_restart(tmp_path_factory: pytest.TempPathFactory, server: Server) -> None:
    """64 concurrent requests on a key whose token budget covers about 10 of them: spend never
    exceeds the budget, and after a restart the ledger equals the sum of the usage records."""
    data_dir = server.data_dir
    key = _key(server, "--role", "user")
    admin = {"Authorization": f"Bearer {server.admin_key}"}
    probe = httpx.post(server.base_url + "/chat/completions", json=CHAT, headers=admin, timeout=60).json()["usage"]
    per_request = probe["prompt_tokens"] + CHAT["max_tokens"]  # the worst case reserved for each
    budget_amount = per_request * 10
    httpx.post(server.url + "/admin/budgets", headers=admin,
               json={"scope": "key", "scope_id": key["id"], "amount": budget_amount, "unit": "tokens", "period": "total"})

    async def one(client: httpx.AsyncClient) -> int:
        r = await client.post(server.base_url + "/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key['key']}"}, timeout=120)
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "insufficient_quota"
        return r.status_code

    async def burst() -> list[int]:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(one(client) for _ in range(64)))

    statuses = asyncio.run(burst())
    assert set(statuses) <= {200, 429}
    assert 8 <= statuses.count(200) <= 30

    def spent_in_db() -> int:
        conn = sqlite3.connect(data_dir / "appliance.db")
        try:
            return conn.execute("SELECT COALESCE(SUM(prompt_tokens + completion_tokens - unbilled_tokens), 0) FROM usage WHERE key_id = ?", (key["id"],)).fetchone()[0]
        finally:
            conn.close()

    assert spent_in_db() <= budget_amount

    def ledger() -> float:
        rows = httpx.get(server.url + "/admin/budgets", headers=admin).json()["data"]
        (mine,) = [b for b in rows if b["scope_id"] == key["id"]]
        return mine["spent"]

    before_restart = ledger()
    assert before_restart == spent_in_db()
    # restart a second server on the same data directory: the ledger is rebuilt from usage
    stop_server(server.process)
    proc, url, log_path = start_server(data_dir)
    server.process, server.url, server.log_path = proc, url, log_path
    assert ledger() == before_restart == spent_in_db()
