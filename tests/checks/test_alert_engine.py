"""The alert engine on a real store and audit log, delivering through a real webhook channel
to an HTTP receiver started here: an alert opens once per finding and subject, is re-sent at
its interval while open, resolves when the finding clears, is audited at every step, and a
channel that is down never holds a check up but shows as failing."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from appliance.audit import AuditLog
from appliance.checks import CheckJob, Finding, fail, ok, warn
from appliance.checks.alerts import AlertEngine, ChannelEntry
from appliance.checks.channels import WebhookChannel, verify_signature
from appliance.checks.history import CheckHistory
from appliance.checks.scheduler import CheckScheduler
from appliance.config import AlertRule, ChecksSettings
from appliance.store import Store
from tests.admin_helpers import audit_of
from tests.conftest import free_port

SECRET = b"whsec-test-8c1f"


class Receiver(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.alerts: list[dict[str, Any]] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["content-length"]))
        signed = verify_signature(
            SECRET, self.headers["x-appliance-timestamp"], body, self.headers["x-appliance-signature"], now=time.time()
        )
        self.send_response(204 if signed else 401)
        self.end_headers()
        if signed:
            self.server.alerts.append(json.loads(body))

    def log_message(self, *args: Any) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.shutdown()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "appliance.db").open() as s:
        yield s


def engine(store: Store, audit: AuditLog, receiver_url: str, clock: Clock, *, rules: list[AlertRule]) -> AlertEngine:
    hook = WebhookChannel("ops", receiver_url, SECRET, timeout_seconds=2)
    down = WebhookChannel("down", f"http://127.0.0.1:{free_port()}/hook", SECRET, timeout_seconds=2)
    channels = {
        "ops": ChannelEntry("ops", "built-in", hook.send, hook.describe()),
        "down": ChannelEntry("down", "built-in", down.send, down.describe()),
    }
    return AlertEngine(rules, channels, store, audit, clock=clock)


class Script:
    """A check whose findings the test sets between runs."""

    def __init__(self) -> None:
        self.findings: list[Finding] = [ok("fine", "disk")]

    def __call__(self) -> list[Finding]:
        return list(self.findings)


def system_events(store: Store) -> list[dict[str, Any]]:
    rows = store.query("SELECT body FROM audit WHERE kind = 'system' ORDER BY idx")
    return [json.loads(r["body"]) for r in rows if json.loads(r["body"]).get("event", "").startswith("alert.")]


async def settle(alerts: AlertEngine) -> None:
    for _ in range(100):
        if not alerts._deliveries:
            return
        await asyncio.sleep(0.02)


async def test_open_dedupe_repeat_resolve_each_delivered_and_audited(store: Store, receiver: Receiver) -> None:
    clock, audit = Clock(), audit_of(store)
    rules = [AlertRule(name="host-warn", checks=["ho*"], severity="warn", channels=["ops"], repeat_seconds=600)]
    alerts = engine(store, audit, receiver.url, clock, rules=rules)
    script = Script()
    checks = CheckScheduler(
        [CheckJob("host", script, 60), CheckJob("other", script, 60)],
        CheckHistory(store, keep_days=30, keep_runs=50),
        store.write,
        ChecksSettings(),
        {},
    )
    checks.listeners.append(alerts.on_run)

    script.findings = [warn("free disk 8%", "disk", free_percent=8.0), ok("memory fine", "memory")]
    await checks.run("host")
    await checks.run("other")  # not matched by the rule: no alert
    clock.now += 60
    script.findings = [fail("free disk 3%", "disk", free_percent=3.0), ok("memory fine", "memory")]
    await checks.run("host")  # still open, worse: updated, not re-sent before repeat_seconds
    await settle(alerts)
    [opened] = alerts.list(state="open")
    assert (opened["check"], opened["subject"], opened["severity"], opened["summary"]) == (
        "host",
        "disk",
        "fail",
        "free disk 3%",
    )
    assert [a["event"] for a in receiver.alerts] == ["open"]
    assert receiver.alerts[0]["summary"] == "free disk 8%" and receiver.alerts[0]["details"] == {"free_percent": 8.0}

    clock.now += 600
    await checks.run("host")
    await settle(alerts)
    assert [a["event"] for a in receiver.alerts] == ["open", "repeat"]
    assert alerts.get(opened["id"])["sends"] == 2

    script.findings = [ok("free disk 40%", "disk"), ok("memory fine", "memory")]
    await checks.run("host")
    await settle(alerts)
    assert [a["event"] for a in receiver.alerts] == ["open", "repeat", "resolve"]
    resolved = alerts.get(opened["id"])
    assert resolved["state"] == "resolved" and resolved["resolved_at"] == clock.now
    assert [e["event"] for e in system_events(store)] == ["alert.open", "alert.repeat", "alert.resolve"]
    assert [d["ok"] for d in alerts.deliveries(opened["id"])] == [1, 1, 1]

    script.findings = [warn("free disk 9%", "disk")]
    await checks.run("host")  # a new episode is a new alert
    await settle(alerts)
    assert len(alerts.list()) == 2 and len(alerts.list(state="open")) == 1
    await checks.close()
    await alerts.drain()


async def test_a_down_channel_never_blocks_the_check_and_shows_as_failing(store: Store, receiver: Receiver) -> None:
    clock, audit = Clock(), audit_of(store)
    rules = [AlertRule(name="any", severity="fail", channels=["down", "ops"], repeat_seconds=0)]
    alerts = engine(store, audit, receiver.url, clock, rules=rules)
    checks = CheckScheduler(
        [CheckJob("sqlite", lambda: [fail("quick_check failed", "appliance.db")], 60)],
        CheckHistory(store, keep_days=30, keep_runs=50),
        store.write,
        ChecksSettings(),
        {},
    )
    checks.listeners.append(alerts.on_run)
    run = await checks.run("sqlite")
    assert run.status == "fail"
    await settle(alerts)
    assert [a["event"] for a in receiver.alerts] == ["open"]  # the working channel got it
    states = {c["name"]: c for c in alerts.channel_states()}
    assert (
        states["down"]["failing"]
        and states["down"]["failed"] == 1
        and "refused" in states["down"]["last_error"].lower()
    )
    assert not states["ops"]["failing"] and states["ops"]["delivered"] == 1
    assert states["down"]["rules"] == ["any"]
    await checks.run("sqlite")  # repeat_seconds = 0: sent once, however long it stays open
    await settle(alerts)
    assert len(receiver.alerts) == 1 and alerts.list()[0]["sends"] == 1
    await checks.close()
    await alerts.drain()


async def test_an_erroring_run_resolves_nothing_it_did_not_reach(store: Store, receiver: Receiver) -> None:
    clock, audit = Clock(), audit_of(store)
    alerts = engine(store, audit, receiver.url, clock, rules=[AlertRule(name="r", channels=["ops"])])
    script = Script()
    checks = CheckScheduler(
        [CheckJob("canary", script, 60)],
        CheckHistory(store, keep_days=30, keep_runs=50),
        store.write,
        ChecksSettings(),
        {},
    )
    checks.listeners.append(alerts.on_run)
    script.findings = [fail("canary failed", "model-a"), ok("fine", "model-b")]
    await checks.run("canary")
    script.findings = [Finding("error", "the check broke")]
    await checks.run("canary")
    still = {a["subject"]: a["state"] for a in alerts.list()}
    assert still == {"model-a": "open", "": "open"}  # the check's own breakage is an alert too
    script.findings = [ok("fine", "model-b")]
    await checks.run("canary")  # model-a is no longer reported (unloaded): resolved
    assert {a["subject"]: a["state"] for a in alerts.list()} == {"model-a": "resolved", "": "resolved"}
    await checks.close()
    await alerts.drain()
