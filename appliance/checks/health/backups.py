"""The `backup` job: an online backup of the database into `<data>/backups/`, verified,
with the older ones pruned; one finding, `backup`.

SQLite's online backup (`sqlite3.Connection.backup`) copies one consistent snapshot from a
read-only connection, so requests keep writing meanwhile. The copy is written under a
temporary name, owner-only, as one self-contained file (no WAL), and must open and pass
`quick_check` before it takes its final name, `appliance-backup-<UTC time>-<us>.db`.
Retention keeps the `keep` newest of those (default 7) and never touches anything else in
the folder, the backups migrations take (`appliance-v<N>-...db`) included.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from appliance.checks.findings import Finding, fail, ok
from appliance.checks.health.database import quick_check
from appliance.checks.registry import CheckContext, CheckJob
from appliance.store import Store
from appliance.store.migrations import schema_version

__all__ = ["NAME", "PREFIX", "backup_job", "prune", "run", "take_backup"]

NAME = "backup"
PREFIX = "appliance-backup-"
MiB = 1 << 20


def backup_job(ctx: CheckContext) -> CheckJob:
    return CheckJob(
        NAME,
        lambda: run(ctx),
        86400.0,
        description="online backup of the database into backups/, verified with quick_check; keeps the newest",
        cron="0 3 * * *",
        timeout_seconds=1800.0,
    )


def run(ctx: CheckContext) -> list[Finding]:
    keep = max(1, ctx.option(NAME, "keep", 7))
    folder = ctx.services.settings.paths.backups
    started = time.perf_counter()
    try:
        dest, problems, version = take_backup(ctx.services.store, folder)
    except (OSError, sqlite3.Error) as exc:
        return [fail(f"the backup could not be written to {folder}: {exc}", NAME)]
    seconds = round(time.perf_counter() - started, 3)
    if problems:
        return [
            fail(
                f"the backup does not pass quick_check ({'; '.join(problems[:3])}); it was deleted",
                NAME,
                problems=problems,
            )
        ]
    deleted = prune(folder, keep)
    size_mb = round(dest.stat().st_size / MiB, 2)
    return [
        ok(
            f"backed up to {dest.name} ({size_mb} MB, schema {version}) and verified; {len(deleted)} older deleted",
            NAME,
            path=str(dest),
            size_mb=size_mb,
            seconds=seconds,
            schema_version=version,
            keep=keep,
            deleted=deleted,
        )
    ]


def take_backup(store: Store, folder: Path) -> tuple[Path, list[str], int]:
    """Back the database up into `folder`; returns the file, its quick_check problems ([] when
    sound: only then does it keep its final name) and its schema version."""
    folder.mkdir(parents=True, exist_ok=True)
    now_us = time.time_ns() // 1000
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now_us // 1_000_000))
    dest = folder / f"{PREFIX}{stamp}-{now_us % 1_000_000:06d}.db"
    partial = folder / f".{dest.name}.partial"
    for leftover in folder.glob(f".{PREFIX}*.partial"):  # of a run killed mid-copy
        leftover.unlink(missing_ok=True)
    os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # owner-only from the start
    try:
        with store.snapshot() as source:
            target = sqlite3.connect(partial, isolation_level=None)
            try:
                source.backup(target)
                target.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            finally:
                target.close()
        problems, version = _verify(partial)
        if problems:
            partial.unlink(missing_ok=True)
            return dest, problems, version
        _fsync(partial)
        os.replace(partial, dest)
        _fsync(folder)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return dest, [], version


def prune(folder: Path, keep: int) -> list[str]:
    """Delete all but the `keep` newest backups this job made; the names of those deleted."""
    made = sorted(p for p in folder.glob(f"{PREFIX}*.db") if p.is_file())  # the name holds the UTC time
    doomed = made[: max(0, len(made) - keep)]
    for path in doomed:
        path.unlink(missing_ok=True)
    return [p.name for p in doomed]


def _verify(path: Path) -> tuple[list[str], int]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return quick_check(conn), schema_version(conn)
    except sqlite3.DatabaseError as exc:
        return [str(exc)], 0
    finally:
        conn.close()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
