"""Numbered, forward-only schema migrations. The database is backed up before each one, and a
database written by a newer version is refused without being touched."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from appliance.errors import SchemaTooNewError, StoreError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    apply: Callable[[sqlite_utils.Database], None]


MIGRATIONS: list[Migration] = []


def migration(version: int) -> Callable[[Callable[[sqlite_utils.Database], None]], Callable[[sqlite_utils.Database], None]]:
    def register(fn: Callable[[sqlite_utils.Database], None]) -> Callable[[sqlite_utils.Database], None]:
        assert version == len(MIGRATIONS) + 1, "migrations are numbered in order"
        MIGRATIONS.append(Migration(version, fn.__name__, fn))
        return fn

    return register


@migration(1)
def m001_keys_models_settings(db: sqlite_utils.Database) -> None:
    db["settings"].create({"key": str, "value": str}, pk="key")
    db["api_keys"].create(
        {
            "id": str,
            "name": str,
            "role": str,
            "key_hash": str,
            "allowed_models": str,  # JSON list, NULL means every model
            "created_at": float,
            "expires_at": float,
            "revoked_at": float,
        },
        pk="id",
        not_null={"name", "role", "key_hash", "created_at"},
    )
    db["models"].create(
        {
            "name": str,
            "path": str,
            "sha256": str,
            "size_bytes": int,
            "architecture": str,
            "parameter_count": int,
            "quantization": str,
            "context_length": int,
            "block_count": int,
            "has_chat_template": int,
            "added_at": float,
        },
        pk="name",
        not_null={"path", "sha256", "size_bytes", "added_at"},
    )
    db["models"].create_index(["sha256"])


@migration(2)
def m002_governance(db: sqlite_utils.Database) -> None:
    """Teams, audit chain and checkpoints, usage records, budgets and the spend ledger."""
    db["teams"].create(
        {"id": str, "name": str, "prompt_retention": str, "created_at": float},
        pk="id",
        not_null={"name", "created_at"},
    )
    db["teams"].create_index(["name"], unique=True)
    db.execute("INSERT INTO teams (id, name, prompt_retention, created_at) VALUES ('default', 'default', NULL, 0)")
    db.execute("ALTER TABLE api_keys ADD COLUMN team_id TEXT NOT NULL DEFAULT 'default' REFERENCES teams(id)")
    db.execute("ALTER TABLE api_keys ADD COLUMN prompt_retention TEXT")  # none|sha256|redacted|full; NULL: the team's
    db.execute("ALTER TABLE api_keys ADD COLUMN rpm INTEGER")
    db.execute("ALTER TABLE api_keys ADD COLUMN tpm INTEGER")
    db["audit"].create(
        {
            "idx": int,  # 1, 2, 3... with no gaps
            "ts": float,
            "kind": str,  # request | admin
            "key_id": str,
            "team_id": str,
            "body": str,  # canonical JSON of the record
            "prev_hash": str,
            "hash": str,
        },
        pk="idx",
        not_null={"ts", "kind", "body", "prev_hash", "hash"},
    )
    db["audit"].create_index(["ts"])
    db["audit"].create_index(["key_id", "ts"])
    db["audit_checkpoints"].create(
        {"idx": int, "ts": float, "record_idx": int, "record_hash": str, "signature": str, "public_key": str},
        pk="idx",
        not_null={"ts", "record_idx", "record_hash", "signature", "public_key"},
    )
    db["usage"].create(
        {
            "id": int,
            "request_id": str,
            "ts": float,
            "day": str,  # YYYY-MM-DD, UTC
            "key_id": str,
            "team_id": str,
            "model": str,
            "status": int,
            "prompt_tokens": int,
            "completion_tokens": int,
            "cached_tokens": int,
            "queue_ms": float,
            "compute_ms": float,
            "energy_j": float,
            "cost": float,  # billed: min(measured, reserved); this is what budgets count
            "unbilled_cost": float,  # measured cost above the reservation, recorded, never billed
            "unbilled_tokens": int,  # tokens above the reservation, recorded, never billed
        },
        pk="id",
        not_null={"ts", "day", "key_id", "team_id"},
    )
    db["usage"].create_index(["key_id", "day"])
    db["usage"].create_index(["team_id", "day"])
    db["usage"].create_index(["day", "model"])
    db["budgets"].create(
        {
            "id": int,
            "scope": str,  # key | team
            "scope_id": str,
            "unit": str,  # money | tokens
            "amount": float,
            "period": str,  # day | month | total
            "created_at": float,
        },
        pk="id",
        not_null={"scope", "scope_id", "unit", "amount", "period", "created_at"},
    )
    db["budgets"].create_index(["scope", "scope_id", "unit", "period"], unique=True)


@migration(3)
def m003_key_rotation_and_audit_content(db: sqlite_utils.Database) -> None:
    """Key rotation (the previous secret's hash, valid until a time), and prompt content kept
    apart from the hashed audit body, so that it can be erased without breaking the chain."""
    db.execute("ALTER TABLE api_keys ADD COLUMN previous_key_hash TEXT")
    db.execute("ALTER TABLE api_keys ADD COLUMN previous_valid_until REAL")
    db.execute("ALTER TABLE api_keys ADD COLUMN rotated_at REAL")
    db["audit_content"].create(
        {
            "idx": int,  # the audit record this belongs to
            "content": str,  # canonical JSON of what retention kept; NULL once erased
            "erased_at": float,
            "erased_by": int,  # idx of the audit record of the erasure
        },
        pk="idx",
        foreign_keys=[("idx", "audit", "idx")],
    )


@migration(4)
def m004_routes_and_upstreams(db: sqlite_utils.Database) -> None:
    """Routes (virtual models: a strategy and ordered candidates, as JSON) and remote
    upstreams (an OpenAI-compatible base URL and its API key, encrypted with the data
    directory's Fernet key; the key is never stored in clear)."""
    db["routes"].create(
        {"name": str, "spec": str, "created_at": float, "updated_at": float},
        pk="name",
        not_null={"spec", "created_at", "updated_at"},
    )
    db["upstreams"].create(
        {
            "name": str,
            "base_url": str,
            "api_key_enc": str,  # Fernet token of the key; NULL for an upstream that needs none
            "models": str,  # JSON list of the model names it serves
            "prompt_price_per_1k": float,
            "completion_price_per_1k": float,
            "timeout_seconds": float,
            "max_retries": int,
            "created_at": float,
            "updated_at": float,
        },
        pk="name",
        not_null={"base_url", "models", "created_at", "updated_at"},
    )


@migration(5)
def m005_model_pins(db: sqlite_utils.Database) -> None:
    """Which models the pool keeps loaded whatever their idle time (`appliance models pin`).
    A model without a row follows the default: the first registered model is pinned."""
    db["model_pins"].create({"name": str, "pinned": int, "updated_at": float}, pk="name", not_null={"pinned", "updated_at"})


@migration(6)
def m006_checks_alerts_feedback(db: sqlite_utils.Database) -> None:
    """Scheduled checks and their history, per-check state (rolling baselines, cursors),
    alerts and their deliveries, user feedback on responses, golden-set runs and baselines,
    drift baselines, and answer retention beside prompt retention."""
    db["check_runs"].create(
        {
            "id": int,
            "check_name": str,
            "trigger": str,  # schedule | manual
            "started_at": float,
            "duration_ms": float,
            "cpu_seconds": float,  # of the process while it ran (threads included)
            "status": str,  # ok | warn | fail | error
            "summary": str,
            "findings": str,  # JSON list of {subject, status, summary, details}
        },
        pk="id",
        not_null={"check_name", "trigger", "started_at", "status"},
    )
    db["check_runs"].create_index(["check_name", "started_at"])
    db["check_state"].create(
        {"check_name": str, "subject": str, "state": str, "updated_at": float},
        pk=("check_name", "subject"),
        not_null={"state", "updated_at"},
    )
    db["alerts"].create(
        {
            "id": int,
            "rule": str,
            "check_name": str,
            "subject": str,
            "severity": str,  # warn | fail
            "state": str,  # open | resolved
            "summary": str,
            "details": str,  # JSON
            "opened_at": float,
            "last_sent_at": float,
            "resolved_at": float,
            "sends": int,
        },
        pk="id",
        not_null={"rule", "check_name", "subject", "severity", "state", "opened_at"},
    )
    db.execute("CREATE UNIQUE INDEX alerts_one_open ON alerts (rule, check_name, subject) WHERE state = 'open'")
    db["alert_deliveries"].create(
        {"id": int, "alert_id": int, "channel": str, "event": str, "ts": float, "ok": int, "error": str},
        pk="id",
        not_null={"alert_id", "channel", "event", "ts", "ok"},
    )
    db["alert_deliveries"].create_index(["channel", "ts"])
    # A response's own id (chatcmpl-..., cmpl-...) to its audit record, written with it.
    db["audit_responses"].create({"response_id": str, "idx": int}, pk="response_id", not_null={"idx"})
    db["feedback"].create(
        {
            "id": str,
            "response_id": str,
            "request_idx": int,  # the audit record of the request it is about
            "key_id": str,  # who gave it
            "team_id": str,
            "model": str,
            "rating": str,  # up | down | 1..5
            "score": float,  # 0..1: down 0, up 1, n stars (n-1)/4
            "correction": str,
            "comment": str,
            "created_at": float,
            "audit_idx": int,  # the audit record of the feedback itself
            "promoted_to": str,  # golden set it became a case of
        },
        pk="id",
        not_null={"response_id", "request_idx", "rating", "score", "created_at"},
    )
    db["feedback"].create_index(["response_id"])
    db["feedback"].create_index(["model", "created_at"])
    db["golden_runs"].create(
        {
            "id": int,
            "set_name": str,
            "target": str,  # the model or route scored
            "trigger": str,
            "started_at": float,
            "duration_ms": float,
            "total": int,
            "passed": int,
            "pass_rate": float,
            "mean_similarity": float,
            "baseline": int,  # 1: this run set the baseline
            "results": str,  # JSON list, one per case
        },
        pk="id",
        not_null={"set_name", "target", "started_at", "total", "passed"},
    )
    db["golden_runs"].create_index(["set_name", "target", "started_at"])
    db["golden_baselines"].create(
        {"set_name": str, "case_id": str, "target": str, "answer": str, "embedding": str, "created_at": float},
        pk=("set_name", "case_id", "target"),
        not_null={"answer", "created_at"},
    )
    db["drift_baselines"].create(
        {"kind": str, "window_start": float, "window_end": float, "summary": str, "created_at": float},
        pk="kind",
        not_null={"summary", "created_at"},
    )
    db.execute("ALTER TABLE api_keys ADD COLUMN answer_retention TEXT")  # none|sha256|redacted|full; NULL: the team's
    db.execute("ALTER TABLE teams ADD COLUMN answer_retention TEXT")  # NULL: [audit] default_answer_retention


def latest_version() -> int:
    return len(MIGRATIONS)


def schema_version(conn: sqlite3.Connection) -> int:
    has_table = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='migrations'").fetchone()
    if not has_table:
        return 0
    row = conn.execute("SELECT MAX(version) FROM migrations").fetchone()
    return int(row[0] or 0)


def migrate(path: Path, *, backups_dir: Path | None = None, target: int | None = None) -> int:
    """Bring the database at `path` up to `target` (default: latest). Returns the new version."""
    latest = latest_version()
    target = latest if target is None else target
    current = _peek_version(path)
    if current > latest:
        raise SchemaTooNewError(
            f"{path} has schema version {current}, but this appliance only knows up to {latest}: "
            "it was written by a newer version. Upgrade the appliance, or restore a backup from "
            "the backups/ directory. The database was not modified."
        )
    if current >= target:
        return current
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=10000")
        db = sqlite_utils.Database(conn)
        for step in MIGRATIONS[current:target]:
            if current > 0 and backups_dir is not None:
                _backup(conn, backups_dir, current)
            log.info("applying migration %03d %s", step.version, step.name)
            conn.execute("BEGIN IMMEDIATE")
            try:
                if step.version == 1:
                    db["migrations"].create({"version": int, "name": str, "applied_at": float}, pk="version")
                step.apply(db)
                conn.execute(
                    "INSERT INTO migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (step.version, step.name, time.time()),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            current = step.version
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path}: migration to version {current + 1} failed: {exc}") from None
    finally:
        conn.close()
    return current


def _peek_version(path: Path) -> int:
    """Read the schema version without writing anything (not even the WAL switch)."""
    if not path.exists() or path.stat().st_size == 0:
        return 0
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return schema_version(conn)
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path}: not a usable appliance database: {exc}") from None


def _backup(conn: sqlite3.Connection, backups_dir: Path, version: int) -> Path:
    backups_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    dest = backups_dir / f"appliance-v{version}-{stamp}-{time.time_ns() % 1_000_000:06d}.db"
    target = sqlite3.connect(dest)
    try:
        conn.backup(target)
    finally:
        target.close()
    log.info("backed up the database to %s before migrating", dest)
    return dest
