"""Killed under load (`kill -9`, or a native crash's SIGSEGV): the audit chain still verifies,
SQLite is intact, every request whose response reached the client is in the log, and the
appliance serves again on the same data."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import MODEL_NAME, init_data_dir, run_cli, start_server


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV], ids=["kill-9", "segfault"])
def test_killed_under_load_loses_no_acknowledged_request(sig: signal.Signals, tmp_path: Path, model_path: Path) -> None:
    key = init_data_dir(tmp_path, model_path)
    (tmp_path / "appliance.toml").write_text("[audit]\ncheckpoint_every_records = 25\n")
    proc, url, _ = start_server(tmp_path)
    acknowledged: list[str] = []
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    async def client_loop(client: httpx.AsyncClient, stop_at: float) -> None:
        auth = {"Authorization": f"Bearer {key}"}
        while time.monotonic() < stop_at:
            try:
                r = await client.post(url + "/v1/chat/completions", json=body, headers=auth)
                if r.status_code == 200:
                    acknowledged.append(r.headers["x-request-id"])
                r = await client.get(url + "/v1/models", headers=auth)  # reads are audited too
                if r.status_code == 200:
                    acknowledged.append(r.headers["x-request-id"])
            except httpx.HTTPError:
                return  # the server died under us

    async def load_then_kill() -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            stop_at = time.monotonic() + 60
            tasks = [asyncio.create_task(client_loop(client, stop_at)) for _ in range(16)]
            while len(acknowledged) < 150 and time.monotonic() < stop_at - 10:
                await asyncio.sleep(0.05)
            proc.send_signal(sig)
            await asyncio.gather(*tasks)

    asyncio.run(load_then_kill())
    proc.wait(timeout=30)
    assert proc.returncode == -sig
    assert len(acknowledged) >= 50

    db = tmp_path / "appliance.db"
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    logged = {json.loads(b).get("request_id") for (b,) in conn.execute("SELECT body FROM audit")}
    conn.close()
    missing = set(acknowledged) - logged
    assert not missing, f"{len(missing)} acknowledged requests are not in the audit log"

    verified = run_cli("audit", "verify", "--json", data_dir=tmp_path, check=False)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    report = json.loads(verified.stdout)
    assert report["ok"] and report["records_checked"] >= len(set(acknowledged))
    assert report["checkpoints_checked"] >= 1

    # and the appliance starts again on the same data
    proc2, url2, _ = start_server(tmp_path)
    try:
        assert httpx.get(url2 + "/readyz").status_code == 200
    finally:
        proc2.send_signal(signal.SIGTERM)
        proc2.wait(timeout=60)
