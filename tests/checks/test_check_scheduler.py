"""The scheduler on a real SQLite store, with checks written for the test: runs never
overlap, every run is stored with its findings and pruned, a check that hangs, raises or
returns nonsense is an "error" run and never stops the others, and a bad `[check.<name>]`
table disables only that check, saying why."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.checks import CheckJob, Finding, fail, ok, warn
from appliance.checks.history import CheckHistory
from appliance.checks.scheduler import CheckScheduler
from appliance.config import ChecksSettings
from appliance.errors import Conflict, NotFound
from appliance.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "appliance.db").open() as s:
        yield s


def scheduler(
    store: Store, jobs: list[CheckJob], *, options: dict | None = None, keep_runs: int = 500
) -> CheckScheduler:
    history = CheckHistory(store, keep_days=30, keep_runs=keep_runs)
    return CheckScheduler(jobs, history, store.write, ChecksSettings(misfire_grace_seconds=5), options or {})


class Slow:
    """A check that takes `seconds` and counts how many of its runs overlap."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.active, self.most, self.runs = seconds, 0, 0, 0
        self.lock = threading.Lock()

    def __call__(self) -> list[Finding]:
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
        time.sleep(self.seconds)
        with self.lock:
            self.active -= 1
            self.runs += 1
        return [ok("slept", "bed", seconds=self.seconds)]


async def test_scheduled_runs_of_a_check_never_overlap_and_are_stored(store: Store) -> None:
    slow = Slow(1.5)  # longer than its interval: APScheduler must skip, not stack, the runs
    checks = scheduler(store, [CheckJob("slow", slow, interval_seconds=1)])
    checks.start(asyncio.get_running_loop())
    try:
        await asyncio.sleep(5.5)
    finally:
        await checks.close()
    assert slow.most == 1
    runs = checks.history("slow")
    assert 2 <= len(runs) <= 4
    assert all(r.status == "ok" and r.trigger == "schedule" and r.duration_ms >= 1400 for r in runs)
    assert runs[0].findings == [Finding("ok", "slept", "bed", {"seconds": 1.5})]
    row = store.query_one("SELECT COUNT(*) AS n FROM check_runs WHERE check_name = 'slow'")
    assert row["n"] == len(runs)


async def test_a_manual_run_while_one_runs_is_refused(store: Store) -> None:
    checks = scheduler(store, [CheckJob("slow", Slow(1.0), interval_seconds=3600)])
    first = asyncio.create_task(checks.run("slow"))
    await asyncio.sleep(0.2)
    with pytest.raises(Conflict, match="still running"):
        await checks.run("slow")
    assert (await first).status == "ok"
    assert (await checks.run("slow")).status == "ok"  # free again once it returned
    with pytest.raises(NotFound):
        await checks.run("nothing-of-that-name")
    await checks.close()


async def test_a_check_that_hangs_is_an_error_and_blocks_itself_until_its_thread_returns(store: Store) -> None:
    release = threading.Event()

    def hangs() -> list[Finding]:
        release.wait(30)
        return [ok("finally")]

    checks = scheduler(store, [CheckJob("hangs", hangs, interval_seconds=3600, timeout_seconds=0.5)])
    run = await checks.run("hangs")
    assert run.status == "error" and "timed out after 0.5s" in run.summary
    assert checks.describe("hangs")["running"] is True
    with pytest.raises(Conflict):
        await checks.run("hangs")
    release.set()
    for _ in range(50):
        if not checks.describe("hangs")["running"]:
            break
        await asyncio.sleep(0.05)
    assert checks.describe("hangs")["running"] is False
    await checks.close()


async def test_raising_and_malformed_checks_are_error_runs_and_others_still_run(store: Store) -> None:
    def raises() -> list[Finding]:
        raise RuntimeError("disk on fire; key sk-app-abcdefghijklmnopqrstuvwxyz012345 leaked")

    def nonsense() -> list[Finding]:
        return "all good"  # type: ignore[return-value]

    def mixed() -> list[Finding]:
        return [ok("fine", "a"), warn("hm", "b"), fail("bad", "c")]

    checks = scheduler(
        store,
        [CheckJob("raises", raises, 3600), CheckJob("nonsense", nonsense, 3600), CheckJob("mixed", mixed, 3600)],
    )
    raised = await checks.run("raises")
    assert raised.status == "error" and "RuntimeError: disk on fire" in raised.summary
    assert "abcdefghijklmnop" not in raised.summary  # an API key in an exception never reaches a finding
    assert (await checks.run("nonsense")).status == "error"
    mixed_run = await checks.run("mixed")
    assert mixed_run.status == "fail" and mixed_run.summary == "b: hm; c: bad"
    assert {c["name"]: c["last"]["status"] for c in checks.list()} == {
        "raises": "error",
        "nonsense": "error",
        "mixed": "fail",
    }
    await checks.close()


async def test_a_bad_check_table_disables_only_that_check(store: Store) -> None:
    jobs = [CheckJob(n, lambda: [ok("fine")], 60) for n in ("a", "b", "c", "d")]
    options = {
        "a": {"cron": "not a crontab"},
        "b": {"interval_seconds": 0.01},
        "c": {"enabled": "yes"},
        "d": {"cron": "*/5 * * * *"},
    }
    checks = scheduler(store, jobs, options=options)
    checks.start(asyncio.get_running_loop())
    try:
        listed = {c["name"]: c for c in checks.list()}
        for name in "abc":
            assert listed[name]["enabled"] is False and listed[name]["error"].startswith(f"[check.{name}]")
            assert listed[name]["next_run_at"] is None
        assert (
            listed["d"]["enabled"] and listed["d"]["cron"] == "*/5 * * * *" and listed["d"]["next_run_at"] > time.time()
        )
        assert (await checks.run("a")).status == "ok"  # still runs on demand
    finally:
        await checks.close()


async def test_history_is_pruned_per_check_and_survives_a_restart(store: Store) -> None:
    checks = scheduler(
        store, [CheckJob("a", lambda: [ok("fine")], 60), CheckJob("b", lambda: [warn("meh")], 60)], keep_runs=3
    )
    for _ in range(5):
        await checks.run("a")
    await checks.run("b")
    assert [r.check for r in checks.history("a")] == ["a"] * 3
    assert len(checks.history()) == 4
    await checks.close()
    again = scheduler(store, [CheckJob("a", lambda: [ok("fine")], 60), CheckJob("b", lambda: [warn("meh")], 60)])
    assert again.describe("b")["last"]["status"] == "warn"  # last results are known before any new run
    await again.close()
