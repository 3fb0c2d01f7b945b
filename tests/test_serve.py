"""`appliance serve`: start-up checks, loopback by default, clean stop on SIGTERM with requests
in flight allowed to finish."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx

from tests.conftest import MODEL_NAME, free_port, init_data_dir, run_cli, start_server, stop_server, wait_alive


def test_bad_config_fails_at_start_naming_the_key(tmp_path: Path, model_path: Path) -> None:
    init_data_dir(tmp_path, model_path)
    (tmp_path / "appliance.toml").write_text("[runtime]\nslots = -3\n")
    proc, _, log_path = start_server(tmp_path, wait=False)
    assert proc.wait(timeout=60) == 1
    text = log_path.read_text()
    assert "runtime.slots: expected int >= 1" in text and "Traceback" not in text


def test_env_override_is_validated(tmp_path: Path, model_path: Path) -> None:
    init_data_dir(tmp_path, model_path)
    proc, _, log_path = start_server(tmp_path, env={"APPLIANCE_SERVER_MAX_BODY_BYTES": "lots"}, wait=False)
    assert proc.wait(timeout=60) == 1
    assert "server.max_body_bytes: expected int, got str" in log_path.read_text()


def test_sigterm_lets_requests_in_flight_finish(tmp_path: Path, model_path: Path) -> None:
    admin_key = init_data_dir(tmp_path, model_path)
    proc, url, log_path = start_server(tmp_path)
    assert "127.0.0.1" in log_path.read_text()
    results: dict[str, object] = {}

    def long_request() -> None:
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 200, "temperature": 0}
        r = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {admin_key}"}, timeout=120)
        results["status"] = r.status_code
        results["tokens"] = r.json()["usage"]["completion_tokens"]

    worker = threading.Thread(target=long_request)
    worker.start()
    time.sleep(0.5)  # the request is being generated
    proc.send_signal(signal.SIGTERM)
    worker.join(timeout=120)
    # uvicorn re-raises the signal once shut down, as a Unix process should
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    assert results["status"] == 200 and int(results["tokens"]) > 0  # type: ignore[arg-type]
    assert "Application shutdown complete" in log_path.read_text()


def test_port_flag_and_unbindable_port(tmp_path: Path, model_path: Path) -> None:
    init_data_dir(tmp_path, model_path)
    port = free_port()
    proc, url, _ = start_server(tmp_path, port=port)
    try:
        assert httpx.get(url + "/healthz").status_code == 200
        second, _, log2 = start_server(tmp_path, port=port, wait=False)
        assert second.wait(timeout=60) != 0
    finally:
        assert stop_server(proc) in (0, -signal.SIGTERM)


def test_no_model_means_not_ready_but_alive(tmp_path: Path) -> None:
    run_cli("init", data_dir=tmp_path)
    proc, url, log_path = start_server(tmp_path, wait=False)
    try:
        wait_alive(url)
        ready = httpx.get(url + "/readyz")
        assert ready.status_code == 503 and ready.headers["retry-after"]
    finally:
        stop_server(proc)


def test_model_file_changed_on_disk_is_refused_but_the_server_runs(tmp_path: Path, model_path: Path) -> None:
    admin_key = init_data_dir(tmp_path, model_path)
    stored = tmp_path / "models" / f"{MODEL_NAME}.gguf"
    stored.unlink()  # break the hard link first: never touch the shared model file
    data = bytearray(model_path.read_bytes())
    data[-100:] = b"\xff" * 100  # same size, same header, different weights
    stored.write_bytes(bytes(data))
    proc, url, log_path = start_server(tmp_path, wait=False)
    try:
        wait_alive(url)
        assert httpx.get(url + "/readyz").status_code == 503
        status = httpx.get(url + "/admin/models", headers={"Authorization": f"Bearer {admin_key}"}).json()["data"]
        assert status[0]["loaded"] is False and "sha256 mismatch" in status[0]["error"]
        r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {admin_key}"},
                       json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    finally:
        stop_server(proc)


def test_every_request_gets_one_access_line_with_its_request_id_and_no_key(tmp_path: Path) -> None:
    admin_key = json.loads(run_cli("init", "--json", data_dir=tmp_path).stdout)["admin_key"]
    proc, url, log_path = start_server(tmp_path, wait=False)
    try:
        wait_alive(url)
        auth = {"Authorization": f"Bearer {admin_key}"}
        assert httpx.get(url + "/v1/models", headers=auth | {"x-request-id": "trace-models-1"}).status_code == 200
        leaked = "sk-" + "q" * 24
        assert httpx.get(url + f"/no/such/path?api_key={leaked}").status_code == 404  # matched no route: logged too
        assert httpx.get(url + "/v1/models", headers={"x-request-id": "trace-denied-1"}).status_code == 401
        deadline = time.monotonic() + 10
        while True:  # each line is written once its response has gone out
            lines = [json.loads(line) for line in log_path.read_text().splitlines() if '"appliance.access"' in line]
            if len(lines) >= 4 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        stop_server(proc)
    by_id = {line["request_id"]: line["msg"] for line in lines if line.get("request_id", "").startswith("trace-")}
    assert by_id["trace-models-1"].endswith('"GET /v1/models HTTP/1.1" 200 ' + by_id["trace-models-1"].split()[-1])
    assert '"GET /v1/models HTTP/1.1" 401 ' in by_id["trace-denied-1"]
    assert any('" 404 ' in line["msg"] and "/no/such/path" in line["msg"] for line in lines)
    assert sum('"GET /v1/models ' in line["msg"] for line in lines) == 2  # one line per request
    text = log_path.read_text()
    assert leaked not in text and "api_key=[API_KEY]" in text and admin_key not in text
