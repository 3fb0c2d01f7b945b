"""Verification of the audit chain and its checkpoints, streaming over the table.

Checks, in idx order, stopping at the first problem:
- idx runs 1, 2, 3... without gaps (a gap: records deleted);
- each record's prev_hash is the previous record's hash (a break: records edited and re-hashed,
  reordered or inserted);
- each record's hash is recomputed from its columns (a mismatch: the record was edited, including
  its key_id/team_id columns) and its body is stored in canonical form;
- each stored checkpoint is signed by the trusted public key, and names the hash the record at
  its index really has; no checkpoint names a record past the end (tail truncated);
- with an exported (off-box) checkpoint: its signature, that its key is the trusted key, and that
  the log still reaches its index with the same hash (otherwise: tail truncated or rewritten);
- each kept text beside a record matches the digest in its body (`audit.content`); erased text
  is counted, not a failure.
"""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass, replace
from typing import Any

from appliance.audit.canonical import recanonicalize
from appliance.audit.chain import GENESIS_HASH, Checkpoint, record_hash
from appliance.audit.content import check_content
from appliance.audit.signing import parse_public_key, verify_signature
from appliance.errors import AuditError


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The outcome. `first_bad_index` is the first record idx at which a check failed (None
    when ok, or when the problem is not tied to a record). `last_index`/`last_hash` are the last
    record verified good: pass them to `verify_from` to continue incrementally."""

    ok: bool
    records_checked: int
    checkpoints_checked: int
    first_bad_index: int | None
    problem: str | None
    last_index: int = 0
    last_hash: str = GENESIS_HASH
    content_checked: int = 0
    content_erased: int = 0

    def summary(self) -> str:
        if self.ok:
            kept = f"; {self.content_checked} kept prompt texts match their digests" if self.content_checked else ""
            erased = f"; {self.content_erased} erased" if self.content_erased else ""
            return f"audit chain ok: {self.records_checked} records and {self.checkpoints_checked} checkpoints verified{kept}{erased}"
        if self.first_bad_index is not None:
            return f"audit chain broken at record {self.first_bad_index}: {self.problem}"
        return f"audit verification failed: {self.problem}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verify(conn: sqlite3.Connection, *, public_key: str | None, checkpoint: Checkpoint | None = None) -> VerifyReport:
    """Verify the whole chain. `public_key` (hex) is the trusted key: the pinned one from the key
    directory or one given explicitly, never the key stored in the checkpoint rows. With
    `public_key=None`, any stored checkpoint fails verification."""
    return verify_from(conn, 1, GENESIS_HASH, public_key=public_key, checkpoint=checkpoint)


def verify_from(
    conn: sqlite3.Connection,
    start_idx: int,
    prev_hash: str,
    *,
    public_key: str | None = None,
    checkpoint: Checkpoint | None = None,
) -> VerifyReport:
    """Verify records from `start_idx` on, given the hash of record `start_idx - 1` from an
    earlier run (`GENESIS_HASH` for 1). Checks that record `start_idx - 1` still has that hash,
    then everything after it, including checkpoints at or after `start_idx`."""
    if start_idx < 1:
        raise ValueError("start_idx starts at 1")
    if public_key is not None:
        parse_public_key(public_key)  # AuditError if malformed
        public_key = public_key.strip().lower()
    own_txn = not conn.in_transaction
    try:
        if own_txn:
            conn.execute("BEGIN")  # one snapshot for records and checkpoints
        return _verify(conn, start_idx, prev_hash, public_key, checkpoint)
    except sqlite3.DatabaseError as exc:
        raise AuditError(f"cannot read the audit log: {exc}") from None
    finally:
        if own_txn and conn.in_transaction:
            conn.execute("ROLLBACK")


class _Run:
    def __init__(self, start_idx: int, prev_hash: str) -> None:
        self.records = 0
        self.checkpoints = 0
        self.last_index = start_idx - 1
        self.last_hash = prev_hash

    def ok(self) -> VerifyReport:
        return VerifyReport(True, self.records, self.checkpoints, None, None, self.last_index, self.last_hash)

    def bad(self, index: int | None, problem: str) -> VerifyReport:
        return VerifyReport(False, self.records, self.checkpoints, index, problem, self.last_index, self.last_hash)


def _verify(
    conn: sqlite3.Connection, start_idx: int, prev_hash: str, public_key: str | None, exported: Checkpoint | None
) -> VerifyReport:
    run = _Run(start_idx, prev_hash)
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='audit'").fetchone():
        raise AuditError("this database has no audit table (is it an appliance database at its current version?)")

    if exported is not None:
        if public_key is None:
            public_key = exported.public_key.lower()
        elif exported.public_key.lower() != public_key:
            return run.bad(
                None,
                f"the exported checkpoint was signed by key {exported.public_key[:16]}..., not the trusted key "
                f"{public_key[:16]}... (the signing key was replaced)",
            )
        if not verify_signature(public_key, exported.message, exported.signature):
            return run.bad(None, "the exported checkpoint's signature is invalid (checkpoint file altered)")

    if start_idx > 1:
        row = conn.execute("SELECT hash FROM audit WHERE idx = ?", (start_idx - 1,)).fetchone()
        if row is None or row[0] != prev_hash:
            what = "is missing" if row is None else "has a different hash"
            return run.bad(start_idx - 1, f"record {what} since the last verification (edited or deleted)")

    records = conn.execute(
        "SELECT idx, ts, kind, key_id, team_id, body, prev_hash, hash FROM audit WHERE idx >= ? ORDER BY idx", (start_idx,)
    )
    cp_cursor = conn.execute(
        f"SELECT {Checkpoint.COLUMNS} FROM audit_checkpoints WHERE record_idx >= ? ORDER BY record_idx, idx", (start_idx,)
    )
    try:
        report = _walk(run, records, cp_cursor, start_idx, public_key, exported)
    finally:
        records.close()
        cp_cursor.close()
    if not report.ok or not conn.execute("SELECT 1 FROM sqlite_master WHERE name='audit_content'").fetchone():
        return report
    content = check_content(conn, start_idx)
    if content.problem is not None:
        return replace(report, ok=False, first_bad_index=content.bad_index, problem=content.problem)
    return replace(report, content_checked=content.kept, content_erased=content.erased)


def _walk(
    run: _Run,
    records: sqlite3.Cursor,
    cp_cursor: sqlite3.Cursor,
    start_idx: int,
    public_key: str | None,
    exported: Checkpoint | None,
) -> VerifyReport:
    stored = (Checkpoint.from_row(row) for row in cp_cursor)
    pending = next(stored, None)
    expected = start_idx
    for idx, ts, kind, key_id, team_id, body, row_prev, row_hash in records:
        if idx != expected:
            missing = f"record {expected} is missing" if idx == expected + 1 else f"records {expected}-{idx - 1} are missing"
            return run.bad(expected, f"{missing} (deleted)")
        problem = _check_record(idx, ts, kind, key_id, team_id, body, row_prev, row_hash, run.last_hash)
        if problem:
            return run.bad(idx, problem)
        while pending is not None and pending.index == idx:
            problem = _check_checkpoint(pending, row_hash, public_key)
            if problem:
                return run.bad(idx, problem)
            run.checkpoints += 1
            pending = next(stored, None)
        if exported is not None and exported.index == idx and exported.hash != row_hash:
            return run.bad(idx, "hash differs from the exported checkpoint (the log was rewritten)")
        run.records += 1
        run.last_index, run.last_hash = idx, row_hash
        expected += 1

    if pending is not None:
        return run.bad(
            run.last_index + 1,
            f"checkpoint {pending.id} covers record {pending.index} but the log ends at record {run.last_index} (tail truncated)",
        )
    if exported is not None and exported.index > run.last_index:
        return run.bad(
            run.last_index + 1,
            f"the log ends at record {run.last_index} but the exported checkpoint covers record {exported.index} (tail truncated)",
        )
    return run.ok()


def _check_record(
    idx: int, ts: Any, kind: Any, key_id: Any, team_id: Any, body: Any, row_prev: Any, row_hash: Any, prev: str
) -> str | None:
    linked = row_prev == prev
    try:
        if not isinstance(body, str):
            raise ValueError("body is not text")
        if recanonicalize(body) != body:
            return "record edited (body is not in canonical form)"
        if not isinstance(ts, float):
            raise ValueError("ts is not a float")
        recomputed = record_hash(row_prev if isinstance(row_prev, str) else prev, idx, ts, kind, key_id, team_id, body)
    except (ValueError, TypeError):
        return "record edited (malformed fields)"
    hashed = recomputed == row_hash
    if linked and hashed:
        return None
    if linked:
        return "hash mismatch (record edited)"
    if hashed:
        return f"prev_hash does not match record {idx - 1}'s hash (record {idx - 1} was edited and re-hashed, or records were inserted or reordered)"
    return f"record does not follow record {idx - 1} and its hash does not match (records reordered, inserted or replaced)"


def _check_checkpoint(cp: Checkpoint, record_hash_: str, public_key: str | None) -> str | None:
    if public_key is None:
        return f"checkpoint {cp.id} cannot be checked: no trusted public key (pass one, or an exported checkpoint)"
    if str(cp.public_key).lower() != public_key:
        return f"checkpoint {cp.id} was signed by another key {str(cp.public_key)[:16]}... (signing key replaced, checkpoint forged)"
    try:
        valid = verify_signature(public_key, cp.message, cp.signature)
    except (ValueError, TypeError):
        valid = False
    if not valid:
        return f"checkpoint {cp.id} has an invalid signature (checkpoint tampered or forged)"
    if cp.hash != record_hash_:
        return f"checkpoint {cp.id} names a different hash than the record has (record or checkpoint altered)"
    return None
