"""Pins: the models the pool never unloads for idleness nor evicts, kept in the `model_pins`
table so that they survive a restart, each change written with its admin audit record.

A model without a row follows the default: the default model (the first registered) is
pinned, so that an idle box stays ready; every other model is not."""

from __future__ import annotations

import sqlite3
import time

from appliance.audit.log import Actor, AuditLog
from appliance.model_registry import ModelRegistry
from appliance.store import Store

__all__ = ["Pins", "default_model"]


def default_model(models: ModelRegistry) -> str | None:
    """The default model: the first registered (`appliance init --model` registers it)."""
    first = models.list()[:1]
    return first[0].name if first else None


class Pins:
    def __init__(self, store: Store, audit: AuditLog) -> None:
        self._store = store
        self._audit = audit
        self._rows: dict[str, bool] | None = None

    def explicit(self) -> dict[str, bool]:
        """The models an admin pinned or unpinned, and how."""
        if self._rows is None:
            self._rows = {r["name"]: bool(r["pinned"]) for r in self._store.query("SELECT name, pinned FROM model_pins")}
        return self._rows

    def pinned(self, name: str, *, default: str | None) -> bool:
        return self.explicit().get(name, name == default)

    def set(self, name: str, pinned: bool, *, default: str | None, actor: Actor) -> bool:
        """Pin or unpin `name`; audited (`models.pin` / `models.unpin`) with its before and
        after. Returns whether it was pinned before."""
        before = self.pinned(name, default=default)
        audit = self._audit.admin_fn(
            actor, "models.pin" if pinned else "models.unpin", name, before={"pinned": before}, after={"pinned": pinned}
        )

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO model_pins (name, pinned, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET pinned = excluded.pinned, updated_at = excluded.updated_at",
                (name, int(pinned), time.time()),
            )
            audit(conn)

        self._store.write_sync(write)
        self._rows = None
        return before
