"""A real third-party plugin, installed with pip, in a live server with the default model:
its hooks run, `plugins list` shows it, and its broken copies are refused and audited."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import run_cli, stop_server
from tests.extensions.conftest import StartFn, admin, audit_records, chat, request_record, sse_events


def _config(log: Path, extra: str = "") -> str:
    return f'\n[plugins.sample]\nlog_path = "{log}"\n{extra}'


def _log_lines(path: Path, hook: str, timeout: float = 10) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    while True:
        lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        found = [line["value"] for line in lines if line["hook"] == hook]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_plugins_list_shows_the_plugin_its_version_and_its_broken_copies(plugin_server: StartFn, tmp_path: Path) -> None:
    server = plugin_server(_config(tmp_path / "hooks.jsonl"))
    listing = admin(server, "GET", "/admin/plugins").json()
    by_name = {p["name"]: p for p in listing["data"]}
    assert listing["hookspec"] == "1.1"
    sample = by_name["sample"]
    assert (sample["version"], sample["source"], sample["status"]) == ("0.3.1", "appliance-sample-plugin", "active")
    assert {"prepare_request", "check_response", "on_usage", "on_audit_event"} <= set(sample["hooks"])
    assert sample["admin_routes"] == ["GET /admin/plugins/sample/routes/seen", "POST /admin/plugins/sample/routes/echo"]
    assert (sample["checks"], sample["alert_channels"]) == (["sample-check"], ["sample-channel"])
    assert by_name["sample_broken"]["status"] == "refused"
    assert "import failed: ImportError" in by_name["sample_broken"]["last_error"]
    assert by_name["sample_future"]["status"] == "refused"
    assert "hookspec 2.0" in by_name["sample_future"]["last_error"]
    assert by_name["pii_redact"]["source"] == by_name["prompt_guard"]["source"] == "built-in"

    # The CLI reaches the running server over the admin socket, and says the same.
    out = run_cli("plugins", "list", "--json", data_dir=server.data_dir, env=server.env)  # type: ignore[attr-defined]
    cli = json.loads(out.stdout)
    assert cli["server"] == "running"
    assert {p["name"]: p["status"] for p in cli["data"]} == {p["name"]: p["status"] for p in listing["data"]}
    text = run_cli("plugins", "list", data_dir=server.data_dir, env=server.env).stdout  # type: ignore[attr-defined]
    assert "sample 0.3.1 (appliance-sample-plugin): active" in text
    assert "last error: import failed: ImportError" in text

    # Each refusal is audited once, as a system record.
    refused = [r["body"] for r in audit_records(server, "system") if r["body"]["event"] == "plugin.refused"]
    assert sorted(b["plugin"] for b in refused) == ["sample_broken", "sample_future"]


def test_offline_plugins_list_loads_them_here(plugin_server: StartFn, tmp_path: Path) -> None:
    server = plugin_server(_config(tmp_path / "hooks.jsonl"))
    stop_server(server.process)
    out = json.loads(run_cli("plugins", "list", "--json", data_dir=server.data_dir, env=server.env).stdout)  # type: ignore[attr-defined]
    assert out["server"] == "not running"
    assert {p["name"]: p["status"] for p in out["data"]}["sample"] == "active"
    only = json.loads(
        run_cli("plugins", "list", "--json", data_dir=server.data_dir,
                env=server.env | {"APPLIANCE_PLUGINS": "sample"}).stdout  # type: ignore[attr-defined]
    )
    states = {p["name"]: p for p in only["data"]}
    assert states["sample"]["status"] == "active"
    assert states["pii_redact"]["status"] == "disabled"
    assert "APPLIANCE_PLUGINS" in states["pii_redact"]["last_error"]


def test_prepare_request_notes_rejects_and_rewrites(plugin_server: StartFn, tmp_path: Path) -> None:
    server = plugin_server(_config(tmp_path / "hooks.jsonl"))
    ok = chat(server, "Say hello.", tags="Team-A, x")
    assert ok.status_code == 200, ok.text
    record = request_record(server, ok.headers["x-request-id"])
    assert record["body"]["plugins"]["sample"] == {"team": "default", "tags": ["team-a", "x"]}

    refused = chat(server, "Tell me about SAMPLE-BLOCK please.")
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert (error["code"], error["type"]) == ("policy_violation", "invalid_request_error")
    assert "sample-block" in error["message"]
    body = request_record(server, refused.headers["x-request-id"])["body"]
    assert (body["outcome"], body["error"], body["status"]) == ("error", "policy_violation", 400)
    assert body["plugins"]["sample"]["rejected"] == "sample-block"
    assert body["tokens"] == {"prompt": 0, "completion": 0, "cached": 0}  # refused before any compute

    # The model gets the messages as the plugin left them: its extra message costs tokens.
    plain = chat(server, "Say hello.").json()["usage"]["prompt_tokens"]
    rewritten = chat(server, "Say hello. SAMPLE-REWRITE").json()["usage"]["prompt_tokens"]
    assert rewritten > plain + 8


def test_check_response_rejects_answers_and_says_why(plugin_server: StartFn, tmp_path: Path) -> None:
    server = plugin_server(_config(tmp_path / "hooks.jsonl"))
    refused = chat(server, "Say hello.", tags="sample-reject")
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "policy_violation"
    assert "sample-answer-rule" in refused.json()["error"]["message"]
    body = request_record(server, refused.headers["x-request-id"])["body"]
    assert body["guardrails"] == {"sample": "reject: sample-answer-rule"}
    assert body["tokens"]["completion"] > 0  # the answer was computed, so it is billed

    retry = chat(server, "Say hello.", tags="sample-retry")
    assert retry.status_code == 400
    assert "retry" in retry.json()["error"]["message"]
    assert request_record(server, retry.headers["x-request-id"])["body"]["guardrails"] == {"sample": "retry: sample-wants-another"}


def test_a_streaming_guardrail_reads_along_and_ends_the_stream_with_an_error(plugin_server: StartFn, tmp_path: Path) -> None:
    server = plugin_server(_config(tmp_path / "hooks.jsonl"))
    ok = chat(server, "Count from one to ten.", stream=True, max_tokens=24)
    assert ok.status_code == 200
    events = sse_events(ok)
    assert events[-1] == "[DONE]" and not any(isinstance(e, dict) and "error" in e for e in events)
    assert request_record(server, ok.headers["x-request-id"])["body"]["guardrails"] == {"sample": "passed"}
    seen = admin(server, "GET", "/admin/plugins/sample/routes/seen").json()
    assert seen["stream_checks"] >= 1  # it was called on the text so far, not only at the end

    cut = chat(server, "Count from one to ten.", stream=True, max_tokens=24, tags="sample-reject")
    assert cut.status_code == 200  # the stream had begun: the refusal is in-band
    events = sse_events(cut)
    errors = [e["error"] for e in events if isinstance(e, dict) and "error" in e]
    assert [e["code"] for e in errors] == ["policy_violation"]
    assert not any(isinstance(e, dict) and e.get("choices") and e["choices"][0].get("finish_reason") for e in events)
    body = request_record(server, cut.headers["x-request-id"])["body"]
    assert (body["outcome"], body["error"], body["guardrails"]) == ("error", "policy_violation", {"sample": "reject: sample-answer-rule"})

    client = openai.OpenAI(base_url=server.base_url, api_key=server.user_key, max_retries=0)
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(
            model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Count to ten."}], stream=True,
            max_tokens=24, extra_headers={"x-appliance-tags": "sample-reject"},
        ):
            pass


def test_a_blocking_guardrail_holds_the_stream_back_and_refuses_with_a_plain_400(plugin_server: StartFn, tmp_path: Path) -> None:
    server = plugin_server(_config(tmp_path / "hooks.jsonl", 'streaming = "blocking"'))
    refused = chat(server, "Count from one to ten.", stream=True, max_tokens=24, tags="sample-reject")
    assert refused.status_code == 400  # nothing was sent, so the refusal is a plain error (and fallback stays possible)
    assert refused.json()["error"]["code"] == "policy_violation"
    ok = chat(server, "Count from one to ten.", stream=True, max_tokens=24)
    events = sse_events(ok)
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if isinstance(e, dict) and e.get("choices"))
    plain = chat(server, "Count from one to ten.", max_tokens=24).json()["choices"][0]["message"]["content"]
    assert text == plain  # the held answer is the whole answer
    assert request_record(server, ok.headers["x-request-id"])["body"]["guardrails"] == {"sample": "passed"}
    assert admin(server, "GET", "/admin/plugins/sample/routes/seen").json()["stream_checks"] == 0


def test_a_guardrail_that_cannot_judge_streams_is_recorded_as_not_run(plugin_server: StartFn, tmp_path: Path) -> None:
    server = plugin_server(_config(tmp_path / "hooks.jsonl", 'streaming = "cannot"'))
    streamed = chat(server, "Say hello.", stream=True, tags="sample-reject")
    assert streamed.status_code == 200 and sse_events(streamed)[-1] == "[DONE]"
    body = request_record(server, streamed.headers["x-request-id"])["body"]
    assert body["guardrails"] == {"sample": "not run: cannot judge a stream"}
    assert body["outcome"] == "ok"
    plain = chat(server, "Say hello.", tags="sample-reject")  # it still judges whole answers
    assert plain.status_code == 400


def test_observers_get_committed_records_and_admin_routes_answer(plugin_server: StartFn, tmp_path: Path) -> None:
    log = tmp_path / "hooks.jsonl"
    server = plugin_server(_config(log))
    response = chat(server, "Say hello.")
    request_id = response.headers["x-request-id"]
    usage = _log_lines(log, "on_usage")
    assert {"request_id": request_id, "total": response.json()["usage"]["total_tokens"]} in usage
    deadline = time.monotonic() + 10
    while not any(e["request_id"] == request_id for e in _log_lines(log, "on_audit_event")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert any(e["request_id"] == request_id and e["kind"] == "request" for e in _log_lines(log, "on_audit_event"))
    assert _log_lines(log, "startup") == [{"hookspec": "1.1"}]

    echo = admin(server, "POST", "/admin/plugins/sample/routes/echo", params={"a": "1"}, json={"b": [2]})
    assert echo.status_code == 200 and echo.json() == {"query": {"a": "1"}, "body": {"b": [2]}}
    assert admin(server, "GET", "/admin/plugins/sample/routes/nothing").status_code == 404
    assert admin(server, "GET", "/admin/plugins/nobody/routes/seen").status_code == 404
    as_user = httpx.get(server.url + "/admin/plugins/sample/routes/seen",
                        headers={"Authorization": f"Bearer {server.user_key}"}, timeout=30)
    assert as_user.status_code == 403

    stop_server(server.process)
    assert _log_lines(log, "shutdown") == [{}]
