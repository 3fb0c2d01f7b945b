"""Running checks: on schedule through APScheduler 3.x's `AsyncIOScheduler` on the server's
event loop, or on demand. The work of a check runs in a worker thread, never on the loop;
its run is stored with its findings, which then go to the alert engine and the listeners.

Scheduling is deliberate about APScheduler's defaults: a job never overlaps itself
(`max_instances=1`, and a run that timed out but whose thread still works blocks the next
one); runs missed while the loop was busy or the box slept coalesce into one
(`coalesce=True`); and a late run still starts within `[checks] misfire_grace_seconds`
(APScheduler's default is 1 s, which would drop runs on a loaded 2-core box).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import datetime
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from appliance.checks.findings import Finding, worst
from appliance.checks.history import CheckHistory, CheckRun
from appliance.checks.registry import CheckJob
from appliance.config import ChecksSettings
from appliance.errors import Conflict, NotFound
from appliance.redaction import scrub_keys

log = logging.getLogger(__name__)
HOST_KEYS = frozenset({"enabled", "interval_seconds", "cron", "timeout_seconds"})
Trigger = IntervalTrigger | CronTrigger


@dataclass(slots=True)
class Scheduled:
    """A check as the scheduler holds it: the job, its effective schedule, and its state."""

    job: CheckJob
    enabled: bool = True
    interval_seconds: float | None = None
    cron: str | None = None
    timeout_seconds: float = 60.0
    error: str | None = None  # why it is not scheduled (a bad `[check.<name>]` table)
    running_since: float | None = None
    runs: int = 0
    last: CheckRun | None = None
    trigger: Trigger | None = field(default=None, repr=False)

    def to_dict(self, next_run: float | None) -> dict[str, Any]:
        return {
            "name": self.job.name,
            "source": self.job.source,
            "description": self.job.description,
            "enabled": self.enabled,
            "interval_seconds": self.interval_seconds,
            "cron": self.cron,
            "timeout_seconds": self.timeout_seconds,
            "error": self.error,
            "running": self.running_since is not None,
            "next_run_at": next_run,
            "last": self.last.to_dict() if self.last else None,
        }


class CheckScheduler:
    def __init__(
        self,
        jobs: list[CheckJob],
        history: CheckHistory,
        write: Callable[[Any], Awaitable[Any]],
        settings: ChecksSettings,
        options: Mapping[str, Mapping[str, Any]],
        *,
        workers: int = 2,
    ) -> None:
        """`write`: the store's `write` (the history goes through the group commit)."""
        self.settings = settings
        self._history = history
        self._write = write
        self._checks: dict[str, Scheduled] = {}
        for job in jobs:
            self._checks[job.name] = _configure(job, dict(options.get(job.name, {})))
        latest = history.latest()
        for name, entry in self._checks.items():
            entry.last = latest.get(name)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="check")
        self._scheduler: AsyncIOScheduler | None = None
        # Called with each stored run (alerts, metrics); exceptions are logged, never raised.
        self.listeners: list[Callable[[CheckRun], Awaitable[None] | None]] = []

    # -- life cycle -------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.settings.enabled:
            log.info("scheduled checks are off ([checks] enabled = false); they still run on demand")
            return
        scheduler = AsyncIOScheduler(event_loop=loop, timezone=_local_zone())
        for name, entry in self._checks.items():
            if entry.enabled and entry.trigger is not None:
                scheduler.add_job(
                    self._scheduled_run, entry.trigger, args=[name], id=name, name=name, max_instances=1,
                    coalesce=True, misfire_grace_time=int(self.settings.misfire_grace_seconds), replace_existing=True,
                )
        scheduler.start()
        self._scheduler = scheduler

    async def close(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- queries ----------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self._checks)

    def get(self, name: str) -> Scheduled:
        try:
            return self._checks[name]
        except KeyError:
            raise NotFound(f"There is no check named '{name}'.", param="name") from None

    def describe(self, name: str) -> dict[str, Any]:
        entry = self.get(name)
        job = self._scheduler.get_job(name) if self._scheduler is not None else None
        next_run = job.next_run_time.timestamp() if job is not None and job.next_run_time else None
        return entry.to_dict(next_run)

    def list(self) -> list[dict[str, Any]]:
        return [self.describe(name) for name in self.names()]

    def history(self, name: str | None = None, *, limit: int = 50, before_id: int | None = None) -> list[CheckRun]:
        if name is not None:
            self.get(name)
        return self._history.runs(name, limit=limit, before_id=before_id)

    # -- running ----------------------------------------------------------------------------
    async def _scheduled_run(self, name: str) -> None:
        try:
            await self.run(name, trigger="schedule")
        except Conflict as exc:
            log.warning("check %s skipped: %s", name, exc)
        except Exception:  # noqa: BLE001 - one check's failure must never stop the scheduler
            log.exception("check %s could not be run", name)

    async def run(self, name: str, *, trigger: str = "manual") -> CheckRun:
        """Run one check now and store its run. Raises `NotFound`, or `Conflict` while it runs."""
        entry = self.get(name)
        if entry.running_since is not None:
            raise Conflict(
                f"The check '{name}' is still running (since {time.time() - entry.running_since:.0f}s ago).", param="name"
            )
        entry.running_since = time.time()
        started, clock = time.time(), time.perf_counter()
        done = threading.Event()
        cpu: list[float] = [0.0]
        future = self._pool.submit(_in_thread, entry, cpu, done)
        try:
            findings = await asyncio.wait_for(asyncio.wrap_future(future), entry.timeout_seconds)
        except TimeoutError:
            findings = [Finding("error", f"timed out after {entry.timeout_seconds:g}s")]
            # The thread cannot be stopped: the check counts as running until it returns.
            future.add_done_callback(lambda _: _finished(entry))
        except Exception as exc:  # noqa: BLE001 - a check's bug is an "error" run, not a crash
            findings = [Finding("error", _describe(exc))]
        if done.is_set() or future.done():
            entry.running_since = None
        status = worst([f.status for f in findings])
        run = CheckRun(
            check=name, trigger=trigger, started_at=started, duration_ms=round((time.perf_counter() - clock) * 1000, 3),
            cpu_seconds=round(cpu[0], 6), status=status, summary=_summary(findings), findings=findings,
        )
        run_id = await self._write(self._history.record_fn(run))
        run = dataclasses.replace(run, id=run_id)
        entry.last, entry.runs = run, entry.runs + 1
        for listener in list(self.listeners):
            try:
                result = listener(run)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:  # noqa: BLE001 - alerts or metrics failing must not fail the check
                log.exception("a listener failed on the run of check %s", name)
        return run


def _in_thread(entry: Scheduled, cpu: list[float], done: threading.Event) -> list[Finding]:
    before = time.thread_time()
    try:
        findings = entry.job.run()
        if not isinstance(findings, list) or not all(isinstance(f, Finding) for f in findings):
            raise TypeError(f"check {entry.job.name} returned {type(findings).__name__}, not a list of findings")
        return findings or [Finding("ok", "no findings")]
    finally:
        cpu[0] = time.thread_time() - before
        done.set()


def _finished(entry: Scheduled) -> None:
    entry.running_since = None


def _configure(job: CheckJob, table: dict[str, Any]) -> Scheduled:
    """The schedule of `job` under its `[check.<name>]` table; a bad table disables the check
    (listed with the reason) rather than stopping the server."""
    entry = Scheduled(job, interval_seconds=job.interval_seconds, cron=job.cron, timeout_seconds=job.timeout_seconds)
    try:
        enabled = table.get("enabled", True)
        if not isinstance(enabled, bool):
            raise ValueError(f"enabled must be true or false, got {enabled!r}")
        entry.enabled = enabled
        if "cron" in table or "interval_seconds" in table:
            entry.cron = table.get("cron")
            entry.interval_seconds = float(table["interval_seconds"]) if "interval_seconds" in table else None
        if "timeout_seconds" in table:
            entry.timeout_seconds = float(table["timeout_seconds"])
        if not entry.timeout_seconds > 0:
            raise ValueError("timeout_seconds must be positive")
        if entry.cron:
            if not isinstance(entry.cron, str):
                raise ValueError(f"cron must be a crontab line, got {entry.cron!r}")
            entry.trigger = CronTrigger.from_crontab(entry.cron, timezone=_local_zone())
            entry.interval_seconds = None
        elif entry.interval_seconds is not None:
            if not entry.interval_seconds >= 1:
                raise ValueError(f"interval_seconds must be at least 1, got {entry.interval_seconds:g}")
            entry.trigger = IntervalTrigger(seconds=entry.interval_seconds, jitter=min(entry.interval_seconds / 10, 30))
        else:
            raise ValueError("needs interval_seconds or cron")
    except (TypeError, ValueError) as exc:
        entry.enabled, entry.trigger = False, None
        entry.error = f"[check.{job.name}]: {exc}"
        log.error("check %s is not scheduled: %s", job.name, entry.error)
    return entry


def _local_zone() -> datetime.tzinfo:
    try:
        import tzlocal  # APScheduler's own dependency

        return tzlocal.get_localzone()
    except Exception:  # noqa: BLE001 - no zone configured (a minimal container): UTC
        return datetime.UTC


def _summary(findings: list[Finding]) -> str:
    bad = [f for f in findings if f.status != "ok"]
    if not bad:
        return findings[0].summary if len(findings) == 1 else f"{len(findings)} ok"
    return "; ".join(f"{f.subject + ': ' if f.subject else ''}{f.summary}" for f in bad[:5]) + (
        f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
    )


def _describe(exc: BaseException) -> str:
    return scrub_keys(f"{type(exc).__name__}: {exc}")[:500]
