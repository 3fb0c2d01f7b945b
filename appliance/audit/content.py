"""Kept text beside the hashed records (`audit_content`): checking it against the digests the
bodies hold, and erasing it, for the right to erasure, without breaking the chain.

A content row holds canonical JSON `{field: text}` for one record (today `prompt`); the
record's body holds `{field: {"kept": policy, "sha256": hex}}`. Erasure sets the text to NULL,
stamps the time and the idx of the audit record that did it; the body, and so the chain, are
untouched, and the erasure itself is an admin audit record in the same transaction.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from appliance.audit.log import Actor, AuditLog
from appliance.audit.retention import sha256_text
from appliance.errors import InvalidRequest

__all__ = ["ContentReport", "ErasureSelector", "check_content", "erase_fn", "read_content"]


@dataclass(frozen=True, slots=True)
class ContentReport:
    kept: int = 0
    erased: int = 0
    bad_index: int | None = None
    problem: str | None = None


def check_content(conn: sqlite3.Connection, start_idx: int = 1) -> ContentReport:
    """Every kept text from record `start_idx` on must match the digest its record's body holds."""
    kept = erased = 0
    rows = conn.execute(
        "SELECT c.idx, c.content, c.erased_at, a.body FROM audit_content c JOIN audit a ON a.idx = c.idx"
        " WHERE c.idx >= ? ORDER BY c.idx",
        (start_idx,),
    )
    try:
        for idx, content, erased_at, body in rows:
            if content is None:
                if erased_at is None:
                    return ContentReport(kept, erased, idx, "kept text is missing but no erasure is recorded")
                erased += 1
                continue
            try:
                fields = json.loads(content)
                digests = json.loads(body)
                for field, text in fields.items():
                    if sha256_text(text) != digests[field]["sha256"]:
                        return ContentReport(kept, erased, idx, f"kept {field} text was edited (digest mismatch)")
            except (ValueError, KeyError, TypeError, AttributeError):
                return ContentReport(kept, erased, idx, "kept text is malformed or has no digest in its record")
            kept += 1
    finally:
        rows.close()
    return ContentReport(kept, erased)


def read_content(conn: sqlite3.Connection, indexes: list[int]) -> dict[int, dict[str, Any]]:
    """idx -> {"content": {field: text} | None, "erased_at": float | None} for the given records."""
    out: dict[int, dict[str, Any]] = {}
    for start in range(0, len(indexes), 500):
        chunk = indexes[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for idx, content, erased_at in conn.execute(
            f"SELECT idx, content, erased_at FROM audit_content WHERE idx IN ({marks})", chunk
        ):
            out[idx] = {"content": json.loads(content) if content else None, "erased_at": erased_at}
    return out


@dataclass(frozen=True, slots=True)
class ErasureSelector:
    """Which records' kept text to erase: a key's, a team's, or everything before a time."""

    key_id: str | None = None
    team_id: str | None = None
    before: float | None = None

    def __post_init__(self) -> None:
        if sum(v is not None for v in (self.key_id, self.team_id, self.before)) != 1:
            raise InvalidRequest("erase needs exactly one of key, team or before")

    def where(self) -> tuple[str, tuple[Any, ...]]:
        if self.key_id is not None:
            return "a.key_id = ?", (self.key_id,)
        if self.team_id is not None:
            return "a.team_id = ?", (self.team_id,)
        return "a.ts < ?", (self.before,)

    def to_dict(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "team_id": self.team_id, "before": self.before}


def erase_fn(audit: AuditLog, actor: Actor, selector: ErasureSelector) -> Callable[[sqlite3.Connection], dict[str, Any]]:
    """A write function that erases the selected kept text and appends the admin record of it,
    in one transaction. Returns `{"erased": n, "record": idx}`."""
    clause, params = selector.where()

    def write(conn: sqlite3.Connection) -> dict[str, Any]:
        targets = [
            row[0]
            for row in conn.execute(
                f"SELECT c.idx FROM audit_content c JOIN audit a ON a.idx = c.idx WHERE c.content IS NOT NULL AND {clause}",
                params,
            )
        ]
        after = {"records": len(targets), "first": targets[0] if targets else None, "last": targets[-1] if targets else None}
        idx = audit.admin_fn(actor, "audit.erase", None, before=selector.to_dict(), after=after)(conn)
        now = time.time()
        for start in range(0, len(targets), 500):
            chunk = targets[start : start + 500]
            marks = ",".join("?" * len(chunk))
            conn.execute(
                f"UPDATE audit_content SET content = NULL, erased_at = ?, erased_by = ? WHERE idx IN ({marks})",
                (now, idx, *chunk),
            )
        return {"erased": len(targets), "record": idx}

    return write
