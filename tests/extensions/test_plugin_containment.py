"""A plugin that raises, hangs or cannot be configured is reported, audited and skipped; the
server keeps serving, and fails closed or open as configured."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.conftest import run_cli
from tests.extensions.conftest import StartFn, admin, audit_records, chat, plugin_state

GUARD = """
[plugins.prompt_guard]
[[plugins.prompt_guard.block]]
name = "no-falcon"
literal = "project falcon"
"""


def _failures(server: object) -> list[dict[str, object]]:
    return [r["body"] for r in audit_records(server, "system") if r["body"]["event"] == "plugin.failed"]  # type: ignore[arg-type]


def test_a_raising_guardrail_fails_closed_until_an_admin_acts(plugin_server: StartFn) -> None:
    server = plugin_server('\n[plugins.sample]\nfail_in = "prepare_request"\n')
    first = chat(server, "Say hello.")
    assert first.status_code == 503
    assert first.json()["error"]["code"] == "guardrail_unavailable"
    assert "Retry-After" in first.headers
    assert chat(server, "Say hello.").status_code == 503  # still closed, without calling it again
    state = plugin_state(server, "sample")
    assert state["status"] == "failed"
    assert "RuntimeError: sample broke" in state["last_error"]
    failures = _failures(server)
    assert len(failures) == 1  # one record for the failure, not one per refused request
    assert (failures[0]["plugin"], failures[0]["hook"], failures[0]["fails"]) == ("sample", "prepare_request", "closed")
    # The exception quoted an address: it is in no record, no log line, no listing.
    assert "alice@example.com" not in json.dumps(audit_records(server))
    assert "alice@example.com" not in server.log_text()
    assert "alice@example.com" not in json.dumps(state)
    assert "[EMAIL]" in failures[0]["reason"]
    assert admin(server, "GET", "/readyz").status_code == 200

    # The admin turns it off through the CLI (the running server, over the admin socket) ...
    out = run_cli("plugins", "disable", "sample", "--json", data_dir=server.data_dir, env=server.env)  # type: ignore[attr-defined]
    assert json.loads(out.stdout)["status"] == "disabled"
    assert chat(server, "Say hello.").status_code == 200
    # ... and back on, which clears the failure: the next call fails again, and is recorded again.
    assert admin(server, "POST", "/admin/plugins/sample/enable").json()["status"] == "active"
    assert chat(server, "Say hello.").status_code == 503
    assert len(_failures(server)) == 2
    changes = [r["body"] for r in audit_records(server, "admin") if str(r["body"]["action"]).startswith("plugins.")]
    assert [(c["action"], c["after"]["status"]) for c in changes] == [("plugins.disable", "disabled"), ("plugins.enable", "active")]
    assert changes[0]["actor"]["kind"] == "local"


def test_a_guardrail_set_to_fail_open_is_skipped_and_the_others_still_run(plugin_server: StartFn) -> None:
    server = plugin_server('\n[plugins.sample]\nfail_in = "prepare_request"\nfail = "open"\n' + GUARD)
    assert chat(server, "Say hello.").status_code == 200
    assert plugin_state(server, "sample")["status"] == "failed"
    assert _failures(server)[0]["fails"] == "open"
    refused = chat(server, "What is Project Falcon?")
    assert refused.status_code == 400
    assert "no-falcon" in refused.json()["error"]["message"]


def test_a_slow_hook_times_out_and_counts_as_a_failure(plugin_server: StartFn) -> None:
    server = plugin_server(
        '\n[plugins.sample]\nsleep_in = "prepare_request"\nsleep_seconds = 30\ntimeout_seconds = 0.5\nfail = "open"\n' + GUARD
    )
    assert chat(server, "Say hello.").status_code == 200
    state = plugin_state(server, "sample")
    assert state["status"] == "failed"
    assert "timed out" in state["last_error"] and "limit 0.5s" in state["last_error"]
    assert chat(server, "Say hello.").status_code == 200  # no longer called: no second wait
    assert chat(server, "Project Falcon?").status_code == 400


def test_a_raising_observer_is_failed_without_touching_responses(plugin_server: StartFn) -> None:
    server = plugin_server('\n[plugins.sample]\nfail_in = "on_audit_event"\nfail = "open"\n')
    responses = [chat(server, "Say hello.") for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 200]
    state = plugin_state(server, "sample")
    assert state["status"] == "failed" and state["last_error"].startswith("on_audit_event:")
    assert [(f["hook"], f["fails"]) for f in _failures(server)] == [("on_audit_event", "open")]


def test_a_failed_guardrail_plugin_fails_closed_whichever_hook_broke(plugin_server: StartFn) -> None:
    # The plugin is disabled as a whole: its guardrail no longer runs, so by default the
    # requests it would judge are refused rather than let through unchecked.
    server = plugin_server('\n[plugins.sample]\nfail_in = "on_usage"\n')
    assert chat(server, "Say hello.").status_code == 200  # its observer runs after this response
    deadline = time.monotonic() + 10
    while plugin_state(server, "sample")["status"] != "failed" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert chat(server, "Say hello.").json()["error"]["code"] == "guardrail_unavailable"


def test_bad_plugin_configuration_refuses_that_plugin_only(plugin_server: StartFn) -> None:
    server = plugin_server(
        '\n[plugins.sample]\nfail = "sideways"\n'
        '\n[plugins.prompt_guard]\n[[plugins.prompt_guard.block]]\nname = "lookbehind"\nregex = "(?<=a)b"\n'
        '\n[plugins.pii_redact]\nkinds = ["email", "dna"]\n'
    )
    states = {p["name"]: p for p in admin(server, "GET", "/admin/plugins").json()["data"]}
    assert states["sample"]["status"] == "refused" and "fail must be" in states["sample"]["last_error"]
    assert states["prompt_guard"]["status"] == "refused" and "not valid RE2" in states["prompt_guard"]["last_error"]
    assert states["pii_redact"]["status"] == "refused" and "dna" in states["pii_redact"]["last_error"]
    assert chat(server, "Say hello.").status_code == 200
    assert admin(server, "POST", "/admin/plugins/prompt_guard/enable").status_code == 409
    assert admin(server, "POST", "/admin/plugins/nobody/enable").status_code == 404


def test_the_environment_variable_limits_which_plugins_load(plugin_server: StartFn, tmp_path: Path) -> None:
    server = plugin_server('\n[plugins.sample]\nfail_in = "prepare_request"\n', env={"APPLIANCE_PLUGINS": "pii_redact"})
    assert chat(server, "Say hello.").status_code == 200  # the broken plugin was not loaded
    states = {p["name"]: p["status"] for p in admin(server, "GET", "/admin/plugins").json()["data"]}
    assert states["pii_redact"] == "active"
    assert states["sample"] == states["sample_broken"] == "disabled"
    assert [r for r in audit_records(server, "system") if r["body"]["event"] == "plugin.refused"] == []
