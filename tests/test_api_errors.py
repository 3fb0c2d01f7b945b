"""Every error comes back in the OpenAI shape with the right status, maps to the right `openai`
exception, never echoes a key, and leaves nothing in the store beyond what is intended."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import MODEL_NAME, Server

MESSAGES = [{"role": "user", "content": "hi"}]


def _post(server: Server, path: str, *, key: str | None, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers |= kw.pop("headers", {})
    return httpx.post(server.url + path, headers=headers, timeout=60, **kw)


def _assert_error(r: httpx.Response, status: int, code: str | None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    assert body["error"]["code"] == code
    return body["error"]


def _store_counts(server: Server) -> dict[str, int]:
    conn = sqlite3.connect(server.data_dir / "appliance.db")
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: conn.execute(f"SELECT COUNT(*) FROM [{t}]").fetchone()[0] for t in sorted(tables)}
    finally:
        conn.close()


def _only_an_audit_record_was_added(server: Server, before: dict[str, int], status: int, code: str | None) -> None:
    """The intended trace of a refused request: one audit record saying so, and nothing else."""
    after = _store_counts(server)
    assert after["audit"] == before["audit"] + 1
    assert {t: n for t, n in after.items() if t not in ("audit", "audit_checkpoints")} == {
        t: n for t, n in before.items() if t not in ("audit", "audit_checkpoints")
    }
    conn = sqlite3.connect(server.data_dir / "appliance.db")
    body = json.loads(conn.execute("SELECT body FROM audit ORDER BY idx DESC LIMIT 1").fetchone()[0])
    conn.close()
    assert body["status"] == status and body["outcome"] == "error"
    assert body.get("error") == code
    assert body["tokens"] == {"prompt": 0, "completion": 0, "cached": 0} and body["cost"] == 0


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[]", None),
        (b'{"model": "x"}', "messages"),
        (b'{"model": 5, "messages": []}', "model"),
        (b'{"model": "m", "messages": "hi"}', "messages"),
        (b'{"model": "m", "messages": [{"role": "wizard", "content": "x"}]}', "messages[0].role"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', "temperature"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 7}', "temperature"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', "max_tokens"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "bogus": 1}', "bogus"),
        # Types as the OpenAPI document states them, not coerced: litestar alone would take these.
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": 0}', "stream"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "8"}', "max_tokens"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "0.5"}', "temperature"),
    ],
)
def test_malformed_requests_are_400(server: Server, body: bytes, param: str | None) -> None:
    before = _store_counts(server)
    r = _post(server, "/v1/chat/completions", key=server.user_key, content=body, headers={"content-type": "application/json"})
    err = _assert_error(r, 400, "invalid_request_error")
    assert err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param, err
    _only_an_audit_record_was_added(server, before, 400, "invalid_request_error")


def test_unsupported_options_are_refused_not_ignored(server: Server) -> None:
    for extra, param in [({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools")]:
        r = _post(server, "/v1/chat/completions", key=server.user_key, json={"model": MODEL_NAME, "messages": MESSAGES} | extra)
        assert _assert_error(r, 400, "invalid_request_error")["param"] == param


@pytest.mark.parametrize("field", ["tools", "metadata", "response_format"])
def test_json_nested_beyond_the_decoder_is_400(server: Server, field: str) -> None:
    depth = 100_000
    deep = b'{"a":' * depth + b"1" + b"}" * depth
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "%s": %s}' % (MODEL_NAME.encode(), field.encode(), deep)
    before = _store_counts(server)
    r = _post(server, "/v1/chat/completions", key=server.user_key, content=body, headers={"content-type": "application/json"})
    assert "nested too deeply" in _assert_error(r, 400, "invalid_request_error")["message"]
    _only_an_audit_record_was_added(server, before, 400, "invalid_request_error")


# No token spells a NUL character, so this schema's grammar dead-ends after the opening quote.
NUL_SCHEMA = {"type": "json_schema", "json_schema": {"name": "nul", "schema": {"enum": ["\u0000"]}}}


def test_response_format_the_model_cannot_spell_is_a_400_not_a_crash(server: Server) -> None:
    before = _store_counts(server)
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 8, "response_format": NUL_SCHEMA}
    r = _post(server, "/v1/chat/completions", key=server.user_key, json=body)
    err = _assert_error(r, 400, "invalid_request_error")
    assert err["param"] == "response_format" and "cannot be met" in err["message"]
    _only_an_audit_record_was_added(server, before, 400, "invalid_request_error")
    ok = _post(server, "/v1/chat/completions", key=server.user_key, json={"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 2})
    assert ok.status_code == 200


def test_a_stream_that_fails_midway_says_so_in_band_and_in_the_audit_log(server: Server) -> None:
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 8, "response_format": NUL_SCHEMA, "stream": True}
    with httpx.stream(
        "POST", server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {server.user_key}"}, timeout=60
    ) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        request_id = r.headers["x-request-id"]
    content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
    assert content == '"'  # what was streamed before the dead end
    errors = [e for e in events if "error" in e]
    assert len(errors) == 1 and errors[0]["error"]["param"] == "response_format"
    assert not any(c.get("finish_reason") for e in events for c in e.get("choices") or [])  # never a clean "stop"
    conn = sqlite3.connect(server.data_dir / "appliance.db")
    audit = json.loads(conn.execute("SELECT body FROM audit WHERE body LIKE ?", (f'%{request_id}%',)).fetchone()[0])
    conn.close()
    assert audit["outcome"] == "error" and audit["error"] == "invalid_request_error"
    assert audit["tokens"]["completion"] >= 1  # streamed tokens are still accounted for
    client = openai.OpenAI(base_url=server.base_url, api_key=server.user_key, max_retries=0)
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=8, response_format=NUL_SCHEMA, stream=True))


def test_json_schema_with_runaway_repetition_is_refused(server: Server) -> None:
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 10**12}
    body = {"model": MODEL_NAME, "messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}}
    r = _post(server, "/v1/chat/completions", key=server.user_key, json=body)
    assert _assert_error(r, 400, "invalid_request_error")["param"] == "response_format"


def test_context_overflow_is_400_context_length_exceeded(server: Server) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key=server.user_key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "word " * 5000}], max_tokens=10)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=100_000)
    assert info.value.code == "context_length_exceeded"
    assert "maximum context length" in info.value.message


def test_unknown_model_is_404(server: Server) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key=server.user_key, max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="x")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


@pytest.mark.parametrize("key", [None, "", "sk-not-ours", "apl_0123456789ab_wrongsecretwrongsecretwrongsecret"])
def test_missing_or_bad_key_is_401_and_not_echoed(server: Server, key: str | None) -> None:
    r = _post(server, "/v1/chat/completions", key=key, json={"model": MODEL_NAME, "messages": MESSAGES})
    err = _assert_error(r, 401, "invalid_api_key")
    if key:
        assert key not in r.text
    if key:
        client = openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
    assert "Bearer" in err["message"] or "Invalid" in err["message"]


def test_wrong_role_is_403(server: Server) -> None:
    r = httpx.get(server.url + "/admin/keys", headers={"Authorization": f"Bearer {server.user_key}"})
    _assert_error(r, 403, "permission_denied")
    client = openai.OpenAI(base_url=server.url, api_key=server.user_key, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        client.get("/admin/keys", cast_to=object)


def test_body_over_the_limit_is_413(server: Server) -> None:
    before = _store_counts(server)
    big = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "a" * (5 * 1024 * 1024)}]}
    r = _post(server, "/v1/chat/completions", key=server.user_key, json=big)
    _assert_error(r, 413, "request_too_large")
    _only_an_audit_record_was_added(server, before, 413, "request_too_large")


def test_unknown_route_and_method(server: Server) -> None:
    _assert_error(httpx.get(server.url + "/v1/nothing", headers={"Authorization": f"Bearer {server.user_key}"}), 404, "not_found")
    r = httpx.get(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {server.user_key}"})
    _assert_error(r, 405, "method_not_allowed")


def test_errors_never_leak_keys_into_the_log(server: Server) -> None:
    secret = server.user_key.split("_", 2)[2]
    _post(server, "/v1/chat/completions", key=server.user_key + "x", json={"model": MODEL_NAME, "messages": MESSAGES})
    log = server.log_text()
    assert secret not in log and server.admin_key.split("_", 2)[2] not in log


def test_revoked_key_is_refused_at_once(server: Server) -> None:
    admin = {"Authorization": f"Bearer {server.admin_key}"}
    created = httpx.post(server.url + "/admin/keys", json={"name": "short-lived", "role": "user"}, headers=admin)
    assert created.status_code == 201
    key = created.json()["key"]
    ok = httpx.get(server.base_url + "/models", headers={"Authorization": f"Bearer {key}"})
    assert ok.status_code == 200
    listed = httpx.get(server.url + "/admin/keys", headers=admin).json()["data"]
    assert any(k["id"] == created.json()["id"] for k in listed)
    assert all("key" not in k and "key_hash" not in k for k in listed)
    revoked = httpx.delete(server.url + f"/admin/keys/{created.json()['id']}", headers=admin)
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    _assert_error(httpx.get(server.base_url + "/models", headers={"Authorization": f"Bearer {key}"}), 401, "invalid_api_key")
    _assert_error(httpx.delete(server.url + "/admin/keys/000000000000", headers=admin), 404, "not_found")
    bad = httpx.post(server.url + "/admin/keys", json={"name": "x", "role": "root"}, headers=admin)
    assert _assert_error(bad, 400, "invalid_request_error")["param"] == "role"
