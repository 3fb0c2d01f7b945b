"""A real third-party plugin distribution (`sample_plugin/`), installed with pip into a
directory of its own, and servers that load it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, init_data_dir, run_cli, start_server, stop_server
from tests.http_helpers import admin, audit_records, request_record, sse_events

__all__ = ["StartFn", "admin", "audit_records", "chat", "plugin_state", "request_record", "sse_events"]

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


def plugin_state(server: Server, name: str) -> dict[str, object]:
    listing = admin(server, "GET", "/admin/plugins").json()
    return next(p for p in listing["data"] if p["name"] == name)


