"""Administrative changes: each is one transaction with its audit record; the key life cycle
(update, rotate with an overlap, expiring soon); erasure of kept prompts without breaking the
chain."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from appliance.audit import verify
from appliance.audit.content import ErasureSelector, erase_fn
from appliance.audit.retention import retain
from appliance.auth import KeyService, load_or_create_server_secret
from appliance.errors import Conflict, StoreError
from appliance.metering.budgets import BudgetService
from appliance.store import Store
from appliance.teams import TeamService
from tests.admin_helpers import ACTOR, audit_of
from tests.conftest import MODEL_NAME, Server, run_cli

CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "My card is 4111 1111 1111 1111, mail me at a@b.co"}], "max_tokens": 2}


def _break_audit(store: Store) -> None:
    """Any further audit insert fails, as on a full disk."""
    store.write_sync(lambda c: c.execute("CREATE TRIGGER no_audit BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'disk full'); END"))


def test_a_change_whose_audit_record_cannot_be_written_does_not_happen(tmp_path: Path) -> None:
    with Store(tmp_path / "a.db") as store:
        audit = audit_of(store)
        keys = KeyService(store, load_or_create_server_secret(tmp_path / "secret"), audit)
        teams, budgets = TeamService(store, audit), BudgetService(store, audit)
        kept = keys.create("kept", "user", actor=ACTOR)
        _break_audit(store)
        with pytest.raises(StoreError):
            keys.create("lost", "user", actor=ACTOR)
        with pytest.raises(StoreError):
            keys.revoke(kept.record.id, actor=ACTOR)
        with pytest.raises(StoreError):
            teams.create("research", actor=ACTOR)
        with pytest.raises(StoreError):
            budgets.set_budget("key", kept.record.id, actor=ACTOR, amount=5)
        assert [k.name for k in keys.list()] == ["kept"]
        assert keys.get(kept.record.id).status == "active"
        assert [t.id for t in teams.list()] == ["default"]
        assert budgets.list_budgets() == []


def test_update_rotate_and_expiring_keys(tmp_path: Path) -> None:
    with Store(tmp_path / "a.db") as store:
        audit = audit_of(store)
        keys = KeyService(store, load_or_create_server_secret(tmp_path / "secret"), audit, expiry_warning_days=7)
        TeamService(store, audit).create("research", actor=ACTOR)
        new = keys.create("app", "user", actor=ACTOR, rpm=10)
        changed = keys.update(new.record.id, actor=ACTOR, rpm=None, tpm=500, team="research", models=["m1"])
        assert (changed.rpm, changed.tpm, changed.team_id, changed.allowed_models) == (None, 500, "research", ["m1"])
        principal = keys.authenticate(new.secret)
        assert principal.tpm == 500 and principal.team_id == "research" and not principal.may_use("m2")

        soon = keys.update(new.record.id, actor=ACTOR, expires_at=time.time() + 3 * 86400)
        assert soon.expiring and [k.id for k in keys.list(expiring_only=True)] == [new.record.id]

        rotated = keys.rotate(new.record.id, actor=ACTOR, overlap_seconds=1.5)
        assert rotated.secret != new.secret and rotated.record.id == new.record.id
        keys.authenticate(new.secret)  # the old secret still works during the overlap...
        keys.authenticate(rotated.secret)
        time.sleep(1.6)
        with pytest.raises(Exception, match="Invalid API key"):  # ...and stops after it
            keys.authenticate(new.secret)
        keys.authenticate(rotated.secret)
        again = keys.rotate(new.record.id, actor=ACTOR, overlap_seconds=0)
        with pytest.raises(Exception, match="Invalid API key"):
            keys.authenticate(rotated.secret)
        keys.authenticate(again.secret)

        keys.revoke(new.record.id, actor=ACTOR)
        with pytest.raises(Conflict):
            keys.rotate(new.record.id, actor=ACTOR, overlap_seconds=60)
        actions = [json.loads(b)["action"] for (b,) in store.query("SELECT body FROM audit WHERE kind = 'admin' ORDER BY idx")]
        assert actions == ["teams.create", "keys.create", "keys.update", "keys.update", "keys.rotate", "keys.rotate", "keys.revoke"]
        update = json.loads(store.query("SELECT body FROM audit WHERE kind = 'admin' ORDER BY idx")[2]["body"])
        assert update["before"]["rpm"] == 10 and update["after"]["rpm"] is None and update["after"]["tpm"] == 500
        raw = b"".join(p.read_bytes() for p in tmp_path.glob("a.db*"))
        assert new.secret.encode() not in raw and again.secret.encode() not in raw


def test_keys_update_and_rotate_over_http_and_the_cli(server: Server) -> None:
    admin = {"Authorization": f"Bearer {server.admin_key}"}
    made = httpx.post(server.url + "/admin/keys", json={"name": "patched", "rpm": 5}, headers=admin).json()
    r = httpx.patch(server.url + f"/admin/keys/{made['id']}", json={"rpm": None, "tpm": 900}, headers=admin)
    assert r.status_code == 200 and r.json()["rpm"] is None and r.json()["tpm"] == 900
    unchanged = httpx.patch(server.url + f"/admin/keys/{made['id']}", json={}, headers=admin)  # a no-op
    assert unchanged.status_code == 200 and unchanged.json() == r.json()
    assert httpx.patch(server.url + "/admin/keys/000000000000", json={"rpm": 1}, headers=admin).status_code == 404
    out = json.loads(run_cli("keys", "rotate", made["id"], "--overlap", "1h", "--json", data_dir=server.data_dir).stdout)
    assert out["previous_secret_valid_until"] is not None
    for secret in (made["key"], out["key"]):
        assert httpx.get(server.base_url + "/models", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    run_cli("keys", "update", made["id"], "--rpm", "none", "--expires", "2099-01-01", data_dir=server.data_dir)
    shown = httpx.get(server.url + f"/admin/keys/{made['id']}", headers=admin).json()
    assert shown["expires_at"].startswith("2099-01-01") and not shown["expiring"]


def test_erasure_removes_kept_prompts_and_the_chain_still_verifies(server: Server) -> None:
    made = json.loads(run_cli("keys", "create", "--name", "gdpr", "--prompt-retention", "full", "--json",
                              data_dir=server.data_dir).stdout)
    r = httpx.post(server.base_url + "/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {made['key']}"}, timeout=60)
    assert r.status_code == 200
    admin = {"Authorization": f"Bearer {server.admin_key}"}

    def record() -> dict:
        rows = httpx.get(server.url + "/admin/audit", params={"key_id": made["id"], "limit": 100}, headers=admin).json()["data"]
        return next(x for x in rows if x["body"].get("request_id") == r.headers["x-request-id"])

    assert "4111 1111 1111 1111" in record()["content"]["prompt"]
    out = json.loads(run_cli("audit", "erase", "--key", made["id"], "--json", data_dir=server.data_dir).stdout)
    assert out["erased"] == 1
    erased = record()
    assert "content" not in erased and erased["content_erased_at"]
    assert erased["body"]["prompt"]["kept"] == "full"  # the digest stays: the chain is untouched
    report = httpx.get(server.url + "/admin/audit/verify", headers=admin).json()
    assert report["ok"] and report["content_erased"] >= 1
    exported = httpx.get(server.url + "/admin/audit/export", headers=admin).text
    assert "4111 1111 1111 1111" not in exported
    actions = [x["body"]["action"] for x in httpx.get(server.url + "/admin/audit", params={"kind": "admin", "limit": 10_000},
                                                       headers=admin).json()["data"]]
    assert "audit.erase" in actions


def test_edited_kept_text_is_detected(tmp_path: Path) -> None:
    with Store(tmp_path / "a.db") as store:
        audit = audit_of(store)
        kept = retain("full", "secret plans")
        assert kept is not None
        store.write_sync(audit.append_fn("request", {"prompt": kept.digest}, key_id="k", team_id="t", content={"prompt": kept.text}))
        assert verify(store.reader(), public_key=audit.signer.public_key_hex).content_checked == 1
        conn = sqlite3.connect(tmp_path / "a.db")
        conn.execute("""UPDATE audit_content SET content = '{"prompt":"other plans"}'""")
        conn.commit()
        conn.close()
        report = verify(store.reader(), public_key=audit.signer.public_key_hex)
        assert not report.ok and "edited" in report.problem
        store.write_sync(erase_fn(audit, ACTOR, ErasureSelector(key_id="k")))
        report = verify(store.reader(), public_key=audit.signer.public_key_hex)
        assert report.ok and report.content_erased == 1
