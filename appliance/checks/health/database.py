"""The `sqlite` job: SQLite's `quick_check` of the database, its size, and the size of its
write-ahead log; findings `database` and `wal`.

`quick_check` reads every page (O(database size)) on a read-only connection of its own, so
the writer is never held up. A WAL that keeps growing means something holds a read snapshot
open and checkpoints cannot finish.

Options (`[check.sqlite]`): `max_wal_mb` (warn over 256).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from appliance.checks.findings import Finding, fail, ok, warn
from appliance.checks.registry import CheckContext, CheckJob

__all__ = ["NAME", "quick_check", "run", "sqlite_job", "wal_path"]

NAME = "sqlite"
MiB = 1 << 20
_MAX_PROBLEMS = 20


def sqlite_job(ctx: CheckContext) -> CheckJob:
    return CheckJob(
        NAME, lambda: run(ctx), 300.0, description="SQLite quick_check, database and WAL size", timeout_seconds=600.0
    )


def quick_check(conn: sqlite3.Connection) -> list[str]:
    """SQLite's `PRAGMA quick_check`: [] when the database is sound, else its first problems."""
    rows = [str(row[0]) for row in conn.execute(f"PRAGMA quick_check({_MAX_PROBLEMS})").fetchall()]
    return [] if rows == ["ok"] else rows


def wal_path(database: Path) -> Path:
    return database.with_name(database.name + "-wal")


def run(ctx: CheckContext) -> list[Finding]:
    store = ctx.services.store
    max_wal_mb = ctx.option(NAME, "max_wal_mb", 256.0)
    with store.snapshot() as conn:
        try:
            problems = quick_check(conn)
        except sqlite3.DatabaseError as exc:
            problems = [str(exc)]
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
        free_pages = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
    size_mb = round(page_size * pages / MiB, 2)
    details = {"path": str(store.path), "size_mb": size_mb, "pages": pages, "free_pages": free_pages}
    if problems:
        database = fail(
            f"quick_check found problems: {'; '.join(problems[:3])}", "database", problems=problems, **details
        )
    else:
        database = ok(f"quick_check ok; {size_mb} MB", "database", **details)
    return [database, _wal(store.path, max_wal_mb)]


def _wal(database: Path, max_mb: float) -> Finding:
    try:
        size = wal_path(database).stat().st_size
    except FileNotFoundError:
        size = 0
    size_mb = round(size / MiB, 2)
    if size_mb > max_mb:
        return warn(
            f"the write-ahead log is {size_mb} MB (warn over {max_mb:g} MB): a long read may be holding "
            "checkpoints back",
            "wal",
            size_mb=size_mb,
        )
    return ok(f"the write-ahead log is {size_mb} MB", "wal", size_mb=size_mb)
