"""Fixtures for the metering tests: a real, migrated SQLite store in a temporary directory."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "appliance.db").open()
    yield s
    s.close()


@pytest.fixture
def add_key(store: Store) -> Callable[..., str]:
    """Insert an API key row directly (the key service is not under test here)."""

    def add(key_id: str, team_id: str = "default", *, rpm: int | None = None, tpm: int | None = None) -> str:
        def insert(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO api_keys (id, name, role, key_hash, created_at, team_id, rpm, tpm)"
                " VALUES (?, ?, 'user', ?, ?, ?, ?, ?)",
                (key_id, f"key {key_id}", "0" * 64, time.time(), team_id, rpm, tpm),
            )

        store.write_sync(insert)
        return key_id

    return add
