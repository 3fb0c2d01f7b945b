"""The hash chain: what a record is, how its hash is computed, what a checkpoint signs.

A record is `(idx, ts, kind, key_id, team_id, body)`. Its hash is

    hash = sha256(bytes.fromhex(prev_hash) + canonical_bytes({"body": body, "idx": idx,
                  "key_id": key_id, "kind": kind, "team_id": team_id, "ts": ts})).hexdigest()

where `prev_hash` is the previous record's hash (record 1 uses `GENESIS_HASH`, 64 zeros, so 32
zero bytes), `ts` is a float (seconds since the epoch) and `key_id`/`team_id` are strings or
null. The `body` column holds `canonical_json(body)`; the `key_id` and `team_id` columns are
copies for queries, covered by the hash, so editing them breaks verification.

A checkpoint signs `canonical_bytes({"hash": hash, "index": index, "time": time})` with the
appliance's Ed25519 key: "the record at `index` had hash `hash` at `time`".
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

from appliance.audit.canonical import canonical_bytes, canonical_json, canonical_json_unchecked
from appliance.redaction import may_hold_key, scrub_keys

GENESIS_HASH = "0" * 64
KINDS = ("request", "admin", "security", "system")

# Values under these keys are never recorded, whatever they look like.
_SECRET_FIELDS = frozenset(
    {"secret", "key_hash", "previous_key_hash", "password", "api_key", "authorization", "server_secret"}
)

_SECRET_FIELD_NAMES = tuple(f'"{name}":' for name in _SECRET_FIELDS)  # as a field appears in canonical JSON


def scrub_secrets(value: Any) -> Any:
    """A copy of `value` with API-key-shaped substrings replaced by `[API_KEY]` and the values
    of secret-named fields (`secret`, `key_hash`, `password`, ...) by `[REDACTED]`.

    Defence in depth: callers must not put secrets in audit bodies in the first place.
    """
    if isinstance(value, str):
        return scrub_keys(value)
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        for key, item in value.items():
            clean_key = scrub_secrets(key) if isinstance(key, str) else key
            if isinstance(key, str) and key.lower() in _SECRET_FIELDS and item is not None:
                out[clean_key] = "[REDACTED]"
            else:
                out[clean_key] = scrub_secrets(item)
        return out
    if isinstance(value, (list, tuple)):
        return [scrub_secrets(item) for item in value]
    return value


def scrubbed_json(value: Any) -> str:
    """`canonical_json(scrub_secrets(value))`, encoded once when there is nothing to scrub (a
    record's usual case): the encoding holds every key and string of `value` as written, so
    when it has no key-shaped text and no secret-named field, scrubbing would change nothing.
    Raises `ValueError` as `canonical_json` does."""
    text = canonical_json(value)
    if not may_hold_key(text):
        lowered = text.lower()
        if not any(name in lowered for name in _SECRET_FIELD_NAMES):
            return text
    return canonical_json(scrub_secrets(value))


def record_encoding(idx: int, ts: float, kind: str, key_id: str | None, team_id: str | None, body_json: str) -> bytes:
    """The canonical bytes of a record whose body is already canonical JSON (`body_json`).

    Equal to `canonical_bytes({"idx": ..., "body": json.loads(body_json), ...})`, without
    re-encoding the body ("body" sorts first among the keys).
    """
    head = {"idx": idx, "key_id": key_id, "kind": kind, "team_id": team_id, "ts": ts}
    if (
        type(idx) is int
        and type(ts) is float
        and math.isfinite(ts)
        and type(kind) is str
        and (key_id is None or type(key_id) is str)
        and (team_id is None or type(team_id) is str)
    ):
        rest = canonical_json_unchecked(head)  # the common case: types checked above
    else:
        rest = canonical_json(head)
    return ('{"body":' + body_json + "," + rest[1:]).encode("utf-8")


def record_hash(prev_hash: str, idx: int, ts: float, kind: str, key_id: str | None, team_id: str | None, body_json: str) -> str:
    """sha256(prev hash bytes ‖ canonical record bytes), hex. Raises `ValueError` on a bad prev_hash."""
    digest = hashlib.sha256(bytes.fromhex(prev_hash))
    digest.update(record_encoding(idx, ts, kind, key_id, team_id, body_json))
    return digest.hexdigest()


def checkpoint_message(index: int, hash: str, time: float) -> bytes:
    """The bytes a checkpoint signature covers."""
    return canonical_bytes({"index": index, "hash": hash, "time": time})


def iso_time(ts: float) -> str:
    """`ts` as ISO-8601 UTC with microseconds, e.g. `2024-05-01T12:00:00.123456+00:00`."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One stored record."""

    idx: int
    ts: float
    kind: str
    key_id: str | None
    team_id: str | None
    body: dict[str, Any]
    prev_hash: str
    hash: str
    content: dict[str, str] | None = None  # kept text stored beside the body (audit.content)
    content_erased_at: float | None = None

    COLUMNS: ClassVar[str] = "idx, ts, kind, key_id, team_id, body, prev_hash, hash"
    # The same, with the kept text beside each record (`FROM audit a LEFT JOIN audit_content c`).
    JOINED: ClassVar[str] = (
        "a.idx, a.ts, a.kind, a.key_id, a.team_id, a.body, a.prev_hash, a.hash, c.content, c.erased_at"
        " FROM audit a LEFT JOIN audit_content c ON c.idx = a.idx"
    )

    @classmethod
    def from_row(cls, row: sqlite3.Row | tuple[Any, ...]) -> AuditRecord:
        idx, ts, kind, key_id, team_id, body, prev_hash, hash_, *extra = tuple(row)
        content, erased_at = extra if extra else (None, None)
        kept = json.loads(content) if content else None
        return cls(idx, ts, kind, key_id, team_id, json.loads(body), prev_hash, hash_, kept, erased_at)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: `ts` as ISO-8601 and `ts_epoch` as the exact float that was hashed.
        `content` (kept text) and `content_erased_at` appear only for records that have them."""
        out: dict[str, Any] = {
            "idx": self.idx,
            "ts": iso_time(self.ts),
            "ts_epoch": self.ts,
            "kind": self.kind,
            "key_id": self.key_id,
            "team_id": self.team_id,
            "body": self.body,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }
        if self.content is not None:
            out["content"] = self.content
        if self.content_erased_at is not None:
            out["content_erased_at"] = iso_time(self.content_erased_at)
        return out


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed statement that record `index` had hash `hash` at `time`.

    `signature` and `public_key` are hex (64-byte Ed25519 signature, 32-byte raw public key).
    `id` is the row number in `audit_checkpoints` (None for one loaded from a file).
    """

    index: int
    hash: str
    time: float
    signature: str
    public_key: str
    id: int | None = None

    COLUMNS: ClassVar[str] = "record_idx, record_hash, ts, signature, public_key, idx"

    @classmethod
    def from_row(cls, row: sqlite3.Row | tuple[Any, ...]) -> Checkpoint:
        index, hash_, time, signature, public_key, id_ = tuple(row)
        return cls(index, hash_, time, signature, public_key, id_)

    @property
    def message(self) -> bytes:
        return checkpoint_message(self.index, self.hash, self.time)

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "hash": self.hash, "time": self.time, "signature": self.signature, "public_key": self.public_key}
