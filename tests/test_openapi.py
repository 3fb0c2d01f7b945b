"""The OpenAPI document describes the API exactly: schemathesis, with every check, as an admin
and as a user, finds nothing. It runs against the real app and HTTP server with `EchoEngine`
models on a throwaway database: thousands of generated requests, no real generations. The
admin run leaves out rotating and revoking keys, which would revoke its own (they have tests
of their own)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, run_cli, stop_server, wait_alive

SELF_DESTRUCTIVE = ("POST /admin/keys/{key_id}/rotate", "DELETE /admin/keys/{key_id}")


@pytest.fixture(scope="module")
def echo_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    data = tmp_path_factory.mktemp("openapi")
    admin = json.loads(run_cli("init", "--json", data_dir=data).stdout)["admin_key"]
    user = json.loads(run_cli("keys", "create", "--name", "st", "--json", data_dir=data).stdout)["key"]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.echo_server", "--data-dir", str(data), "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_alive(url)
    yield url, {"admin": admin, "user": user}
    stop_server(proc)


@pytest.mark.parametrize("role", ["admin", "user"])
def test_schemathesis_finds_no_failure(echo_app: tuple[str, dict[str, str]], role: str, tmp_path: Path) -> None:
    url, keys = echo_app
    excluded = [arg for name in SELF_DESTRUCTIVE for arg in ("--exclude-name", name)] if role == "admin" else []
    proc = subprocess.run(
        [
            sys.executable, "-m", "schemathesis.cli", "run", f"{url}/schema/openapi.json",
            "-H", f"Authorization: Bearer {keys[role]}",
            "--max-examples", "30", "--checks", "all", *excluded,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "generated" in proc.stdout
