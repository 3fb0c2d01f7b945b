"""A routing site: the default model registered three times (the default, a spare and one with a
tiny context), Gemma 3 270M as the costlier completion model, and `FaultyEngine`s (`broken`,
`slow`) whose faults a test sets live, all served by one real process (`tests.fault_server`)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import MODEL_NAME, REPO, Server, free_port, init_data_dir, run_cli, stop_server, wait_ready
from tests.http_helpers import admin, request_record, sse_events

GEMMA = REPO / ".cache" / "models" / "gemma-3-270m-q4_k_m.gguf"
SPARE, TINY, GEMMA_NAME = "smollm2-spare", "smollm-tiny", "gemma-270m"

SITE_CONFIG = """
[runtime]
slots = 2
ctx_per_slot = 1024

[[models]]
name = "smollm-tiny"
ctx_per_slot = 128

[routing]
breaker_failures = 3
breaker_window_seconds = 60
breaker_cooldown_seconds = 5

[auth]
failure_limit = 1000000

[[plugins.keyword_router.rules]]
name = "escalate"
literal = "ESCALATE"
to = ["smollm2-spare"]
only_for = ["helpdesk"]
"""


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    if not GEMMA.exists():
        pytest.fail(f"Gemma 3 270M missing at {GEMMA}: run ./install.sh --dev")
    return GEMMA


class Site(Server):
    faults: Path

    def fault(self, engine: str, **knobs: Any) -> None:
        """Set `engine`'s faults (read on its next request); no knobs: healthy again."""
        (self.faults / f"{engine}.json").write_text(json.dumps(knobs))

    def calls(self, engine: str) -> int:
        path = self.faults / f"{engine}.calls"
        return int(path.read_text()) if path.exists() else 0


def start_fault_server(data_dir: Path, faulty: list[str]) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    log_path = data_dir / f"fault-server-{port}.log"
    args = [sys.executable, "-m", "tests.fault_server", "--data-dir", str(data_dir), "--port", str(port)]
    for name in faulty:
        args += ["--faulty", name]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, log_path, timeout=180)
    return proc, url, log_path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, model_path: Path, gemma_path: Path) -> Iterator[Site]:
    data_dir = tmp_path_factory.mktemp("routing-site")
    (data_dir / "appliance.toml").write_text(SITE_CONFIG)
    admin_key = init_data_dir(data_dir, model_path)
    for path, name in ((model_path, SPARE), (model_path, TINY), (gemma_path, GEMMA_NAME)):
        run_cli("models", "add", str(path), "--name", name, data_dir=data_dir)
    user = json.loads(run_cli("keys", "create", "--name", "staff-app", "--role", "user", "--json", data_dir=data_dir).stdout)
    proc, url, log_path = start_fault_server(data_dir, ["broken", "slow"])
    site = Site(url, data_dir, admin_key, user["key"], proc, log_path)
    site.faults = data_dir / "faults"
    yield site
    stop_server(proc)


def put_route(server: Server, name: str, candidates: list[Any], **spec: Any) -> dict[str, Any]:
    body = {"candidates": [c if isinstance(c, dict) else {"model": c} for c in candidates]} | spec
    response = admin(server, "PUT", f"/admin/routes/{name}", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def chat(server: Server, model: str, content: str = "Say hello.", *, key: str | None = None, stream: bool = False,
         tags: str | None = None, max_tokens: int = 8, **extra: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key or server.user_key}"}
    if tags:
        headers["x-appliance-tags"] = tags
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream} | extra
    return httpx.post(server.base_url + "/chat/completions", json=body, headers=headers, timeout=120)


def complete(server: Server, model: str, prompt: str, *, max_tokens: int = 8, **extra: Any) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0} | extra
    return httpx.post(server.base_url + "/completions", json=body,
                      headers={"Authorization": f"Bearer {server.user_key}"}, timeout=120)


__all__ = ["MODEL_NAME", "SPARE", "TINY", "GEMMA_NAME", "Site", "admin", "put_route", "chat", "complete", "request_record",
           "sse_events"]
