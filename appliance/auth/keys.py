"""API keys: `apl_<id>_<secret>` with a 256-bit secret. Only an HMAC-SHA256 of the whole key,
under a server secret kept in the data directory, is stored. Keys are found by their id and
compared in constant time. A slow password hash is not needed: the secret has 256 bits of
entropy, so brute force is hopeless, and a slow hash would add tens of ms to every request.

Rotation gives a key a new secret under the same id; the previous secret's hash is kept with
a time until which it still works (the overlap), so apps can move over without downtime.
Every change is written together with its admin audit record, in one transaction."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.audit.log import Actor, AuditLog
from appliance.auth.principal import Principal, Role
from appliance.config import RETENTION_POLICIES
from appliance.errors import AuthenticationFailed, Conflict, InvalidRequest, NotFound
from appliance.store import Store

KEY_PREFIX = "apl"
_ID_BYTES = 6  # 12 hex characters, public
_SECRET_BYTES = 32  # 256 bits
_DUMMY_HASH = "0" * 64
_SELECT_WITH_TEAM = (
    "SELECT k.*, t.prompt_retention AS team_retention, t.answer_retention AS team_answer_retention"
    " FROM api_keys k JOIN teams t ON t.id = k.team_id WHERE k.id = ?"
)
_DAY = 86400.0


class _Unset:
    """Marks an update field that was not given (None means "clear it")."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


def load_or_create_server_secret(path: Path) -> bytes:
    """The HMAC key, created once with owner-only permissions."""
    if path.exists():
        data = path.read_bytes()
        if len(data) < 32:
            raise InvalidRequest(f"{path} is damaged: the server secret is too short")
        return data
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return data


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What is stored about a key; never the secret."""

    id: str
    name: str
    role: Role
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    allowed_models: list[str] | None
    team_id: str = "default"
    rpm: int | None = None
    tpm: int | None = None
    prompt_retention: str | None = None
    answer_retention: str | None = None
    rotated_at: float | None = None
    previous_valid_until: float | None = None  # the secret before the last rotation works until then
    expiring: bool = False  # active, and expires within the warning window

    @property
    def status(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= time.time():
            return "expired"
        return "active"

    def to_dict(self) -> dict[str, object]:
        overlap = self.previous_valid_until if self.previous_valid_until and self.previous_valid_until > time.time() else None
        return {
            "id": self.id,
            "name": self.name,
            "role": self.role.value,
            "status": self.status,
            "expiring": self.expiring,
            "created_at": _iso(self.created_at),
            "expires_at": _iso(self.expires_at),
            "revoked_at": _iso(self.revoked_at),
            "rotated_at": _iso(self.rotated_at),
            "previous_secret_valid_until": _iso(overlap),
            "models": self.allowed_models,
            "team": self.team_id,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "prompt_retention": self.prompt_retention,
            "answer_retention": self.answer_retention,
        }


@dataclass(frozen=True, slots=True)
class NewKey:
    record: KeyRecord
    secret: str  # shown once


class KeyService:
    """Keys: authentication on the hot path, and their life cycle, each change audited in the
    same transaction. `expiry_warning_days`: an active key expiring within it is `expiring`."""

    def __init__(self, store: Store, server_secret: bytes, audit: AuditLog, *, expiry_warning_days: float = 14.0) -> None:
        self._store = store
        self._secret = server_secret
        self._audit = audit
        self._warn_seconds = expiry_warning_days * _DAY

    def _hash(self, key: str) -> str:
        return hmac.new(self._secret, key.encode(), hashlib.sha256).hexdigest()

    # -- authentication (hot path: one indexed read, one HMAC) ------------------------------
    def authenticate(self, key: str | None) -> Principal:
        """Return the principal for a presented key, or raise `AuthenticationFailed`.

        The message never echoes the key.
        """
        if not key:
            raise AuthenticationFailed("Missing API key. Send it as 'Authorization: Bearer <key>'.", reason="missing")
        key_id = _parse_id(key)
        row = self._store.query_one(_SELECT_WITH_TEAM, (key_id,)) if key_id else None
        # Hash and compare even when the id is unknown, and against the previous secret even
        # when there is none, so timing reveals neither which ids exist nor which secret matched.
        presented = self._hash(key)
        current = hmac.compare_digest(presented, row["key_hash"] if row else _DUMMY_HASH)
        previous_hash = row["previous_key_hash"] if row and row["previous_key_hash"] else _DUMMY_HASH
        previous = hmac.compare_digest(presented, previous_hash)
        if row is None or not (current or (previous and (row["previous_valid_until"] or 0) > time.time())):
            raise AuthenticationFailed("Invalid API key.")
        record = self._record(row)
        if record.status != "active":
            raise AuthenticationFailed(f"This API key is {record.status}.", reason=record.status)
        return _principal(record, row)

    def principal_of(self, key_id: str) -> Principal:
        """The principal a key's requests act as (for explaining a routing decision as that key)."""
        row = self._store.query_one(_SELECT_WITH_TEAM, (key_id,))
        if row is None:
            raise NotFound(f"No key {key_id!r}.")
        return _principal(self._record(row), row)

    # -- management ---------------------------------------------------------------------------
    def create(
        self,
        name: str,
        role: str,
        *,
        actor: Actor,
        expires_at: float | None = None,
        models: list[str] | None = None,
        team: str = "default",
        rpm: int | None = None,
        tpm: int | None = None,
        prompt_retention: str | None = None,
        answer_retention: str | None = None,
    ) -> NewKey:
        name = name.strip()
        if not name or len(name) > 100:
            raise InvalidRequest("name must be 1 to 100 characters", param="name")
        try:
            role_value = Role(role)
        except ValueError:
            raise InvalidRequest(
                f"role must be one of {', '.join(r.value for r in Role)}", param="role"
            ) from None
        now = time.time()
        _check_limits(expires_at=expires_at, rpm=rpm, tpm=tpm, now=now)
        expires_at = _expiry(expires_at)
        _check_retention(prompt_retention=prompt_retention, answer_retention=answer_retention)
        team_id = self._team_id(team)
        key_id = secrets.token_hex(_ID_BYTES)
        secret = _new_secret(key_id)
        row = {
            "id": key_id,
            "name": name,
            "role": role_value.value,
            "key_hash": self._hash(secret),
            "allowed_models": json.dumps(models) if models is not None else None,
            "created_at": now,
            "expires_at": expires_at,
            "revoked_at": None,
            "team_id": team_id,
            "rpm": rpm,
            "tpm": tpm,
            "prompt_retention": prompt_retention,
            "answer_retention": answer_retention,
        }
        record = KeyRecord(
            key_id, name, role_value, now, expires_at, None, models, team_id, rpm, tpm, prompt_retention, answer_retention
        )
        record = self._with_expiring(record)
        audit = self._audit.admin_fn(actor, "keys.create", key_id, after=record.to_dict())
        self._store.write_sync(lambda conn: (_insert_key(conn, row), audit(conn)))
        return NewKey(record, secret)

    def list(self, *, expiring_only: bool = False) -> list[KeyRecord]:
        records = [self._record(r) for r in self._store.query("SELECT * FROM api_keys ORDER BY created_at")]
        return [r for r in records if r.expiring] if expiring_only else records

    def get(self, key_id: str) -> KeyRecord:
        row = self._store.query_one("SELECT * FROM api_keys WHERE id = ?", (key_id,))
        if row is None:
            raise NotFound(f"No key with id {key_id!r}.")
        return self._record(row)

    def revoke(self, key_id: str, *, actor: Actor) -> KeyRecord:
        """Revoke a key (both secrets, if rotated); revoking twice keeps the first time."""
        before = self.get(key_id)
        now = time.time()
        after = before if before.revoked_at is not None else replace(before, revoked_at=now, expiring=False)
        audit = self._audit.admin_fn(actor, "keys.revoke", key_id, before=before.to_dict(), after=after.to_dict())

        def write(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now, key_id))
            audit(conn)

        self._store.write_sync(write)
        return self.get(key_id)

    def update(
        self,
        key_id: str,
        *,
        actor: Actor,
        rpm: int | None = UNSET,
        tpm: int | None = UNSET,
        models: list[str] | None = UNSET,
        expires_at: float | None = UNSET,
        team: str = UNSET,
        prompt_retention: str | None = UNSET,
        answer_retention: str | None = UNSET,
    ) -> KeyRecord:
        """Change a key's limits, models, expiry, team or retention policies; None clears a
        limit, the model list (every model), the expiry or a policy (then the team's applies).
        Fields not given stay as they are."""
        before = self.get(key_id)
        if before.revoked_at is not None:
            raise Conflict(f"key {key_id!r} is revoked; create a new one instead")
        changes: dict[str, Any] = {}
        if rpm is not UNSET:
            changes["rpm"] = rpm
        if tpm is not UNSET:
            changes["tpm"] = tpm
        if models is not UNSET:
            changes["allowed_models"] = json.dumps(models) if models is not None else None
        if expires_at is not UNSET:
            changes["expires_at"] = _expiry(expires_at)
        if team is not UNSET:
            changes["team_id"] = self._team_id(team)
        for column, policy in (("prompt_retention", prompt_retention), ("answer_retention", answer_retention)):
            if policy is not UNSET:
                _check_retention(**{column: policy})
                changes[column] = policy
        if not changes:
            return before
        _check_limits(
            expires_at=changes.get("expires_at"), rpm=changes.get("rpm"), tpm=changes.get("tpm"), now=time.time()
        )
        after = replace(
            before,
            rpm=changes.get("rpm", before.rpm),
            tpm=changes.get("tpm", before.tpm),
            allowed_models=models if models is not UNSET else before.allowed_models,
            expires_at=changes.get("expires_at", before.expires_at),
            team_id=changes.get("team_id", before.team_id),
            prompt_retention=changes.get("prompt_retention", before.prompt_retention),
            answer_retention=changes.get("answer_retention", before.answer_retention),
        )
        after = self._with_expiring(after)
        audit = self._audit.admin_fn(actor, "keys.update", key_id, before=before.to_dict(), after=after.to_dict())
        assignments = ", ".join(f"{column} = :{column}" for column in changes)

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(f"UPDATE api_keys SET {assignments} WHERE id = :id", changes | {"id": key_id})
            audit(conn)

        self._store.write_sync(write)
        return self.get(key_id)

    def rotate(self, key_id: str, *, actor: Actor, overlap_seconds: float) -> NewKey:
        """A new secret for the key; the current one keeps working for `overlap_seconds` (0:
        stops at once). A secret from an earlier rotation stops now."""
        if not (0 <= overlap_seconds <= 90 * _DAY):
            raise InvalidRequest("overlap must be between 0 and 90 days", param="overlap")
        before = self.get(key_id)
        if before.status != "active":
            raise Conflict(f"key {key_id!r} is {before.status}; only an active key can be rotated")
        row = self._store.query_one("SELECT key_hash FROM api_keys WHERE id = ?", (key_id,))
        assert row is not None
        now = time.time()
        secret = _new_secret(key_id)
        valid_until = now + overlap_seconds if overlap_seconds > 0 else None
        after = replace(before, rotated_at=now, previous_valid_until=valid_until)
        audit = self._audit.admin_fn(actor, "keys.rotate", key_id, before=before.to_dict(), after=after.to_dict())
        params = {"id": key_id, "hash": self._hash(secret), "old": row["key_hash"], "until": valid_until, "now": now}

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE api_keys SET key_hash = :hash, previous_key_hash = :old, previous_valid_until = :until,"
                " rotated_at = :now WHERE id = :id",
                params,
            )
            audit(conn)

        self._store.write_sync(write)
        return NewKey(self.get(key_id), secret)

    def count(self) -> int:
        row = self._store.query_one("SELECT COUNT(*) FROM api_keys")
        return int(row[0]) if row else 0

    def _team_id(self, team: str) -> str:
        team_row = self._store.query_one("SELECT id FROM teams WHERE id = ? OR name = ?", (team, team))
        if team_row is None:
            # 409: the request is well formed; the team it names does not exist (yet).
            raise Conflict(f"No team named {team!r}; create it first.", param="team")
        return str(team_row["id"])

    def _record(self, row: sqlite3.Row) -> KeyRecord:
        return _record(row, expiring=self._expiring(row["revoked_at"], row["expires_at"]))

    def _expiring(self, revoked_at: float | None, expires_at: float | None) -> bool:
        """Active (not revoked, not expired), and expiring within the warning window."""
        if revoked_at is not None or expires_at is None:
            return False
        left = expires_at - time.time()
        return 0 < left <= self._warn_seconds

    def _with_expiring(self, record: KeyRecord) -> KeyRecord:
        return replace(record, expiring=self._expiring(record.revoked_at, record.expires_at))


def _new_secret(key_id: str) -> str:
    return f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(_SECRET_BYTES)}"


_EARLIEST, _LATEST = -62135596800.0, 253402300799.0  # 0001-01-01 .. 9999-12-31, what dates can show


def _expiry(expires_at: float | None) -> float | None:
    """An expiry as stored: times outside the years 1-9999 are clamped to them."""
    return None if expires_at is None else min(max(expires_at, _EARLIEST), _LATEST)


def _check_limits(*, expires_at: float | None, rpm: int | None, tpm: int | None, now: float) -> None:
    # A past expiry is allowed: it is how an update expires a key now (its status says so).
    if expires_at is not None and not math.isfinite(expires_at):
        raise InvalidRequest("expires_at must be a real time", param="expires_at")
    for param, limit in (("rpm", rpm), ("tpm", tpm)):
        if limit is not None and limit < 1:
            raise InvalidRequest(f"{param} must be at least 1", param=param)


def _check_retention(**policies: str | None) -> None:
    for param, policy in policies.items():
        if policy is not None and policy not in RETENTION_POLICIES:
            raise InvalidRequest(f"{param} must be one of {', '.join(RETENTION_POLICIES)}", param=param)


def _principal(record: KeyRecord, row: sqlite3.Row) -> Principal:
    """The principal a key acts as: its own retention policies, else its team's."""
    return Principal(
        key_id=record.id,
        name=record.name,
        role=record.role,
        team_id=record.team_id,
        allowed_models=frozenset(record.allowed_models) if record.allowed_models is not None else None,
        rpm=record.rpm,
        tpm=record.tpm,
        prompt_retention=record.prompt_retention or row["team_retention"],
        answer_retention=record.answer_retention or row["team_answer_retention"],
    )


def _insert_key(conn: sqlite3.Connection, row: dict[str, object]) -> None:
    conn.execute(
        "INSERT INTO api_keys (id, name, role, key_hash, allowed_models, created_at, expires_at, revoked_at,"
        " team_id, rpm, tpm, prompt_retention, answer_retention) VALUES (:id, :name, :role, :key_hash,"
        " :allowed_models, :created_at, :expires_at, :revoked_at, :team_id, :rpm, :tpm, :prompt_retention,"
        " :answer_retention)",
        row,
    )


def _parse_id(key: str) -> str | None:
    prefix, _, rest = key.partition("_")
    key_id, _, secret = rest.partition("_")
    if prefix != KEY_PREFIX or len(key_id) != 2 * _ID_BYTES or not secret:
        return None
    return key_id


def _record(row: sqlite3.Row, *, expiring: bool = False) -> KeyRecord:
    models = json.loads(row["allowed_models"]) if row["allowed_models"] else None
    return KeyRecord(
        id=row["id"],
        name=row["name"],
        role=Role(row["role"]),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        allowed_models=models,
        team_id=row["team_id"],
        rpm=row["rpm"],
        tpm=row["tpm"],
        prompt_retention=row["prompt_retention"],
        answer_retention=row["answer_retention"],
        rotated_at=row["rotated_at"],
        previous_valid_until=row["previous_valid_until"],
        expiring=expiring,
    )


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds")


def parse_expiry(text: str) -> float:
    """Accept `2027-01-31`, `2027-01-31T12:00:00Z` or `2027-01-31T12:00:00+02:00`; naive times are UTC."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(
            f"expiry {text!r} is not a date: use YYYY-MM-DD or an ISO 8601 time", param="expires_at"
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()
