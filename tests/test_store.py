"""The store: migrations from empty and from the previous version, backups, refusal of a newer
schema without touching it, and group commits where one bad write spoils nothing else."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import threading
from pathlib import Path

import pytest
import sqlite_utils

from appliance.errors import SchemaTooNewError, StoreError
from appliance.store import MIGRATIONS, Store, latest_version
from appliance.store.migrations import migrate


def _columns(path: Path) -> dict[str, dict[str, type]]:
    db = sqlite_utils.Database(path)
    return {t.name: t.columns_dict for t in db.tables}


def test_migrate_from_empty_creates_every_table(tmp_path: Path) -> None:
    db_path = tmp_path / "a.db"
    assert migrate(db_path, backups_dir=tmp_path / "b") == latest_version()
    tables = set(sqlite_utils.Database(db_path).table_names())
    assert {"migrations", "settings", "api_keys", "models", "teams", "audit", "audit_checkpoints", "usage", "budgets"} <= tables
    versions = [r[0] for r in sqlite3.connect(db_path).execute("SELECT version FROM migrations ORDER BY version")]
    assert versions == list(range(1, latest_version() + 1))
    assert sqlite3.connect(db_path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # the empty database is not backed up; each later step is
    assert len(list((tmp_path / "b").glob("appliance-v0-*.db"))) == 0


def test_migrate_from_previous_version_backs_up_first_and_matches_fresh_schema(tmp_path: Path) -> None:
    previous = latest_version() - 1
    stepwise, fresh, backups = tmp_path / "step.db", tmp_path / "fresh.db", tmp_path / "backups"
    migrate(stepwise, backups_dir=backups, target=previous)
    if previous > 0:
        sqlite_utils.Database(stepwise)["settings"].insert({"key": "canary", "value": "kept"})
    assert migrate(stepwise, backups_dir=backups) == latest_version()
    migrate(fresh)
    assert _columns(stepwise) == _columns(fresh)
    if previous > 0:
        assert sqlite_utils.Database(stepwise)["settings"].get("canary")["value"] == "kept"
        snaps = list(backups.glob(f"appliance-v{previous}-*.db"))
        assert len(snaps) == 1
        assert sqlite3.connect(snaps[0]).execute("SELECT MAX(version) FROM migrations").fetchone()[0] == previous


def test_each_step_backs_up_a_non_empty_database(tmp_path: Path) -> None:
    db_path, backups = tmp_path / "a.db", tmp_path / "backups"
    migrate(db_path, target=1)
    migrate(db_path, backups_dir=backups)
    assert len(list(backups.glob("*.db"))) == latest_version() - 1


def test_newer_schema_is_refused_and_left_untouched(tmp_path: Path) -> None:
    db_path = tmp_path / "a.db"
    migrate(db_path)
    conn = sqlite3.connect(db_path)
    conn.execute("INSERT INTO migrations VALUES (?, 'from_the_future', 0)", (len(MIGRATIONS) + 5,))
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    before = hashlib.sha256(db_path.read_bytes()).hexdigest()
    with pytest.raises(SchemaTooNewError, match="newer version"):
        Store(db_path).open()
    assert hashlib.sha256(db_path.read_bytes()).hexdigest() == before


def test_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    db_path = tmp_path / "a.db"
    db_path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a usable appliance database"):
        Store(db_path).open()
    assert db_path.read_bytes() == b"this is not sqlite" * 100


def test_group_commit_isolates_a_failing_write(tmp_path: Path) -> None:
    with Store(tmp_path / "a.db") as store:
        futures = [
            store.submit(lambda c, i=i: c.execute("INSERT INTO settings VALUES (?, ?)", (f"k{i}", "v")))
            for i in range(50)
        ]
        bad = store.submit(lambda c: c.execute("INSERT INTO settings VALUES ('k1', 'duplicate')"))
        for f in futures:
            f.result()
        # sqlite3's own errors reach callers as StoreError, which every caller handles.
        with pytest.raises(StoreError, match="UNIQUE constraint failed"):
            bad.result()
        assert store.query_one("SELECT COUNT(*) FROM settings")[0] == 50
        assert store.query_one("SELECT value FROM settings WHERE key='k1'")[0] == "v"
        assert store.commits < 51, "writes were not grouped"


async def test_async_write_is_visible_to_readers_once_awaited(tmp_path: Path) -> None:
    with Store(tmp_path / "a.db") as store:
        await store.write(lambda c: c.execute("INSERT INTO settings VALUES ('a', 'b')"))
        assert store.query_one("SELECT value FROM settings WHERE key='a'")[0] == "b"


async def test_a_caller_cancelled_mid_write_neither_loses_the_write_nor_stops_the_writer(tmp_path: Path) -> None:
    # A client hanging up while its audit record is being committed cancels the awaiting task.
    # The record must still land, and the one writer thread must go on serving everyone else.
    with Store(tmp_path / "a.db") as store:
        gate = threading.Event()
        busy = store.submit(lambda c: gate.wait(10))  # hold the writer so the next write stays queued
        task = asyncio.create_task(store.write(lambda c: c.execute("INSERT INTO settings VALUES ('audit', 'kept')")))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.set()
        busy.result(10)
        await asyncio.wait_for(store.write(lambda c: c.execute("INSERT INTO settings VALUES ('next', 'ok')")), 10)
        assert dict(store.query("SELECT key, value FROM settings")) == {"audit": "kept", "next": "ok"}


def test_the_wal_is_checkpointed_in_the_background_and_stays_bounded(tmp_path: Path) -> None:
    # The writer's connection never checkpoints (that stalled one commit in ~90 by milliseconds);
    # the checkpoint thread must, or the WAL grows by every page ever written.
    path = tmp_path / "a.db"
    row = "x" * 3000  # about a page per commit, plus the header page
    with Store(path) as store:
        for i in range(1500):
            store.write_sync(lambda c, i=i: c.execute("INSERT INTO settings VALUES (?, ?)", (f"k{i}", row)))
        assert store.checkpoints > 0
        wal = path.with_name(path.name + "-wal").stat().st_size
        assert wal < 3000 * 4096 // 4, f"the WAL grew to {wal} bytes over 1,500 commits"
        assert store.query_one("SELECT COUNT(*) FROM settings")[0] == 1500
    with Store(path) as store:  # and nothing was lost on the way
        assert store.query_one("SELECT COUNT(*) FROM settings")[0] == 1500
