"""Checks and alert channels end to end in a live server: a plugin's check is registered
through `register_checks` beside the built-in ones, runs on demand (audited) and on
schedule, is kept in the history (API and CLI over the admin socket), and its failing
finding raises an alert delivered to the plugin's channel and to a built-in webhook
channel whose receiver is a real HTTP server started here."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from appliance.checks.channels import verify_signature
from tests.conftest import run_cli
from tests.extensions.conftest import StartFn, admin, audit_records

SECRET = "whsec-e2e-5d0c71"


class Hooks(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.received: list[dict[str, Any]] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _Handler(BaseHTTPRequestHandler):
    server: Hooks

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["content-length"]))
        ok = verify_signature(
            SECRET.encode(), self.headers["x-appliance-timestamp"], body, self.headers["x-appliance-signature"],
            now=time.time(),
        )
        self.send_response(204 if ok else 401)
        self.end_headers()
        if ok:
            self.server.received.append(json.loads(body))

    def log_message(self, *args: Any) -> None:
        pass


def _wait(condition: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    return condition()


def _alerts_in(log: Path) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    return [line["value"] for line in lines if line["hook"] == "alert"]


def test_a_plugin_check_runs_is_stored_and_alerts_through_plugin_and_webhook_channels(
    plugin_server: StartFn, tmp_path: Path
) -> None:
    hooks = Hooks()
    secret = tmp_path / "hook.secret"
    secret.write_text(SECRET)
    secret.chmod(0o600)
    log = tmp_path / "hooks.jsonl"
    server = plugin_server(
        f'\n[plugins.sample]\nlog_path = "{log}"\ncheck_status = "fail"\ncheck_interval = 2\n'
        f'\n[alerts.channels.hook]\ntype = "webhook"\nurl = "http://127.0.0.1:{hooks.server_address[1]}/in"\n'
        f'secret_file = "{secret}"\n'
        '\n[[alerts.rules]]\nname = "samples"\nchecks = ["sample-*"]\nseverity = "fail"\n'
        'channels = ["sample-channel", "hook"]\nrepeat_seconds = 3600\n'
    )
    try:
        listed = {c["name"]: c for c in admin(server, "GET", "/admin/checks").json()["data"]}
        sample = listed["sample-check"]
        assert (sample["source"], sample["enabled"], sample["interval_seconds"]) == ("sample", True, 2.0)
        assert sample["next_run_at"] is not None
        assert {"host", "sqlite", "audit_chain"} <= set(listed)  # the built-in ones, registered the same way
        run = admin(server, "POST", "/admin/checks/sample-check/run").json()
        assert run["status"] == "fail" and run["trigger"] == "manual"
        assert run["findings"] == [
            {"subject": "", "status": "fail", "summary": "the sample says fail", "details": {"widgets": 3}}
        ]

        [alert] = _wait(lambda: _alerts_in(log))  # the plugin's channel: opened once, not once per run
        assert (alert["rule"], alert["check"], alert["event"], alert["severity"]) == ("samples", "sample-check", "open", "fail")
        [hooked] = _wait(lambda: hooks.received)
        assert hooked["id"] == alert["id"] and hooked["summary"] == "the sample says fail"

        # The schedule runs it too (every 2 s), and the history keeps each run.
        scheduled = _wait(
            lambda: [r for r in admin(server, "GET", "/admin/checks/history?check=sample-check").json()["data"]
                     if r["trigger"] == "schedule"]
        )
        assert scheduled and scheduled[0]["status"] == "fail"
        assert len(_alerts_in(log)) == 1 and len(hooks.received) == 1  # still open: not re-sent within the hour

        cli = json.loads(run_cli("checks", "history", "sample-check", "--json", data_dir=server.data_dir, env=server.env).stdout)  # type: ignore[attr-defined]
        assert cli["data"][0]["check"] == "sample-check"
        failed_cli = run_cli("checks", "run", "sample-check", data_dir=server.data_dir, env=server.env, check=False)  # type: ignore[attr-defined]
        assert failed_cli.returncode == 1 and "sample-check: fail" in failed_cli.stdout

        channels = {c["name"]: c for c in admin(server, "GET", "/admin/alerts/channels").json()["data"]}
        assert channels["hook"]["source"] == "built-in" and channels["hook"]["delivered"] == 1
        assert channels["sample-channel"]["source"] == "sample"
        assert SECRET not in json.dumps(channels)
        tested = admin(server, "POST", "/admin/alerts/channels/hook/test").json()
        assert tested == {"channel": "hook", "delivered": True, "error": None}
        assert _wait(lambda: len(hooks.received) == 2)

        actions = [r["body"]["action"] for r in audit_records(server, "admin")]
        assert actions.count("check.run") == 2 and "alert.test" in actions
        events = [r["body"]["event"] for r in audit_records(server, "system")]
        assert events.count("alert.open") == 1
        opened = admin(server, "GET", "/admin/alerts?state=open").json()["data"]
        assert [(a["id"], a["check"], a["state"]) for a in opened] == [(alert["id"], "sample-check", "open")]
        assert admin(server, "GET", "/admin/alerts?state=resolved").json()["data"] == []
        assert admin(server, "GET", "/admin/alerts?state=closed").status_code == 400

        refused = httpx.get(server.url + "/admin/checks", headers={"Authorization": f"Bearer {server.user_key}"})
        assert refused.status_code == 403 and refused.json()["error"]["code"]
        missing = admin(server, "POST", "/admin/checks/no-such-check/run")
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "name"
    finally:
        hooks.shutdown()
