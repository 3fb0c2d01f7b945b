"""`pii_redact` and `prompt_guard` in a live server with the default model: what the model,
the caller and the audit log see, and that the values reach no record and no log line."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.extensions.conftest import StartFn, admin, chat, request_record, sse_events

CARD, SSN, MAIL = "4111 1111 1111 1111", "078-05-1120", "jane.roe@corp.example"
PERSONAL = f"My card is {CARD}, my ssn {SSN} and my mail {MAIL}. Say hello."
PII = """
[plugins.pii_redact]
responses = true
audit = true
[plugins.pii_redact.national_ids]
ssn = '\\b[0-9]{3}-[0-9]{2}-[0-9]{4}\\b'
"""


def _everything_written(server: object) -> bytes:
    data_dir: Path = server.data_dir  # type: ignore[attr-defined]
    files = [p for p in data_dir.rglob("*") if p.is_file() and p.suffix != ".gguf" and "models" not in p.parts]
    return b"".join(p.read_bytes() for p in files)


def _completion(server: object, prompt: str, **extra: object) -> httpx.Response:
    return httpx.post(
        server.base_url + "/completions",  # type: ignore[attr-defined]
        json={"model": "smollm2-135m-instruct", "prompt": prompt, "max_tokens": 12, "temperature": 0} | extra,
        headers={"Authorization": f"Bearer {server.user_key}"},  # type: ignore[attr-defined]
        timeout=60,
    )


def test_the_audit_log_keeps_redacted_text_and_counts_never_values(plugin_server: StartFn) -> None:
    server = plugin_server(PII, env={"APPLIANCE_PLUGINS": "pii_redact"}, user_args=("--prompt-retention", "full"))
    response = chat(server, PERSONAL)
    assert response.status_code == 200
    record = request_record(server, response.headers["x-request-id"])
    assert record["body"]["plugins"] == {"pii_redact": {"audit": {"card": 1, "email": 1, "ssn": 1}}}
    assert record["content"]["prompt"] == "user: My card is [CARD], my ssn [SSN] and my mail [EMAIL]. Say hello."
    assert record["body"]["prompt"]["kept"] == "full"
    written = _everything_written(server)  # the database, its WAL, the logs, everything in the data directory
    for value in (CARD, SSN, MAIL):
        assert value.encode() not in written
        assert value not in server.log_text()


def test_answers_are_redacted_whole_and_streams_are_held_for_it(plugin_server: StartFn) -> None:
    server = plugin_server(PII, env={"APPLIANCE_PLUGINS": "pii_redact"})
    prompt = "Contact list\nbob@example.org\nbob@example.org\nbob@example.org\n"  # the model repeats the address
    plain = _completion(server, prompt)
    text = plain.json()["choices"][0]["text"]
    assert "[EMAIL]" in text and "bob@example.org" not in text
    body = request_record(server, plain.headers["x-request-id"])["body"]
    assert body["plugins"]["pii_redact"]["response"] == {"email": 1}
    assert body["guardrails"] == {"pii_redact": "rewrote: pii_redact"}

    streamed = _completion(server, prompt, stream=True)
    events = sse_events(streamed)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict) and e.get("choices")) == text


def test_prompts_can_be_redacted_before_the_model_sees_them(plugin_server: StartFn) -> None:
    server = plugin_server(
        '\n[plugins.pii_redact]\nprompts = true\n', env={"APPLIANCE_PLUGINS": "pii_redact"}, user_args=("--prompt-retention", "full")
    )
    prompt = "Contact list\nbob@example.org\nbob@example.org\nbob@example.org\n"
    response = _completion(server, prompt)
    assert "bob@example.org" not in response.json()["choices"][0]["text"]  # it never had the address to repeat
    record = request_record(server, response.headers["x-request-id"])
    assert record["body"]["plugins"] == {"pii_redact": {"prompt": {"email": 3}}}
    assert record["content"]["prompt"] == "Contact list\n[EMAIL]\n[EMAIL]\n[EMAIL]\n"
    embedded = httpx.post(server.base_url + "/embeddings", json={"model": "smollm2-135m-instruct", "input": ["mail bob@example.org"]},
                          headers={"Authorization": f"Bearer {server.user_key}"}, timeout=60)
    assert embedded.status_code == 200
    assert request_record(server, embedded.headers["x-request-id"])["body"]["plugins"] == {"pii_redact": {"prompt": {"email": 1}}}


def test_prompt_guard_refuses_by_rule_and_team_limit(plugin_server: StartFn) -> None:
    server = plugin_server(
        """
[plugins.prompt_guard]
[plugins.prompt_guard.teams.interns]
max_prompt_chars = 40
[[plugins.prompt_guard.block]]
name = "no-falcon"
literal = "project falcon"
""",
        env={"APPLIANCE_PLUGINS": "prompt_guard"},
    )
    refused = chat(server, "Summarise the Project Falcon plan.")
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "policy_violation" and "no-falcon" in error["message"]
    assert "falcon plan" not in error["message"].lower()
    body = request_record(server, refused.headers["x-request-id"])["body"]
    assert body["plugins"] == {"prompt_guard": {"rejected": "no-falcon"}}
    assert chat(server, "x" * 60).status_code == 200  # the default team has no limit

    admin(server, "POST", "/admin/teams", json={"name": "interns"})
    intern = admin(server, "POST", "/admin/keys", json={"name": "intern-app", "role": "user", "team": "interns"}).json()
    assert chat(server, "x" * 60, key=intern["key"]).json()["error"]["code"] == "policy_violation"
    assert chat(server, "Say hello.", key=intern["key"]).status_code == 200
