"""Tests of the audit log, with helpers shared by its modules (a package, so its module names
do not collide with same-named test files elsewhere)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.audit import AuditLog, load_or_create_signing_key
from appliance.store import Store


def open_log(
    tmp_path: Path, *, every: int = 1000, seconds: float = 60.0, clock: Callable[[], float] = time.time
) -> tuple[Store, AuditLog]:
    """A store in `tmp_path/appliance.db` (not yet open: use `with store:`) and a log signing
    with `tmp_path/keys`."""
    store = Store(tmp_path / "appliance.db", backups_dir=tmp_path / "backups")
    signer = load_or_create_signing_key(tmp_path / "keys")
    return store, AuditLog(store, signer, checkpoint_every_records=every, checkpoint_every_seconds=seconds, clock=clock)


def request_body(i: int, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "request_id": f"req-{i}",
        "principal": {"key_id": "0123456789ab", "key_name": "staff-app", "team": "default", "role": "user"},
        "route": "POST /v1/chat/completions",
        "models_tried": ["smollm2-135m-instruct"],
        "model": "smollm2-135m-instruct",
        "outcome": "ok",
        "status": 200,
        "tokens": {"prompt": 10 + i, "completion": 5, "cached": 0},
        "cost": 0.0001 * i,
        "latency_ms": 12.5,
        "client": "127.0.0.1",
        "user": None,
        "prompt": {"sha256": "ab" * 32},
    }
    body.update(extra)
    return body


def fill(log: AuditLog, n: int, *, start_ts: float | None = None) -> list[int]:
    """Append `n` request records in one group job; with `start_ts`, record i gets ts start_ts + i."""
    fns = [
        log.append_fn(
            "request",
            request_body(i),
            key_id="0123456789ab" if i % 2 else "fedcba987654",
            team_id="default" if i % 3 else "research",
            ts=None if start_ts is None else start_ts + i,
        )
        for i in range(n)
    ]
    return log.store.write_sync(lambda conn: [fn(conn) for fn in fns])


def connect(path: Path) -> sqlite3.Connection:
    """A plain autocommit connection, as an attacker with file access would use."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA busy_timeout=5000")
    return conn
