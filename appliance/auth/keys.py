"""API keys: `apl_<id>_<secret>` with a 256-bit secret. Only an HMAC-SHA256 of the whole key,
under a server secret kept in the data directory, is stored. Keys are found by their id and
compared in constant time. A slow password hash is not needed: the secret has 256 bits of
entropy, so brute force is hopeless, and a slow hash would add tens of ms to every request."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from appliance.auth.principal import Principal, Role
from appliance.config import RETENTION_POLICIES
from appliance.errors import AuthenticationFailed, InvalidRequest, NotFound
from appliance.store import Store

KEY_PREFIX = "apl"
_ID_BYTES = 6  # 12 hex characters, public
_SECRET_BYTES = 32  # 256 bits
_DUMMY_HASH = "0" * 64
_SELECT_WITH_TEAM = (
    "SELECT k.*, t.prompt_retention AS team_retention FROM api_keys k JOIN teams t ON t.id = k.team_id WHERE k.id = ?"
)


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

    @property
    def status(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= time.time():
            return "expired"
        return "active"

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.name,
            "role": self.role.value,
            "status": self.status,
            "created_at": _iso(self.created_at),
            "expires_at": _iso(self.expires_at),
            "revoked_at": _iso(self.revoked_at),
            "models": self.allowed_models,
            "team": self.team_id,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "prompt_retention": self.prompt_retention,
        }


@dataclass(frozen=True, slots=True)
class NewKey:
    record: KeyRecord
    secret: str  # shown once


class KeyService:
    def __init__(self, store: Store, server_secret: bytes) -> None:
        self._store = store
        self._secret = server_secret

    def _hash(self, key: str) -> str:
        return hmac.new(self._secret, key.encode(), hashlib.sha256).hexdigest()

    # -- authentication (hot path: one indexed read, one HMAC) ------------------------------
    def authenticate(self, key: str | None) -> Principal:
        """Return the principal for a presented key, or raise `AuthenticationFailed`.

        The message never echoes the key.
        """
        if not key:
            raise AuthenticationFailed("Missing API key. Send it as 'Authorization: Bearer <key>'.")
        key_id = _parse_id(key)
        row = self._store.query_one(_SELECT_WITH_TEAM, (key_id,)) if key_id else None
        # Hash and compare even when the id is unknown, so timing does not reveal which ids exist.
        matches = hmac.compare_digest(self._hash(key), row["key_hash"] if row else _DUMMY_HASH)
        if row is None or not matches:
            raise AuthenticationFailed("Invalid API key.")
        record = _record(row)
        if record.status != "active":
            raise AuthenticationFailed(f"This API key is {record.status}.")
        models = frozenset(record.allowed_models) if record.allowed_models is not None else None
        return Principal(
            key_id=record.id,
            name=record.name,
            role=record.role,
            team_id=record.team_id,
            allowed_models=models,
            rpm=record.rpm,
            tpm=record.tpm,
            prompt_retention=record.prompt_retention or row["team_retention"],
        )

    # -- management ---------------------------------------------------------------------------
    def create(
        self,
        name: str,
        role: str,
        *,
        expires_at: float | None = None,
        models: list[str] | None = None,
        team: str = "default",
        rpm: int | None = None,
        tpm: int | None = None,
        prompt_retention: str | None = None,
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
        if expires_at is not None and expires_at <= now:
            raise InvalidRequest("expires_at must be in the future", param="expires_at")
        for param, limit in (("rpm", rpm), ("tpm", tpm)):
            if limit is not None and limit < 1:
                raise InvalidRequest(f"{param} must be at least 1", param=param)
        if prompt_retention is not None and prompt_retention not in RETENTION_POLICIES:
            raise InvalidRequest(f"prompt_retention must be one of {', '.join(RETENTION_POLICIES)}", param="prompt_retention")
        team_row = self._store.query_one("SELECT id FROM teams WHERE id = ? OR name = ?", (team, team))
        if team_row is None:
            raise InvalidRequest(f"no team named {team!r}", param="team")
        team_id = team_row["id"]
        key_id = secrets.token_hex(_ID_BYTES)
        secret = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(_SECRET_BYTES)}"
        record = KeyRecord(key_id, name, role_value, now, expires_at, None, models, team_id, rpm, tpm, prompt_retention)
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
        }
        self._store.write_sync(lambda conn: _insert_key(conn, row))
        return NewKey(record, secret)

    def list(self) -> list[KeyRecord]:
        return [_record(r) for r in self._store.query("SELECT * FROM api_keys ORDER BY created_at")]

    def get(self, key_id: str) -> KeyRecord:
        row = self._store.query_one("SELECT * FROM api_keys WHERE id = ?", (key_id,))
        if row is None:
            raise NotFound(f"No key with id {key_id!r}.")
        return _record(row)

    def revoke(self, key_id: str) -> KeyRecord:
        """Revoke a key; revoking twice keeps the first revocation time."""
        self.get(key_id)
        now = time.time()
        self._store.write_sync(
            lambda conn: conn.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now, key_id)
            )
        )
        return self.get(key_id)

    def count(self) -> int:
        row = self._store.query_one("SELECT COUNT(*) FROM api_keys")
        return int(row[0]) if row else 0


def _insert_key(conn: sqlite3.Connection, row: dict[str, object]) -> None:
    conn.execute(
        "INSERT INTO api_keys (id, name, role, key_hash, allowed_models, created_at, expires_at, revoked_at,"
        " team_id, rpm, tpm, prompt_retention) VALUES (:id, :name, :role, :key_hash, :allowed_models,"
        " :created_at, :expires_at, :revoked_at, :team_id, :rpm, :tpm, :prompt_retention)",
        row,
    )


def _parse_id(key: str) -> str | None:
    prefix, _, rest = key.partition("_")
    key_id, _, secret = rest.partition("_")
    if prefix != KEY_PREFIX or len(key_id) != 2 * _ID_BYTES or not secret:
        return None
    return key_id


def _record(row: sqlite3.Row) -> KeyRecord:
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
