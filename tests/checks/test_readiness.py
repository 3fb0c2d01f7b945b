"""`/readyz` says why it is not ready: an idle unload of an unpinned model leaves the box
ready (the model loads on the next request), while a database whose check failed, or a box
with no model loaded or loadable, is not ready."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import httpx

from tests.conftest import MODEL_NAME, init_data_dir, run_cli, start_server, stop_server


def _ready(url: str) -> httpx.Response:
    return httpx.get(url + "/readyz", timeout=5)


def test_an_idle_unload_does_not_make_the_box_unready(tmp_path: Path, model_path: Path) -> None:
    admin_key = init_data_dir(tmp_path, model_path)
    run_cli("models", "unpin", MODEL_NAME, data_dir=tmp_path)
    (tmp_path / "appliance.toml").write_text("[runtime]\nslots = 2\nidle_unload_seconds = 1\n")
    proc, url, log_path = start_server(tmp_path)
    try:
        headers = {"Authorization": f"Bearer {admin_key}"}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            loaded = httpx.get(url + "/admin/models", headers=headers).json()["data"][0]["loaded"]
            if not loaded:
                break
            time.sleep(0.5)
        assert not loaded, "the idle model was never unloaded"
        ready = _ready(url)
        assert ready.status_code == 200, ready.text
        assert ready.json() == {"status": "ready", "models": {}, "loadable": [MODEL_NAME]}
        chat = httpx.post(
            url + "/v1/chat/completions", headers=headers, timeout=120,
            json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert chat.status_code == 200  # the standby model loads on demand
        assert _ready(url).json()["models"] == {MODEL_NAME: True}
        # The log is JSON lines, and the load a request caused carries that request's id.
        lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
        loads = [line for line in lines if line["msg"].startswith(f"model {MODEL_NAME} loaded")]
        assert loads[-1]["request_id"] == chat.headers["x-request-id"]
        assert all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
        assert admin_key not in log_path.read_text()
    finally:
        stop_server(proc)


def test_no_model_loaded_or_loadable_says_so(tmp_path: Path) -> None:
    run_cli("init", data_dir=tmp_path)
    proc, url, _ = start_server(tmp_path, wait=False)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                ready = _ready(url)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert ready.status_code == 503 and ready.headers["retry-after"] == "5"
        assert ready.json()["reasons"] == ["no model is loaded or loadable"]
    finally:
        stop_server(proc)


def test_a_database_that_fails_its_check_makes_the_box_unready_and_the_server_keeps_running(
    tmp_path: Path, model_path: Path
) -> None:
    admin_key = init_data_dir(tmp_path, model_path)
    database = tmp_path / "appliance.db"
    with sqlite3.connect(database) as conn:  # an index nothing writes while this runs
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'idx_feedback_model_created_at'").fetchone()[0]
    with open(database, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xff" * 64)  # the page header: no longer a b-tree page
    proc, url, _ = start_server(tmp_path)
    headers = {"Authorization": f"Bearer {admin_key}"}
    try:
        assert _ready(url).status_code == 200  # nothing has looked yet
        run = httpx.post(url + "/admin/checks/sqlite/run", headers=headers, timeout=120).json()
        assert run["status"] == "fail"
        [database_finding] = [f for f in run["findings"] if f["subject"] == "database"]
        assert "quick_check found problems" in database_finding["summary"]
        ready = _ready(url)
        assert ready.status_code == 503 and ready.headers["retry-after"]
        [reason] = ready.json()["reasons"]
        assert reason.startswith("the database check failed: ")
        chat = httpx.post(
            url + "/v1/chat/completions", headers=headers, timeout=120,
            json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert chat.status_code == 200  # still serving: not ready is advice to the balancer, not a stop
    finally:
        stop_server(proc)
