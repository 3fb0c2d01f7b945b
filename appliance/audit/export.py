"""Export of audit records (JSONL or CSV) and of signed checkpoints (JSON).

JSONL: one object per line with `idx`, `ts` (ISO-8601 UTC), `ts_epoch` (the exact float that
was hashed), `kind`, `key_id`, `team_id`, `body` (an object), `prev_hash` and `hash`. An
external verifier recomputes each hash with nothing but SHA-256 and a JSON encoder:

    record = {"body": body, "idx": idx, "key_id": key_id, "kind": kind,
              "team_id": team_id, "ts": ts_epoch}
    encoded = json.dumps(record, sort_keys=True, separators=(",", ":"),
                         ensure_ascii=False, allow_nan=False).encode("utf-8")
    assert sha256(bytes.fromhex(prev_hash) + encoded).hexdigest() == hash
    # and each line's prev_hash equals the previous line's hash ("0" * 64 before record 1)

(floats written as their shortest round-trip form, as Python's `repr`). An export that starts
later than record 1 (`since`) is checked from its first line's `prev_hash` on; a checkpoint
exported with `export_checkpoint` anchors it to a signature.

Records whose prompt was kept (policy `redacted` or `full`) also carry `content`, the kept text
by field, which must match the digest in the body (`sha256` of its UTF-8), or
`content_erased_at` once it was erased. Neither is covered by the chain's hashes.

CSV: the same columns, with `body` and `content` as canonical JSON text.

Checkpoint file: `{"index", "hash", "time", "signature", "public_key"}`; the Ed25519 signature
(hex) covers the canonical encoding of `{"hash", "index", "time"}` and `public_key` is the raw
key in hex.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from appliance.audit.chain import AuditRecord, Checkpoint
from appliance.errors import AuditError

CSV_COLUMNS = ["idx", "ts", "ts_epoch", "kind", "key_id", "team_id", "body", "prev_hash", "hash", "content", "content_erased_at"]
_MAX_CHECKPOINT_FILE = 64 * 1024
_HEX = {"hash": 64, "signature": 128, "public_key": 64}


def export_records(
    conn: sqlite3.Connection, *, since: float | None, until: float | None = None, fmt: Literal["jsonl", "csv"] = "jsonl"
) -> Iterator[str]:
    """Lines (each ending in a newline) for the records with `since <= ts < until`, in idx
    order, streamed from the cursor. CSV starts with a header line."""
    if fmt not in ("jsonl", "csv"):
        raise ValueError(f"export format must be 'jsonl' or 'csv', got {fmt!r}")
    where, params = [], []
    if since is not None:
        where.append("a.ts >= ?")
        params.append(since)
    if until is not None:
        where.append("a.ts < ?")
        params.append(until)
    sql = f"SELECT {AuditRecord.JOINED}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY a.idx"
    if fmt == "csv":
        yield _csv_line(CSV_COLUMNS)
    cursor = conn.execute(sql, params)
    try:
        for row in cursor:
            record = AuditRecord.from_row(row)
            if fmt == "jsonl":
                yield json.dumps(record.to_dict(), ensure_ascii=False, separators=(",", ":")) + "\n"
            else:
                data = record.to_dict()
                data["body"] = row[5]  # the stored canonical JSON text
                data["content"] = row[8]
                yield _csv_line([data.get(col) for col in CSV_COLUMNS])
    finally:
        cursor.close()


def _csv_line(values: list[object]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(["" if v is None else (repr(v) if isinstance(v, float) else v) for v in values])
    return buf.getvalue()


def export_checkpoint(checkpoint: Checkpoint) -> str:
    """The checkpoint as a JSON document, for storage off the box."""
    return json.dumps(checkpoint.to_dict(), indent=2) + "\n"


def load_checkpoint(path: Path | str) -> Checkpoint:
    """Read a checkpoint file. Raises `AuditError` with a one-line reason if it is unreadable
    or malformed (the signature itself is checked by `verify`)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(_MAX_CHECKPOINT_FILE + 1)
    except OSError as exc:
        raise AuditError(f"{path}: cannot read the checkpoint file: {exc.strerror or exc}") from None
    if len(data) > _MAX_CHECKPOINT_FILE:
        raise AuditError(f"{path}: not a checkpoint file (larger than {_MAX_CHECKPOINT_FILE} bytes)")
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise AuditError(f"{path}: not a checkpoint file (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise AuditError(f"{path}: not a checkpoint file (invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    return checkpoint_from_dict(doc, source=str(path))


def checkpoint_from_dict(doc: object, *, source: str = "checkpoint") -> Checkpoint:
    """Validate a decoded checkpoint document. Raises `AuditError`."""
    if not isinstance(doc, dict):
        raise AuditError(f"{source}: not a checkpoint (expected a JSON object)")
    missing = [k for k in ("index", "hash", "time", "signature", "public_key") if k not in doc]
    if missing:
        raise AuditError(f"{source}: not a checkpoint (missing {', '.join(missing)})")
    index, time_ = doc["index"], doc["time"]
    if not isinstance(index, int) or isinstance(index, bool) or index < 1:
        raise AuditError(f"{source}: index must be a positive integer, got {index!r}")
    if not isinstance(time_, (int, float)) or isinstance(time_, bool) or not math.isfinite(time_):
        raise AuditError(f"{source}: time must be a number (seconds since the epoch), got {time_!r}")
    for key, length in _HEX.items():
        value = doc[key]
        if not isinstance(value, str) or not re.fullmatch(f"[0-9a-fA-F]{{{length}}}", value):
            raise AuditError(f"{source}: {key} must be {length} hex characters")
    return Checkpoint(index, doc["hash"].lower(), float(time_), doc["signature"].lower(), doc["public_key"].lower())
