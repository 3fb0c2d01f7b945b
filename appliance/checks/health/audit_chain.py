"""The `audit_chain` job: incremental verification of the audit hash chain; one finding,
`audit`.

Each run verifies only the records (and checkpoints, and kept texts) added since the last
record it verified, whose idx, hash and prev_hash it keeps in `CheckState`. It starts at that
record again: `verify_from` checks that the record before it still has the hash it links to,
recomputes its hash (an edit of the last verified record shows), then walks on. So a run
costs what was appended since the last one, not the whole log; an edit further back is for
`appliance audit verify`, or option `full` (`[check.audit_chain] full = true`), which
verifies the whole chain on every run. A problem is a "fail" and the state does not move on,
so every run fails until someone looks.
"""

from __future__ import annotations

import sqlite3
import time

from appliance.audit.chain import GENESIS_HASH
from appliance.audit.signing import load_pinned_public_key
from appliance.audit.verify import verify_from
from appliance.checks.findings import Finding, fail, ok
from appliance.checks.registry import CheckContext, CheckJob
from appliance.errors import AuditError

__all__ = ["NAME", "audit_chain_job", "run"]

NAME = "audit_chain"
SUBJECT = "audit"


def audit_chain_job(ctx: CheckContext) -> CheckJob:
    return CheckJob(
        NAME,
        lambda: run(ctx),
        300.0,
        description="verifies the audit chain incrementally, from the last record verified",
        timeout_seconds=900.0,
    )


def run(ctx: CheckContext) -> list[Finding]:
    services = ctx.services
    full = bool(ctx.option(NAME, "full", False))
    state = None if full else ctx.state.get(NAME, SUBJECT)
    known = int(state["idx"]) if state else 0
    resume = state is not None and known > 0 and bool(state.get("prev_hash"))
    start, prev = (known, str(state["prev_hash"])) if resume and state else (1, GENESIS_HASH)
    started = time.perf_counter()
    try:
        key = load_pinned_public_key(services.settings.paths.keys)
        with services.store.snapshot() as conn:
            conn.execute("BEGIN")  # one snapshot for the walk and the prev_hash kept
            try:
                report = verify_from(conn, start, prev, public_key=key)
                last_prev = _prev_hash(conn, report.last_index) if report.ok else None
            finally:
                conn.execute("ROLLBACK")
    except AuditError as exc:
        return [fail(f"the audit log cannot be verified: {exc.message}", SUBJECT)]
    new_records = max(0, report.last_index - known)
    details = {
        "from_index": start,
        "last_index": report.last_index,
        "new_records": new_records,
        "records_checked": report.records_checked,
        "checkpoints_checked": report.checkpoints_checked,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if not report.ok:
        hint = (
            "" if full else " (the last good record stays the starting point: every run fails until this is resolved)"
        )
        return [fail(report.summary() + hint, SUBJECT, first_bad_index=report.first_bad_index, **details)]
    ctx.state.put(
        NAME,
        SUBJECT,
        {"idx": report.last_index, "hash": report.last_hash, "prev_hash": last_prev, "verified_at": time.time()},
    )
    if new_records == 0:
        return [ok(f"no new records since record {report.last_index}, which verifies still", SUBJECT, **details)]
    return [
        ok(
            f"records {known + 1}-{report.last_index} verified ({new_records} new records, "
            f"{report.checkpoints_checked} checkpoints)",
            SUBJECT,
            **details,
        )
    ]


def _prev_hash(conn: sqlite3.Connection, idx: int) -> str:
    """The prev_hash of record `idx` (verified: the hash of record idx - 1)."""
    if idx < 1:
        return GENESIS_HASH
    row = conn.execute("SELECT prev_hash FROM audit WHERE idx = ?", (idx,)).fetchone()
    return str(row[0]) if row else GENESIS_HASH
