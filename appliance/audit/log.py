"""The append-only audit log: hash-chained records written through the store's group commits,
with Ed25519-signed checkpoints every N records and every T seconds.

Record bodies are built by the caller. Expected keys:

Request record (`kind="request"`, one per API request, see `RequestBody`):
    request_id    str, the id returned to the client
    principal     {"key_id", "key_name", "team", "role"}
    route         "POST /v1/chat/completions"
    models_tried  [str], in the order tried (the fallback trail)
    model         str | None, the model that served the request
    outcome       "ok" | "error" | "cancelled"
    status        int, the HTTP status
    tokens        {"prompt": int, "completion": int, "cached": int}
    cost          float
    latency_ms    float
    client        str, the client address
    user          str | None, the OpenAI `user` field
    prompt        `retention.retain(policy, text)`; absent when the policy is "none"
    error         str, the error code, only when outcome != "ok"

    weights       {"encoding", "sha256", "adapter_sha256"}: the exact files that served it
    plugins       {plugin: {...}}: what plugins noted (counts, rule names; never matched text)
    guardrails    {plugin: "passed" | "reject: <rule>" | "rewrote: <rule>" | "not run: <why>"}

Kept text (a prompt under the `redacted` or `full` policy) is not in the body: the body holds
its digest, and the text is stored beside the record in `audit_content` (see `retention`),
where `appliance audit erase` can remove it without breaking the chain.

Admin record (`kind="admin"`, one per administrative change, written in the same transaction
as the change itself, see `Actor` and `admin_fn`):
    request_id    str | None, the API request that made it
    actor         {"key_id", "key_name", "role"} for an API caller,
                  {"kind": "cli", "user": <OS user>} for the CLI on the database (`cli_actor()`),
                  {"kind": "local", "uid": N, "user": ...} over the local admin socket
    action        "keys.create", "keys.revoke", "teams.update", ...
    target        str | None, the id of what was changed
    before/after  dict | None, the changed fields; never secrets
    client        str | None, the client address

Security record (`kind="security"`): counted failed authentication per client address and
reason over a window (`appliance.auth.failures`), never one record per attempt.

System record (`kind="system"`): what the appliance itself did or saw, such as a plugin that
was refused at load or failed in a hook (`event`: "plugin.refused", "plugin.failed", with
`plugin`, `hook`, `reason` and whether it `fails` "open" or "closed").

Secrets never enter a record: `append_fn` replaces API-key-shaped strings (`apl_...`, `sk-...`)
and secret-named fields anywhere in the body (`chain.scrub_secrets`).
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import math
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

from appliance.audit.chain import (
    GENESIS_HASH,
    KINDS,
    AuditRecord,
    Checkpoint,
    record_hash,
    scrub_secrets,
    scrubbed_json,
)
from appliance.audit.signing import Signer, load_or_create_signing_key
from appliance.config import Settings
from appliance.errors import AuditUnavailable, InvalidRequest, StoreError
from appliance.store import Store

log = logging.getLogger(__name__)

MAX_QUERY_LIMIT = 10_000


class PrincipalInfo(TypedDict):
    key_id: str
    key_name: str
    team: str
    role: str


class TokenCounts(TypedDict):
    prompt: int
    completion: int
    cached: int


class RequestBody(TypedDict, total=False):
    request_id: str
    principal: PrincipalInfo
    route: str
    models_tried: list[str]
    model: str | None
    outcome: Literal["ok", "error", "cancelled"]
    status: int
    tokens: TokenCounts
    cost: float
    latency_ms: float
    client: str
    user: str | None
    prompt: dict[str, str]
    error: str
    weights: dict[str, str]
    plugins: dict[str, Any]
    guardrails: dict[str, str]


class AdminBody(TypedDict):
    request_id: str | None
    actor: dict[str, Any]
    action: str
    target: str | None
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    client: str | None


@dataclass(frozen=True, slots=True)
class Actor:
    """Who makes an administrative change, as its audit record names them. `key_id` and
    `team_id` fill the record's columns (an API caller's key and team)."""

    info: dict[str, Any]
    request_id: str | None = None
    client: str | None = None
    key_id: str | None = None
    team_id: str | None = None


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def cli_actor() -> Actor:
    """The actor of a CLI action on the database by the local administrator."""
    return Actor({"kind": "cli", "user": _os_user()})


def admin_body(
    actor: Actor, action: str, target: str | None, *, before: dict[str, Any] | None = None, after: dict[str, Any] | None = None
) -> AdminBody:
    return {
        "request_id": actor.request_id,
        "actor": actor.info,
        "action": action,
        "target": target,
        "before": before,
        "after": after,
        "client": actor.client,
    }


class AuditLog:
    """Appends records and writes checkpoints through `store`; signs with `signer`.

    The chain tail is always read from the database inside the writing transaction, never
    cached, so a rolled-back savepoint in a group commit cannot desynchronise the chain.
    """

    def __init__(
        self,
        store: Store,
        signer: Signer,
        *,
        checkpoint_every_records: int = 1000,
        checkpoint_every_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if checkpoint_every_records < 1 or not checkpoint_every_seconds > 0:
            raise ValueError("checkpoint intervals must be positive")
        self.store = store
        self.signer = signer
        self.checkpoint_every_records = int(checkpoint_every_records)
        self.checkpoint_every_seconds = float(checkpoint_every_seconds)
        self.clock = clock
        # Called with each record once it is committed (plugins' on_audit_event); quick only.
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    @classmethod
    def from_settings(cls, store: Store, settings: Settings) -> AuditLog:
        """The log for a data directory: its signing key and `[audit]` intervals."""
        return cls(
            store,
            load_or_create_signing_key(settings.paths.keys),
            checkpoint_every_records=settings.audit.checkpoint_every_records,
            checkpoint_every_seconds=settings.audit.checkpoint_every_seconds,
        )

    # -- appending --------------------------------------------------------------------------
    def append_fn(
        self,
        kind: str,
        body: dict[str, Any],
        *,
        key_id: str | None,
        team_id: str | None,
        ts: float | None = None,
        content: dict[str, str] | None = None,
    ) -> Callable[[sqlite3.Connection], int]:
        """A write function for the store's writer thread that appends one record and returns
        its idx. Combine it with other writes to commit them atomically, e.g.
        `await store.write(lambda conn: (usage_fn(conn), audit_fn(conn)))`.

        The body is scrubbed of secrets and encoded here, in the caller, so a body that cannot
        be encoded (NaN, non-string keys...) raises `ValueError` at once. `ts` defaults to the
        clock when the record is written. `content` is kept text by field (`{"prompt": ...}`),
        stored beside the record; the body must already hold each field's digest.
        """
        if kind not in KINDS:
            raise ValueError(f"audit record kind must be one of {list(KINDS)}, got {kind!r}")
        if not isinstance(body, dict):
            raise ValueError("an audit record body must be a dict")
        body_json = scrubbed_json(body)
        key_id = scrub_secrets(key_id)
        team_id = scrub_secrets(team_id)
        if ts is not None and not math.isfinite(ts):
            raise ValueError(f"audit record ts must be finite, got {ts!r}")
        content_json = scrubbed_json(content) if content else None

        def write(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT idx, hash FROM audit ORDER BY idx DESC LIMIT 1").fetchone()
            idx, prev = (row[0] + 1, row[1]) if row else (1, GENESIS_HASH)
            when = float(self.clock() if ts is None else ts)
            digest = record_hash(prev, idx, when, kind, key_id, team_id, body_json)
            conn.execute(
                "INSERT INTO audit (idx, ts, kind, key_id, team_id, body, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (idx, when, kind, key_id, team_id, body_json, prev, digest),
            )
            if content_json is not None:
                conn.execute("INSERT INTO audit_content (idx, content) VALUES (?, ?)", (idx, content_json))
            if idx % self.checkpoint_every_records == 0:
                self._insert_checkpoint(conn, idx, digest)
            if self.listeners:
                event = {"idx": idx, "ts": when, "kind": kind, "key_id": key_id, "team_id": team_id, "body": body_json}
                self.store.after_commit(lambda: self._tell(event))
            return idx

        return write

    def _tell(self, event: dict[str, Any]) -> None:
        for listener in self.listeners:
            listener(event)

    def admin_fn(
        self, actor: Actor, action: str, target: str | None, *, before: Any = None, after: Any = None
    ) -> Callable[[sqlite3.Connection], int]:
        """`append_fn` for the admin record of one change; run it in the change's own
        transaction, so that neither exists without the other."""
        body = admin_body(actor, action, target, before=before, after=after)
        return self.append_fn("admin", dict(body), key_id=actor.key_id, team_id=actor.team_id)

    async def append(self, kind: str, body: dict[str, Any], *, key_id: str | None, team_id: str | None) -> int:
        """Append one record; returns its idx once it is durable. Raises `AuditUnavailable`
        (503, fail closed) if it cannot be committed."""
        fn = self.append_fn(kind, body, key_id=key_id, team_id=team_id)
        try:
            return await self.store.write(fn)
        except StoreError as exc:
            raise AuditUnavailable(f"the audit record could not be written: {exc.message}") from exc

    def append_sync(self, kind: str, body: dict[str, Any], *, key_id: str | None, team_id: str | None) -> int:
        fn = self.append_fn(kind, body, key_id=key_id, team_id=team_id)
        try:
            return self.store.write_sync(fn)
        except StoreError as exc:
            raise AuditUnavailable(f"the audit record could not be written: {exc.message}") from exc

    # -- checkpoints ------------------------------------------------------------------------
    def _insert_checkpoint(self, conn: sqlite3.Connection, index: int, digest: str) -> Checkpoint:
        now = float(self.clock())
        signature = self.signer.sign_checkpoint(index, digest, now)
        cur = conn.execute(
            "INSERT INTO audit_checkpoints (ts, record_idx, record_hash, signature, public_key) VALUES (?, ?, ?, ?, ?)",
            (now, index, digest, signature, self.signer.public_key_hex),
        )
        return Checkpoint(index, digest, now, signature, self.signer.public_key_hex, cur.lastrowid)

    def _due(self, conn: sqlite3.Connection, force: bool) -> tuple[int, str] | None:
        """The tail to checkpoint, if a checkpoint is due."""
        tail = conn.execute("SELECT idx, hash FROM audit ORDER BY idx DESC LIMIT 1").fetchone()
        if tail is None:
            return None
        last = conn.execute("SELECT record_idx, ts FROM audit_checkpoints ORDER BY record_idx DESC, idx DESC LIMIT 1").fetchone()
        covered, since = (last[0], last[1]) if last else (0, None)
        if tail[0] <= covered:
            return None
        if not force:
            if since is None:  # never checkpointed: measure from the first record
                first = conn.execute("SELECT ts FROM audit ORDER BY idx LIMIT 1").fetchone()
                since = first[0]
            if self.clock() - since < self.checkpoint_every_seconds:
                return None
        return int(tail[0]), str(tail[1])

    def _checkpoint_fn(self, *, force: bool, always: bool) -> Callable[[sqlite3.Connection], Checkpoint | None]:
        def write(conn: sqlite3.Connection) -> Checkpoint | None:
            if always:
                tail = conn.execute("SELECT idx, hash FROM audit ORDER BY idx DESC LIMIT 1").fetchone()
                due = (int(tail[0]), str(tail[1])) if tail else None
            else:
                due = self._due(conn, force)
            return self._insert_checkpoint(conn, *due) if due else None

        return write

    async def checkpoint_if_due(self, *, force: bool = False) -> Checkpoint | None:
        """Sign the tail if records were added since the last checkpoint and
        `checkpoint_every_seconds` have passed since it (or since the first record, if there is
        none yet). `force` skips the time condition (for example at shutdown)."""
        if not force and self._due(self.store.reader(), force) is None:  # cheap pre-check, no write job
            return None
        return await self.store.write(self._checkpoint_fn(force=force, always=False))

    async def checkpoint(self) -> Checkpoint | None:
        """Sign the current tail now, even if already covered; None if the log is empty."""
        return await self.store.write(self._checkpoint_fn(force=True, always=True))

    def checkpoint_sync(self) -> Checkpoint | None:
        return self.store.write_sync(self._checkpoint_fn(force=True, always=True))

    def checkpoint_if_due_sync(self, *, force: bool = False) -> Checkpoint | None:
        return self.store.write_sync(self._checkpoint_fn(force=force, always=False))

    async def run_periodic_checkpoints(self, poll_seconds: float | None = None) -> None:
        """Run forever (until cancelled), writing a checkpoint whenever one is due. Errors are
        logged and retried at the next poll."""
        poll = poll_seconds if poll_seconds is not None else max(0.01, min(self.checkpoint_every_seconds / 4, 5.0))
        while True:
            await asyncio.sleep(poll)
            try:
                checkpoint = await self.checkpoint_if_due()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("writing the periodic audit checkpoint failed; retrying in %.1fs", poll)
            else:
                if checkpoint is not None:
                    log.debug("audit checkpoint at record %d", checkpoint.index)

    def latest_checkpoint(self) -> Checkpoint | None:
        row = self.store.query_one(f"SELECT {Checkpoint.COLUMNS} FROM audit_checkpoints ORDER BY record_idx DESC, idx DESC LIMIT 1")
        return Checkpoint.from_row(row) if row else None

    # -- reading ----------------------------------------------------------------------------
    def query(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        key_id: str | None = None,
        team_id: str | None = None,
        kind: str | None = None,
        limit: int = 100,
        after_idx: int | None = None,
    ) -> list[AuditRecord]:
        """Records in idx order matching every given filter: `since <= ts < until`, and
        `idx > after_idx` for paging (pass the last idx of the previous page)."""
        if not 1 <= limit <= MAX_QUERY_LIMIT:
            raise InvalidRequest(f"limit must be between 1 and {MAX_QUERY_LIMIT}", param="limit")
        if kind is not None and kind not in KINDS:
            raise InvalidRequest(f"kind must be one of {list(KINDS)}", param="kind")
        where, params = [], []
        for clause, value in (
            ("a.ts >= ?", since),
            ("a.ts < ?", until),
            ("a.key_id = ?", key_id),
            ("a.team_id = ?", team_id),
            ("a.kind = ?", kind),
            ("a.idx > ?", after_idx),
        ):
            if value is not None:
                where.append(clause)
                params.append(value)
        sql = f"SELECT {AuditRecord.JOINED}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY a.idx LIMIT ?"
        return [AuditRecord.from_row(row) for row in self.store.query(sql, (*params, limit))]
