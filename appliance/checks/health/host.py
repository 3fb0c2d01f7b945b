"""The `host` job: free disk where the data directory is, available memory, and the load
average per core; one finding each (`disk`, `memory`, `load`).

Options (`[check.host]`): `min_free_percent` (warn under 10), `min_free_percent_fail` (5),
`min_free_mb` (fail under 1024), `min_available_percent` (warn under 10),
`min_available_percent_fail` (5), `max_load_per_core` (warn over 2.0, on the 5-minute
average, which one busy minute does not trip).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from appliance.checks.findings import Finding, fail, ok, warn
from appliance.checks.registry import CheckContext, CheckJob
from appliance.memory_budget import read_meminfo

__all__ = ["NAME", "check_disk", "check_load", "check_memory", "host_job", "run"]

NAME = "host"
MiB = 1 << 20


def host_job(ctx: CheckContext) -> CheckJob:
    return CheckJob(
        NAME,
        lambda: run(ctx),
        60.0,
        description="free disk of the data directory, available memory, load per core",
        timeout_seconds=30.0,
    )


def run(ctx: CheckContext) -> list[Finding]:
    def option(key: str, default: float) -> float:
        return ctx.option(NAME, key, default)

    return [
        check_disk(
            ctx.services.settings.paths.root,
            warn_percent=option("min_free_percent", 10.0),
            fail_percent=option("min_free_percent_fail", 5.0),
            fail_mb=option("min_free_mb", 1024.0),
        ),
        check_memory(
            warn_percent=option("min_available_percent", 10.0), fail_percent=option("min_available_percent_fail", 5.0)
        ),
        check_load(max_per_core=option("max_load_per_core", 2.0)),
    ]


def check_disk(path: Path, *, warn_percent: float, fail_percent: float, fail_mb: float) -> Finding:
    try:
        usage = shutil.disk_usage(path)
    except OSError as exc:
        return fail(f"cannot read the free space of {path}: {exc.strerror or exc}", "disk")
    free_mb = usage.free // MiB
    percent = 100.0 * usage.free / usage.total if usage.total else 0.0
    details = {"path": str(path), "free_mb": free_mb, "total_mb": usage.total // MiB, "free_percent": round(percent, 2)}
    said = f"{free_mb} MB free of {usage.total // MiB} MB ({percent:.1f}%) where {path} is"
    if percent < fail_percent or free_mb < fail_mb:
        return fail(f"{said}: under {fail_percent:g}% or {fail_mb:g} MB", "disk", **details)
    if percent < warn_percent:
        return warn(f"{said}: under {warn_percent:g}%", "disk", **details)
    return ok(said, "disk", **details)


def check_memory(*, warn_percent: float, fail_percent: float) -> Finding:
    info = read_meminfo()
    if not info.total_bytes or info.available_bytes is None:
        return ok("available memory unknown (no MemAvailable in /proc/meminfo)", "memory")
    percent = 100.0 * info.available_bytes / info.total_bytes
    details = {
        "available_mb": info.available_bytes // MiB,
        "total_mb": info.total_bytes // MiB,
        "available_percent": round(percent, 2),
    }
    said = f"{info.available_bytes // MiB} MB available of {info.total_bytes // MiB} MB ({percent:.1f}%)"
    if percent < fail_percent:
        return fail(f"{said}: under {fail_percent:g}%", "memory", **details)
    if percent < warn_percent:
        return warn(f"{said}: under {warn_percent:g}%", "memory", **details)
    return ok(said, "memory", **details)


def check_load(*, max_per_core: float) -> Finding:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return ok("load average unknown", "load")
    cores = _cores()
    per_core = five / cores
    details = {
        "load_1m": round(one, 2),
        "load_5m": round(five, 2),
        "load_15m": round(fifteen, 2),
        "cores": cores,
        "load_per_core": round(per_core, 2),
    }
    said = f"load {one:.2f} {five:.2f} {fifteen:.2f} on {cores} cores ({per_core:.2f} per core over 5 minutes)"
    if per_core > max_per_core:
        return warn(f"{said}: over {max_per_core:g}", "load", **details)
    return ok(said, "load", **details)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1
