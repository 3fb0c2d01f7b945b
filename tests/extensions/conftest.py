"""A real third-party plugin distribution (`sample_plugin/`), installed with pip into a
directory of its own, and servers that load it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, init_data_dir, run_cli, start_server, stop_server

SAMPLE = Path(__file__).parent / "sample_plugin"


@pytest.fixture(scope="session")
def sample_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where pip installed appliance-sample-plugin (put it on PYTHONPATH to load it)."""
    root = tmp_path_factory.mktemp("sample-plugin")
    source = root / "src"
    shutil.copytree(SAMPLE, source)  # pip builds in the tree: keep the checkout clean
    target = root / "site"
    # pip builds it as it would any sdist: in isolation, with setuptools from the package index.
    args = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps", "--target", str(target)]
    proc = subprocess.run([*args, str(source)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert list(target.glob("appliance_sample_plugin-0.3.1.dist-info"))
    return target


StartFn = Callable[..., Server]


@pytest.fixture
def plugin_server(tmp_path: Path, model_path: Path, sample_site: Path) -> Iterator[StartFn]:
    """`start(config_toml, env=...)`: a real server with the default model and the sample
    plugin installed; `config_toml` follows a small [runtime] section in appliance.toml."""
    started: list[Server] = []

    def start(config: str = "", *, env: dict[str, str] | None = None, user_args: tuple[str, ...] = ()) -> Server:
        data_dir = tmp_path / f"data-{len(started)}"
        data_dir.mkdir()
        admin_key = init_data_dir(data_dir, model_path)
        (data_dir / "appliance.toml").write_text("[runtime]\nslots = 2\nctx_per_slot = 1024\n" + config)
        user = json.loads(
            run_cli("keys", "create", "--name", "staff-app", "--role", "user", *user_args, "--json", data_dir=data_dir).stdout
        )
        full_env = {"PYTHONPATH": f"{sample_site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"} | (env or {})
        proc, url, log_path = start_server(data_dir, env=full_env)
        server = Server(url, data_dir, admin_key, user["key"], proc, log_path)
        server.env = full_env  # type: ignore[attr-defined]
        started.append(server)
        return server

    yield start
    for server in started:
        stop_server(server.process)


def chat(server: Server, content: str, *, key: str | None = None, stream: bool = False, tags: str | None = None,
         max_tokens: int = 8, **extra: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key or server.user_key}"}
    if tags:
        headers["x-appliance-tags"] = tags
    body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0, "stream": stream} | extra
    return httpx.post(server.base_url + "/chat/completions", json=body, headers=headers, timeout=120)


def admin(server: Server, method: str, path: str, **kwargs: object) -> httpx.Response:
    return httpx.request(method, server.url + path, headers={"Authorization": f"Bearer {server.admin_key}"},
                         timeout=60, **kwargs)  # type: ignore[arg-type]


def plugin_state(server: Server, name: str) -> dict[str, object]:
    listing = admin(server, "GET", "/admin/plugins").json()
    return next(p for p in listing["data"] if p["name"] == name)


def audit_records(server: Server, kind: str | None = None) -> list[dict[str, object]]:
    params = {"limit": 1000} | ({"kind": kind} if kind else {})
    response = admin(server, "GET", "/admin/audit", params=params)
    assert response.status_code == 200, response.text
    return response.json()["data"]


def request_record(server: Server, request_id: str, timeout: float = 10) -> dict[str, object]:
    """The request's audit record (written just after the response ends)."""
    deadline = time.monotonic() + timeout
    while True:
        for record in audit_records(server, "request"):
            if record["body"].get("request_id") == request_id:
                return record
        if time.monotonic() > deadline:
            raise AssertionError(f"no audit record for {request_id}")
        time.sleep(0.1)


def sse_events(response: httpx.Response) -> list[object]:
    events = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events
