"""Assembling the checks of a running server: the built-in checks and alert channels are
registered through the `register_checks` and `register_alert_channels` hooks, like a
plugin's; then every registered check is scheduled and every run goes to the alert engine."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from appliance import __version__
from appliance.checks.alerts import AlertEngine, ChannelEntry
from appliance.checks.audit_forward import AuditForwarder, commit_waker
from appliance.checks.findings import from_mapping, to_mapping
from appliance.checks.history import CheckHistory
from appliance.checks.registry import CheckContext, CheckJob, CheckState
from appliance.checks.scheduler import CheckScheduler
from appliance.errors import ConfigError
from appliance.hookspecs import Check, hookimpl
from appliance.plugin_manager import PluginError

if TYPE_CHECKING:
    from appliance.api.services import Services

log = logging.getLogger(__name__)
BUILTIN = "appliance-checks"  # the name the built-in checks and channels are registered under


class BuiltinChecks:
    """The appliance's own checks and channels, as a plugin object for the hooks."""

    APPLIANCE_HOOKSPEC = "1"

    def __init__(self, jobs: list[CheckJob], channels: Mapping[str, Any]) -> None:
        self.jobs = {job.name: job for job in jobs}
        self.channels = dict(channels)

    @hookimpl
    def register_checks(self, register: Any) -> None:
        for job in self.jobs.values():
            register(
                Check(
                    job.name, lambda job=job: to_mapping(job.run()), job.interval_seconds, cron=job.cron,
                    description=job.description, timeout_seconds=job.timeout_seconds,
                )
            )

    @hookimpl
    def register_alert_channels(self, register: Any) -> None:
        for name, channel in self.channels.items():
            register(name, channel.send)


def builtin_jobs(ctx: CheckContext) -> list[CheckJob]:
    from appliance.checks.drift_jobs import drift_checks
    from appliance.checks.health import health_checks

    return [*health_checks(ctx), *drift_checks(ctx)]


def start_checks(services: Services, loop: asyncio.AbstractEventLoop) -> None:
    """Register, schedule and connect the checks, alerts and audit forwarding (the lifespan)."""
    settings = services.settings
    ctx = CheckContext(services, loop, CheckState(services.store), {k: dict(v) for k, v in settings.check.items()})
    channels: dict[str, Any] = {}
    for name, table in settings.alerts.channels.items():
        try:
            from appliance.checks.channels import build_channel

            channels[name] = build_channel(name, table, data_dir=settings.paths.root)
        except ConfigError as exc:  # shown in the log and by its absence from /admin/alerts/channels
            log.error("alert channel %s is not usable: %s", name, exc)
    builtin = BuiltinChecks(builtin_jobs(ctx), channels)
    try:
        services.plugins.register_builtin(BUILTIN, builtin, __version__)
    except PluginError as exc:  # a plugin took a built-in check's name first
        log.error("built-in checks not registered: %s", exc)
    jobs = [_job(owner, check, builtin) for name, (owner, check) in sorted(services.plugins.checks.items())]
    history = CheckHistory(services.store, keep_days=settings.checks.history_days, keep_runs=settings.checks.history_runs)
    scheduler = CheckScheduler(jobs, history, services.store.write, settings.checks, ctx.options)
    entries = {
        name: ChannelEntry(name, "built-in" if owner == BUILTIN else owner, send, _describe(channels.get(name)))
        for name, (owner, send) in services.plugins.alert_channels.items()
    }
    alerts = AlertEngine(settings.alerts.rules, entries, services.store, services.audit)
    scheduler.listeners.append(alerts.on_run)
    scheduler.start(loop)
    services.checks, services.alerts = scheduler, alerts
    if settings.audit.forward_syslog:
        try:
            services.forwarder = AuditForwarder(services.store, settings.audit.forward_syslog)
        except (ConfigError, ValueError) as exc:
            log.error("audit forwarding is off: %s", exc)


def forwarding_task(services: Services) -> asyncio.Task[None] | None:
    """The background task streaming the audit log to syslog, when configured."""
    if services.forwarder is None:
        return None
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    services.audit.listeners.append(commit_waker(loop, wake))
    return loop.create_task(services.forwarder.run(wake))


async def stop_checks(services: Services) -> None:
    """After the background tasks were cancelled: stop the scheduler, let alert deliveries
    finish, and close the forwarder's connection (after its current batch)."""
    if services.checks is not None:
        await services.checks.close()
    if services.alerts is not None:
        await services.alerts.drain()
    if services.forwarder is not None:
        await asyncio.to_thread(services.forwarder.close)


def _job(owner: str, check: Check, builtin: BuiltinChecks) -> CheckJob:
    if owner == BUILTIN and check.name in builtin.jobs:
        return builtin.jobs[check.name]  # the same job, without the round trip through plain JSON
    return CheckJob(
        check.name, lambda: from_mapping(check.run()), check.interval_seconds, description=check.description,
        cron=check.cron, timeout_seconds=check.timeout_seconds, source=owner,
    )


def _describe(channel: Any) -> dict[str, Any]:
    if channel is None:
        return {"kind": "plugin"}
    try:
        return dict(channel.describe())
    except Exception:  # noqa: BLE001 - a description is never worth failing the listing
        return {"kind": getattr(channel, "kind", "unknown")}
