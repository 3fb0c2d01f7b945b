"""The jobs over what is on disk, on real services with the real default model loaded:
`audit_chain` (incremental, and a tampered record after the last verified one fails),
`model_files` (hashes only what changed; a changed registered file or re-encoding fails),
`backup` (verified, retention keeps the newest and the migration backups) and `sqlite`."""

from __future__ import annotations

import sqlite3
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_health_support import Site, by_subject, encoded_cache, open_site, replace_changed

from appliance.checks.health.database import quick_check
from appliance.store.migrations import latest_version
from tests.conftest import MODEL_NAME


@pytest.fixture
async def site(tmp_path: Path, model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Site]:
    async with open_site(tmp_path / "data", model_path, encoded_cache(tmp_path_factory, model_path)) as site:
        yield site


def append(site: Site, n: int) -> int:
    idx = 0
    for i in range(n):
        idx = site.services.audit.append_sync("system", {"event": "test", "n": i}, key_id=None, team_id=None)
    return idx


def tamper(site: Site, idx: int) -> None:
    db = sqlite3.connect(site.services.store.path, isolation_level=None)
    try:
        db.execute("UPDATE audit SET body = json_set(body, '$.n', 999) WHERE idx = ?", (idx,))
    finally:
        db.close()


async def test_the_audit_chain_is_verified_from_where_the_last_run_stopped(site: Site) -> None:
    last = append(site, 5)
    assert site.services.audit.checkpoint_sync() is not None  # signed, and checked against the pinned key
    (first,) = await site.run("audit_chain")
    assert first.status == "ok" and first.subject == "audit", first
    assert first.details["from_index"] == 1 and first.details["records_checked"] == last
    assert first.details["checkpoints_checked"] == 1
    assert site.state("audit_chain", "audit")["idx"] == last  # type: ignore[index]

    (again,) = await site.run("audit_chain")
    assert again.status == "ok" and again.details["records_checked"] == 1  # the last verified one, no more
    assert again.summary == f"no new records since record {last}, which verifies still"

    newest = append(site, 3)
    (more,) = await site.run("audit_chain")
    assert (more.details["from_index"], more.details["new_records"], more.details["records_checked"]) == (last, 3, 4)

    append(site, 4)
    tamper(site, newest + 2)  # after the last verified record
    (broken,) = await site.run("audit_chain")
    assert broken.status == "fail" and broken.details["first_bad_index"] == newest + 2, broken
    assert f"audit chain broken at record {newest + 2}: hash mismatch (record edited)" in broken.summary
    assert broken.details["records_checked"] == 2  # the last verified record and the one after it
    assert site.state("audit_chain", "audit")["idx"] == newest  # type: ignore[index]  # not moved on
    (still,) = await site.run("audit_chain")
    assert still.status == "fail"
    (whole,) = await site.run("audit_chain", full=True)
    assert whole.status == "fail" and whole.details["from_index"] == 1


async def test_the_last_verified_record_itself_is_checked_again(site: Site) -> None:
    last = append(site, 3)
    assert (await site.run("audit_chain"))[0].status == "ok"
    tamper(site, last)
    (found,) = await site.run("audit_chain")
    assert found.status == "fail" and f"broken at record {last}: hash mismatch (record edited)" in found.summary


async def test_model_files_are_hashed_once_then_only_when_they_change(site: Site) -> None:
    (first,) = await site.run("model_files")
    assert first.status == "ok" and first.subject == MODEL_NAME, first
    roles = [f["role"] for f in first.details["files"]]
    assert roles == ["registered", "q4_0_offsets", "q4_0_offsets adapter"]  # what the engine serves, too
    assert first.details["hashed"] == 3
    (second,) = await site.run("model_files")
    assert second.status == "ok" and second.details["hashed"] == 0
    (full,) = await site.run("model_files", full=True)
    assert full.status == "ok" and full.details["hashed"] == 3


async def test_a_model_file_changed_on_disk_fails(site: Site) -> None:
    assert (await site.run("model_files"))[0].status == "ok"
    files = {f["role"]: Path(f["path"]) for f in (await site.run("model_files"))[0].details["files"]}
    replace_changed(files["q4_0_offsets adapter"])
    (found,) = await site.run("model_files")
    assert found.status == "fail" and found.summary.startswith("q4_0_offsets adapter "), found
    assert "changed on disk" in found.summary and found.details["hashed"] == 1
    replace_changed(files["registered"])
    (found,) = await site.run("model_files")
    assert found.status == "fail" and "registered smollm2-135m-instruct.gguf: changed on disk" in found.summary
    assert [f["status"] for f in found.details["files"]] == ["fail", "ok", "fail"]


async def test_a_missing_model_file_fails(site: Site) -> None:
    Path(site.services.models.get(MODEL_NAME).path).unlink()
    (found,) = await site.run("model_files")
    assert found.status == "fail" and "registered smollm2-135m-instruct.gguf: missing" in found.summary


async def test_a_backup_is_verified_and_only_its_own_older_ones_are_pruned(site: Site) -> None:
    folder = site.services.settings.paths.backups
    migrations = sorted(p.name for p in folder.glob("appliance-v*.db"))  # taken by the real migrations
    assert migrations
    old = [folder / f"appliance-backup-2020010{d}T030000Z-000000.db" for d in range(1, 7)]
    for path in old:
        path.write_bytes(b"an older backup")
    other = folder / "notes.txt"
    other.write_text("not a backup")
    append(site, 2)

    (found,) = await site.run("backup", keep=3)
    assert found.status == "ok" and found.subject == "backup", found
    made = Path(found.details["path"])
    assert found.details["schema_version"] == latest_version()
    kept = sorted(p.name for p in folder.iterdir())
    assert kept == sorted([*migrations, other.name, old[-2].name, old[-1].name, made.name])
    assert found.details["deleted"] == [p.name for p in old[:4]]
    assert stat.S_IMODE(made.stat().st_mode) == 0o600
    copy = sqlite3.connect(f"file:{made}?mode=ro", uri=True)
    try:
        assert quick_check(copy) == []
        assert copy.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # one self-contained file
        live = site.services.store.query_one("SELECT COUNT(*), MAX(idx) FROM audit")
        assert tuple(copy.execute("SELECT COUNT(*), MAX(idx) FROM audit").fetchone()) == tuple(live)  # type: ignore[arg-type]
    finally:
        copy.close()

    del site.ctx.options["backup"]
    (again,) = await site.run("backup")  # keep defaults to 7: nothing more to delete
    assert again.status == "ok" and again.details["deleted"] == [] and again.details["keep"] == 7
    assert sorted(p.name for p in folder.glob("appliance-v*.db")) == migrations


async def test_sqlite_quick_check_and_wal_size(site: Site) -> None:
    append(site, 3)
    found = by_subject(await site.run("sqlite"))
    assert found["database"].status == "ok" and found["database"].summary.startswith("quick_check ok"), found
    assert found["database"].details["size_mb"] > 0
    assert found["wal"].status == "ok"
    found = by_subject(await site.run("sqlite", max_wal_mb=0))
    assert found["wal"].status == "warn" and found["wal"].details["size_mb"] > 0


def test_quick_check_reports_a_damaged_database(tmp_path: Path) -> None:
    path = tmp_path / "damaged.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    db.execute("CREATE INDEX t_v ON t (v)")
    db.executemany("INSERT INTO t (v) VALUES (?)", [(f"value {i:05d}" * 4,) for i in range(2000)])
    db.commit()
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 't_v'").fetchone()[0]
    db.close()
    with open(path, "r+b") as fh:  # scribble over the index's root page
        fh.seek((root - 1) * page_size + 8)
        fh.write(b"\xff" * 64)
    conn = sqlite3.connect(path)
    try:
        assert quick_check(conn) != []
    finally:
        conn.close()
