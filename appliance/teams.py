"""Teams: groups of keys that share budgets and default prompt- and answer-retention policies.

A team's id is the slug of its name (`Research Lab` -> `research-lab`). The `default` team
exists from the start (migration 2) and cannot be deleted.
"""

from __future__ import annotations

import re
import sqlite3
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from appliance.audit.log import Actor, AuditLog
from appliance.auth.keys import UNSET
from appliance.config import RETENTION_POLICIES
from appliance.errors import Conflict, InvalidRequest, NotFound
from appliance.store import Store

__all__ = ["DEFAULT_TEAM", "Team", "TeamService", "slugify"]

DEFAULT_TEAM = "default"


def slugify(name: str) -> str:
    """Lower-case ASCII letters, digits and single dashes."""
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


@dataclass(frozen=True, slots=True)
class Team:
    id: str
    name: str
    prompt_retention: str | None  # None: the appliance default (audit.default_prompt_retention)
    created_at: float
    key_count: int = 0
    answer_retention: str | None = None  # None: the appliance default (audit.default_answer_retention)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "prompt_retention": self.prompt_retention,
            "answer_retention": self.answer_retention,
            "created_at": datetime.fromtimestamp(self.created_at, tz=UTC).isoformat(timespec="seconds"),
            "keys": self.key_count,
        }


_SELECT = (
    "SELECT t.id, t.name, t.prompt_retention, t.answer_retention, t.created_at,"
    " (SELECT COUNT(*) FROM api_keys k WHERE k.team_id = t.id) AS key_count FROM teams t"
)


class TeamService:
    """Teams; each change is written with its admin audit record, in one transaction."""

    def __init__(self, store: Store, audit: AuditLog | None = None) -> None:
        self._store = store
        self._audit = audit  # None: read-only use (budgets look teams up)

    def _admin_fn(self, actor: Actor, action: str, target: str, **change: Any) -> Callable[[sqlite3.Connection], int]:
        if self._audit is None:
            raise RuntimeError("this TeamService was built without an audit log and cannot change teams")
        return self._audit.admin_fn(actor, action, target, **change)

    def create(
        self, name: str, prompt_retention: str | None = None, *, answer_retention: str | None = None, actor: Actor
    ) -> Team:
        name = name.strip()
        if not name or len(name) > 100:
            raise InvalidRequest("team name must be 1 to 100 characters", param="name")
        team_id = slugify(name)
        if not team_id:
            raise InvalidRequest(f"team name {name!r} needs at least one letter or digit", param="name")
        _check_retention(prompt_retention=prompt_retention, answer_retention=answer_retention)
        row = {
            "id": team_id,
            "name": name,
            "prompt_retention": prompt_retention,
            "answer_retention": answer_retention,
            "created_at": time.time(),
        }
        audit = self._admin_fn(actor, "teams.create", team_id, after=Team(**row).to_dict())

        def insert(conn: sqlite3.Connection) -> None:
            clash = conn.execute("SELECT id FROM teams WHERE id = :id OR name = :name", row).fetchone()
            if clash is not None:
                raise Conflict(f"team {team_id!r} already exists")
            conn.execute(
                "INSERT INTO teams (id, name, prompt_retention, answer_retention, created_at)"
                " VALUES (:id, :name, :prompt_retention, :answer_retention, :created_at)",
                row,
            )
            audit(conn)

        self._store.write_sync(insert)
        return self.get(team_id)

    def list(self) -> list[Team]:
        return [_team(r) for r in self._store.query(_SELECT + " ORDER BY t.id")]

    def get(self, id_or_name: str) -> Team:
        """Find a team by id or by exact name."""
        row = self._store.query_one(_SELECT + " WHERE t.id = ? OR t.name = ? ORDER BY t.id = ? DESC", (id_or_name, id_or_name, id_or_name))
        if row is None:
            raise NotFound(f"No team {id_or_name!r}.")
        return _team(row)

    def set_retention(
        self,
        id_or_name: str,
        prompt_retention: str | None = UNSET,
        *,
        answer_retention: str | None = UNSET,
        actor: Actor,
    ) -> Team:
        """Change the team's prompt- or answer-retention policy (None: the appliance default);
        a policy not given stays as it is."""
        changes = {
            column: policy
            for column, policy in (("prompt_retention", prompt_retention), ("answer_retention", answer_retention))
            if policy is not UNSET
        }
        _check_retention(**changes)
        team = self.get(id_or_name)
        if not changes:
            return team
        after = replace(team, **changes)
        audit = self._admin_fn(actor, "teams.update", team.id, before=team.to_dict(), after=after.to_dict())
        assignments = ", ".join(f"{column} = :{column}" for column in changes)

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(f"UPDATE teams SET {assignments} WHERE id = :id", changes | {"id": team.id})
            audit(conn)

        self._store.write_sync(write)
        return self.get(team.id)

    def delete(self, id_or_name: str, *, actor: Actor) -> Team:
        """Delete an empty team and its budgets; refuse with `Conflict` while keys belong to it.

        Past usage rows keep the team id, so reports stay complete.
        """
        team = self.get(id_or_name)
        if team.id == DEFAULT_TEAM:
            raise Conflict("the default team cannot be deleted")
        audit = self._admin_fn(actor, "teams.delete", team.id, before=team.to_dict())

        def delete(conn: sqlite3.Connection) -> None:
            (keys,) = conn.execute("SELECT COUNT(*) FROM api_keys WHERE team_id = ?", (team.id,)).fetchone()
            if keys:
                raise Conflict(
                    f"team {team.id!r} still has {keys} key{'s' if keys != 1 else ''} (revoked keys included); "
                    "move them to another team first"
                )
            conn.execute("DELETE FROM budgets WHERE scope = 'team' AND scope_id = ?", (team.id,))
            conn.execute("DELETE FROM teams WHERE id = ?", (team.id,))
            audit(conn)

        self._store.write_sync(delete)
        return team


def _check_retention(**policies: str | None) -> None:
    for param, policy in policies.items():
        if policy is not None and policy not in RETENTION_POLICIES:
            raise InvalidRequest(f"{param} must be one of {', '.join(RETENTION_POLICIES)}, got {policy!r}", param=param)


def _team(row: sqlite3.Row) -> Team:
    return Team(
        id=row["id"],
        name=row["name"],
        prompt_retention=row["prompt_retention"],
        created_at=float(row["created_at"]),
        key_count=int(row["key_count"]),
        answer_retention=row["answer_retention"],
    )
