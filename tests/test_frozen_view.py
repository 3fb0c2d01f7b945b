"""A slow or abandoned export must not freeze what everyone else reads: it once held the event
loop's shared read connection open, pinning SQLite's WAL snapshot, and from then on a revoked
key kept working and a new one was refused until the server restarted."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from appliance.audit import AuditLog
from appliance.config import load_settings
from appliance.store import Store
from tests.audit import fill
from tests.conftest import init_data_dir, run_cli, start_server, stop_server


def _check_changes_take_effect(url: str, admin: dict[str, str], data_dir: Path) -> None:
    doomed = httpx.post(url + "/admin/keys", json={"name": "doomed"}, headers=admin).json()
    assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {doomed['key']}"}).status_code == 200
    assert httpx.delete(url + f"/admin/keys/{doomed['id']}", headers=admin).status_code == 200
    assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {doomed['key']}"}).status_code == 401
    fresh = json.loads(run_cli("keys", "create", "--name", "fresh", "--json", data_dir=data_dir).stdout)
    assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {fresh['key']}"}).status_code == 200
    listed = {k["id"] for k in httpx.get(url + "/admin/keys", headers=admin).json()["data"]}
    assert {doomed["id"], fresh["id"]} <= listed


def test_a_slow_then_abandoned_export_never_freezes_the_view(tmp_path: Path, model_path: Path) -> None:
    key = init_data_dir(tmp_path, model_path)
    with Store(tmp_path / "appliance.db") as store:
        fill(AuditLog.from_settings(store, load_settings(tmp_path, env={})), 20_000)  # ~12 MB of export
    proc, url, _ = start_server(tmp_path)
    admin = {"Authorization": f"Bearer {key}"}
    try:
        with httpx.stream("GET", url + "/admin/audit/export", headers=admin, timeout=60) as export:
            chunks = export.iter_bytes()
            assert next(chunks)  # the export has begun, and is now read slowly (not at all)
            _check_changes_take_effect(url, admin, tmp_path)
        # abandoned half-way: the connection is gone
        _check_changes_take_effect(url, admin, tmp_path)
        whole = httpx.get(url + "/admin/audit/export", headers=admin, timeout=120)
        assert whole.status_code == 200 and len(whole.text.splitlines()) > 20_000
    finally:
        stop_server(proc)
