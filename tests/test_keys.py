"""API keys: format and entropy, hash-only storage, lookup, expiry and revocation."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from appliance.auth import KeyService, Role, load_or_create_server_secret
from appliance.auth.keys import parse_expiry
from appliance.errors import AuthenticationFailed, InvalidRequest, NotFound
from appliance.store import Store
from tests.admin_helpers import ACTOR, audit_of


@pytest.fixture
def keys(tmp_path: Path):
    with Store(tmp_path / "a.db") as store:
        yield KeyService(store, load_or_create_server_secret(tmp_path / "keys" / "secret"), audit_of(store))


def test_key_shape_and_only_a_keyed_hash_is_stored(keys: KeyService, tmp_path: Path) -> None:
    new = keys.create("app", "user", actor=ACTOR)
    prefix, key_id, secret = new.secret.split("_", 2)
    assert prefix == "apl" and key_id == new.record.id
    assert len(secret) >= 43  # 32 random bytes, url-safe base64: 256 bits
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("a.db*"))
    assert secret.encode() not in raw and new.secret.encode() not in raw
    assert (tmp_path / "keys" / "secret").stat().st_mode & 0o777 == 0o600


def test_authenticate_returns_the_principal(keys: KeyService) -> None:
    new = keys.create("ops", "operator", models=["m1"], actor=ACTOR)
    principal = keys.authenticate(new.secret)
    assert principal.key_id == new.record.id and principal.role is Role.OPERATOR
    assert principal.may_use("m1") and not principal.may_use("m2")


@pytest.mark.parametrize("presented", [None, "", "Bearer", "apl_", "apl_zzz_abc", "sk-123", "apl_000000000000_nope"])
def test_bad_keys_fail_without_echoing_them(keys: KeyService, presented: str | None) -> None:
    with pytest.raises(AuthenticationFailed) as info:
        keys.authenticate(presented)
    if presented:
        assert presented not in str(info.value)


def test_a_tampered_secret_fails(keys: KeyService) -> None:
    new = keys.create("app", "user", actor=ACTOR)
    tampered = new.secret[:-1] + ("A" if new.secret[-1] != "A" else "B")
    with pytest.raises(AuthenticationFailed):
        keys.authenticate(tampered)


def test_another_servers_secret_does_not_validate(keys: KeyService, tmp_path: Path) -> None:
    new = keys.create("app", "user", actor=ACTOR)
    other = KeyService(keys._store, load_or_create_server_secret(tmp_path / "other" / "secret"), audit_of(keys._store))
    with pytest.raises(AuthenticationFailed):
        other.authenticate(new.secret)


def test_revocation_is_immediate_and_sticky(keys: KeyService) -> None:
    new = keys.create("app", "user", actor=ACTOR)
    keys.authenticate(new.secret)
    first = keys.revoke(new.record.id, actor=ACTOR)
    assert first.status == "revoked"
    with pytest.raises(AuthenticationFailed, match="revoked"):
        keys.authenticate(new.secret)
    assert keys.revoke(new.record.id, actor=ACTOR).revoked_at == first.revoked_at
    with pytest.raises(NotFound):
        keys.revoke("000000000000", actor=ACTOR)


def test_expiry(keys: KeyService) -> None:
    new = keys.create("temp", "user", actor=ACTOR, expires_at=time.time() + 1.0)
    keys.authenticate(new.secret)
    time.sleep(1.1)
    with pytest.raises(AuthenticationFailed, match="expired"):
        keys.authenticate(new.secret)
    assert keys.get(new.record.id).status == "expired"
    late = keys.create("late", "user", actor=ACTOR, expires_at=time.time() - 10)  # born expired, as asked
    assert late.record.status == "expired"
    with pytest.raises(AuthenticationFailed, match="expired"):
        keys.authenticate(late.secret)


def test_validation(keys: KeyService) -> None:
    with pytest.raises(InvalidRequest, match="role"):
        keys.create("x", "root", actor=ACTOR)
    with pytest.raises(InvalidRequest, match="name"):
        keys.create("  ", "user", actor=ACTOR)
    assert parse_expiry("2030-01-02") == parse_expiry("2030-01-02T00:00:00Z")
    with pytest.raises(InvalidRequest, match="not a date"):
        parse_expiry("next tuesday")
    assert keys.count() == 0
