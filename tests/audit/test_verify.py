"""Verification against an attacker with write access to the database file (and, for the key
swap, to the key directory): every kind of tampering is found and the first bad record named."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.audit import (
    GENESIS_HASH,
    AuditError,
    Checkpoint,
    Signer,
    export_checkpoint,
    load_checkpoint,
    verify,
    verify_from,
)
from appliance.audit.chain import record_hash
from appliance.audit.signing import KEY_FILE, PUBLIC_KEY_FILE, load_pinned_public_key

from . import connect, fill, open_log

N, EVERY = 25, 10  # records 1..25, stored checkpoints at 10 and 20


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Path]:
    store, log = open_log(tmp_path, every=EVERY)
    with store:
        fill(log, N)
    yield tmp_path / "appliance.db"


@pytest.fixture
def key(tmp_path: Path, db: Path) -> str:
    pinned = load_pinned_public_key(tmp_path / "keys")
    assert pinned is not None
    return pinned


def exported_tail(tmp_path: Path) -> Checkpoint:
    """Sign the tail now and round-trip it through a file, as an off-box copy."""
    store, log = open_log(tmp_path, every=EVERY)
    with store:
        checkpoint = log.checkpoint_sync()
    assert checkpoint is not None
    path = tmp_path / "offbox.json"
    path.write_text(export_checkpoint(checkpoint))
    return load_checkpoint(path)


def rehash_from(conn: sqlite3.Connection, start: int) -> None:
    """What a careful attacker does after an edit: recompute every hash from `start` on."""
    prev = conn.execute("SELECT hash FROM audit WHERE idx = ?", (start - 1,)).fetchone()
    prev_hash = prev[0] if prev else GENESIS_HASH
    rows = conn.execute("SELECT idx, ts, kind, key_id, team_id, body FROM audit WHERE idx >= ? ORDER BY idx", (start,)).fetchall()
    for idx, ts, kind, key_id, team_id, body in rows:
        digest = record_hash(prev_hash, idx, ts, kind, key_id, team_id, body)
        conn.execute("UPDATE audit SET prev_hash = ?, hash = ? WHERE idx = ?", (prev_hash, digest, idx))
        prev_hash = digest


def check(db: Path, key: str | None, *, checkpoint: Checkpoint | None = None) -> tuple[int | None, str]:
    report = verify(connect(db), public_key=key, checkpoint=checkpoint)
    assert not report.ok
    return report.first_bad_index, report.problem or ""


def test_an_untouched_log_verifies(db: Path, key: str) -> None:
    report = verify(connect(db), public_key=key)
    assert report.ok and report.problem is None and report.first_bad_index is None
    assert (report.records_checked, report.checkpoints_checked, report.last_index) == (N, 2, N)
    assert report.summary() == f"audit chain ok: {N} records and 2 checkpoints verified"


def test_an_empty_log_verifies(tmp_path: Path) -> None:
    store, _ = open_log(tmp_path)
    with store:
        pass
    report = verify(connect(tmp_path / "appliance.db"), public_key=None)
    assert report.ok and report.records_checked == 0


def test_an_edited_body_is_a_hash_mismatch(db: Path, key: str) -> None:
    connect(db).execute("UPDATE audit SET body = json_set(body, '$.status', 500) WHERE idx = 7")
    index, problem = check(db, key)
    assert index == 7 and problem == "hash mismatch (record edited)"
    assert verify(connect(db), public_key=key).summary() == "audit chain broken at record 7: hash mismatch (record edited)"


def test_an_edited_key_id_column_is_a_hash_mismatch(db: Path, key: str) -> None:
    connect(db).execute("UPDATE audit SET key_id = 'someone-else' WHERE idx = 4")
    assert check(db, key) == (4, "hash mismatch (record edited)")


def test_a_reformatted_body_is_caught(db: Path, key: str) -> None:
    conn = connect(db)
    body = conn.execute("SELECT body FROM audit WHERE idx = 3").fetchone()[0]
    conn.execute("UPDATE audit SET body = ? WHERE idx = 3", (body.replace(",", ", "),))
    index, problem = check(db, key)
    assert index == 3 and "canonical" in problem


def test_a_body_that_cannot_be_canonical_is_caught(db: Path, key: str) -> None:
    connect(db).execute("""UPDATE audit SET body = '{"cost":NaN}' WHERE idx = 9""")
    assert check(db, key) == (9, "record edited (malformed fields)")
    connect(db).execute("UPDATE audit SET body = 'not json' WHERE idx = 2")
    assert check(db, key) == (2, "record edited (malformed fields)")


def test_an_edit_with_its_hash_recomputed_breaks_the_next_link(db: Path, key: str) -> None:
    conn = connect(db)
    conn.execute("UPDATE audit SET body = json_set(body, '$.cost', 0.0) WHERE idx = 7")
    ts, kind, key_id, team_id, body, prev = conn.execute("SELECT ts, kind, key_id, team_id, body, prev_hash FROM audit WHERE idx = 7").fetchone()
    conn.execute("UPDATE audit SET hash = ? WHERE idx = 7", (record_hash(prev, 7, ts, kind, key_id, team_id, body),))
    index, problem = check(db, key)
    assert index == 8 and problem.startswith("prev_hash does not match record 7's hash")


def test_an_edit_with_the_whole_chain_recomputed_is_caught_by_a_stored_checkpoint(db: Path, key: str) -> None:
    conn = connect(db)
    conn.execute("UPDATE audit SET body = json_set(body, '$.cost', 0.0) WHERE idx = 7")
    rehash_from(conn, 7)
    index, problem = check(db, key)
    assert index == 10 and "names a different hash" in problem


def test_a_deleted_middle_record_is_a_gap(db: Path, key: str) -> None:
    connect(db).execute("DELETE FROM audit WHERE idx = 12")
    assert check(db, key) == (12, "record 12 is missing (deleted)")
    connect(db).execute("DELETE FROM audit WHERE idx = 13")
    assert check(db, key) == (12, "records 12-13 are missing (deleted)")


def test_a_deleted_first_record_is_a_gap(db: Path, key: str) -> None:
    connect(db).execute("DELETE FROM audit WHERE idx = 1")
    assert check(db, key)[0] == 1


def test_a_deleted_last_record_is_caught_only_with_an_exported_checkpoint(tmp_path: Path, db: Path, key: str) -> None:
    offbox = exported_tail(tmp_path)  # also stores a checkpoint at 25
    assert offbox.index == N
    assert verify(connect(db), public_key=key, checkpoint=offbox).ok
    conn = connect(db)
    conn.execute("DELETE FROM audit WHERE idx = ?", (N,))
    index, problem = check(db, key)  # the stored checkpoint at 25 still gives it away
    assert index == N and "tail truncated" in problem
    conn.execute("DELETE FROM audit_checkpoints WHERE record_idx >= ?", (N,))  # ...so the attacker deletes it too
    assert verify(connect(db), public_key=key).ok  # undetectable from the box alone
    index, problem = check(db, key, checkpoint=offbox)
    assert index == N
    assert problem == f"the log ends at record {N - 1} but the exported checkpoint covers record {N} (tail truncated)"


def test_swapped_records_are_caught_at_the_first(db: Path, key: str) -> None:
    conn = connect(db)
    cols = "ts, kind, key_id, team_id, body, prev_hash, hash"
    five, six = (conn.execute(f"SELECT {cols} FROM audit WHERE idx = ?", (i,)).fetchone() for i in (5, 6))
    sets = ", ".join(f"{c.strip()} = ?" for c in cols.split(","))
    conn.execute(f"UPDATE audit SET {sets} WHERE idx = 5", six)
    conn.execute(f"UPDATE audit SET {sets} WHERE idx = 6", five)
    index, problem = check(db, key)
    assert index == 5 and "reordered" in problem


def test_a_forged_record_inserted_in_the_middle_is_caught(db: Path, key: str) -> None:
    conn = connect(db)
    conn.execute("UPDATE audit SET idx = -idx WHERE idx >= 15")  # renumber 15.. to 16..
    conn.execute("UPDATE audit SET idx = 1 - idx WHERE idx < 0")
    prev = conn.execute("SELECT hash FROM audit WHERE idx = 14").fetchone()[0]
    body = '{"action":"keys.create","actor":{"kind":"cli","user":"root"},"after":null,"before":null,"target":"x"}'
    digest = record_hash(prev, 15, 1.0, "admin", None, None, body)
    conn.execute("INSERT INTO audit VALUES (15, 1.0, 'admin', NULL, NULL, ?, ?, ?)", (body, prev, digest))
    index, problem = check(db, key)
    assert index == 16 and "reordered, inserted or replaced" in problem


def test_a_tampered_checkpoint_signature_is_caught(db: Path, key: str) -> None:
    conn = connect(db)
    sig = conn.execute("SELECT signature FROM audit_checkpoints WHERE record_idx = 20").fetchone()[0]
    conn.execute("UPDATE audit_checkpoints SET signature = ? WHERE record_idx = 20", (("0" if sig[0] != "0" else "1") + sig[1:],))
    index, problem = check(db, key)
    assert index == 20 and "invalid signature" in problem


def test_a_tampered_checkpoint_time_or_hash_is_caught(db: Path, key: str) -> None:
    connect(db).execute("UPDATE audit_checkpoints SET ts = ts + 1 WHERE record_idx = 10")
    assert check(db, key)[0] == 10


def test_a_checkpoint_past_the_end_is_a_truncation(db: Path, key: str) -> None:
    connect(db).execute("DELETE FROM audit WHERE idx > 18")
    index, problem = check(db, key)
    assert index == 19 and problem == "checkpoint 2 covers record 20 but the log ends at record 18 (tail truncated)"


def test_stored_checkpoints_without_a_trusted_key_fail(db: Path) -> None:
    index, problem = check(db, None)
    assert index == 10 and "no trusted public key" in problem


def test_a_replaced_signing_key_does_not_validate_forged_checkpoints(tmp_path: Path, db: Path, key: str) -> None:
    offbox = exported_tail(tmp_path)
    # The attacker edits a record, re-hashes the chain, re-signs every checkpoint with a key of
    # their own and swaps it into the key directory.
    forger = Signer.generate()
    conn = connect(db)
    conn.execute("UPDATE audit SET body = json_set(body, '$.outcome', 'error') WHERE idx = 3")
    rehash_from(conn, 3)
    for cp_id, index in conn.execute("SELECT idx, record_idx FROM audit_checkpoints").fetchall():
        digest = conn.execute("SELECT hash FROM audit WHERE idx = ?", (index,)).fetchone()[0]
        ts = conn.execute("SELECT ts FROM audit_checkpoints WHERE idx = ?", (cp_id,)).fetchone()[0]
        conn.execute(
            "UPDATE audit_checkpoints SET record_hash = ?, signature = ?, public_key = ? WHERE idx = ?",
            (digest, forger.sign_checkpoint(index, digest, ts), forger.public_key_hex, cp_id),
        )
    keys = tmp_path / "keys"
    (keys / KEY_FILE).write_bytes(forger.private_pem())
    # Against the key pinned before the swap (or the one in the off-box checkpoint): rejected.
    index, problem = check(db, key)
    assert index == 10 and "signed by another key" in problem
    index, problem = check(db, offbox.public_key, checkpoint=offbox)
    assert index == 10 and "signed by another key" in problem
    # Even if the attacker also replaces the pinned public key, the off-box checkpoint disagrees.
    (keys / PUBLIC_KEY_FILE).write_text(forger.public_key_hex + "\n")
    index, problem = check(db, load_pinned_public_key(keys), checkpoint=offbox)
    assert index is None and "the signing key was replaced" in problem
    # And with the checkpoint rows deleted, the rewritten hash at the exported index is caught.
    conn.execute("DELETE FROM audit_checkpoints")
    index, problem = check(db, offbox.public_key, checkpoint=offbox)
    assert index == N and "exported checkpoint" in problem


def test_an_altered_exported_checkpoint_is_refused(tmp_path: Path, db: Path, key: str) -> None:
    offbox = exported_tail(tmp_path)
    moved = Checkpoint(offbox.index - 1, offbox.hash, offbox.time, offbox.signature, offbox.public_key)
    index, problem = check(db, key, checkpoint=moved)
    assert index is None and "signature is invalid" in problem


def test_verify_from_continues_where_the_last_run_stopped(tmp_path: Path, db: Path, key: str) -> None:
    first = verify(connect(db), public_key=key)
    store, log = open_log(tmp_path, every=EVERY)
    with store:
        fill(log, 6)
    more = verify_from(connect(db), first.last_index + 1, first.last_hash, public_key=key)
    assert more.ok and (more.records_checked, more.checkpoints_checked, more.last_index) == (6, 1, N + 6)
    # An edit behind the resume point is outside an incremental run...
    conn = connect(db)
    conn.execute("UPDATE audit SET body = json_set(body, '$.status', 418) WHERE idx = 20")
    assert verify_from(connect(db), more.last_index + 1, more.last_hash, public_key=key).ok
    # ...unless the attacker re-hashed the chain, which changes the record it resumes from.
    rehash_from(conn, 20)
    report = verify_from(connect(db), more.last_index + 1, more.last_hash, public_key=key)
    assert not report.ok and report.first_bad_index == N + 6 and "since the last verification" in report.problem  # type: ignore[operator]
    assert verify(connect(db), public_key=key).first_bad_index == 20


def test_a_database_without_the_audit_table_is_an_error(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "other.db")
    with pytest.raises(AuditError, match="no audit table"):
        verify(conn, public_key=None)
    with pytest.raises(AuditError, match="public key"):
        verify(conn, public_key="not-hex")


def test_verification_streams_a_large_log(tmp_path: Path) -> None:
    store, log = open_log(tmp_path, every=1000)
    with store:
        fill(log, 5000)
        conn = connect(tmp_path / "appliance.db")
        conn.execute("UPDATE audit SET body = json_set(body, '$.status', 201) WHERE idx = 4321")
        report = verify(conn, public_key=log.signer.public_key_hex)
    assert (report.first_bad_index, report.records_checked, report.checkpoints_checked) == (4321, 4320, 4)
    assert not conn.in_transaction  # its read snapshot was released
