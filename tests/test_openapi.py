"""The OpenAPI document describes the API exactly: schemathesis, with every check, as an admin
and as a user, finds nothing. It runs against the real app and HTTP server with `EchoEngine`
models on a throwaway database: thousands of generated requests, no real generations. The
admin run leaves out rotating and revoking keys, which would revoke its own (they have tests
of their own)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, free_port, run_cli, stop_server, wait_alive

SELF_DESTRUCTIVE = ("POST /admin/keys/{key_id}/rotate", "DELETE /admin/keys/{key_id}")
# The statuses that count as refusing a request the schema forbids: schemathesis's own, less
# 5xx, plus 413. A string past `maxLength` can also be a body past the server's limit (an
# over-long prompt of "Ð", JSON-escaped to 6 bytes a character, is 6 MB), and a 413 in the
# OpenAI shape is the right refusal of it.
REJECTIONS = """
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]
"""


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


def _operations_with_a_body(doc: dict[str, Any]) -> list[tuple[str, str]]:
    with_body = [(m, p) for p, ops in doc["paths"].items() for m, op in ops.items() if "requestBody" in op]
    return [*with_body, ("post", "/admin/plugins/{name}/routes/{path}")]  # reads a body it cannot describe


def test_every_operation_with_a_body_documents_the_413_it_can_return(echo_app: tuple[str, dict[str, str]]) -> None:
    # Runs before schemathesis, whose admin run may expire any key it finds. It found this: a
    # prompt within `maxLength` of emoji, JSON-escaped to 12 bytes a character, is 12 MB, past
    # the 4 MiB body limit, and drew a 413 the document did not list.
    url, keys = echo_app
    auth = {"Authorization": f"Bearer {keys['admin']}"}
    r = httpx.get(f"{url}/schema/openapi.json", headers=auth)
    assert r.status_code == 200, r.text
    doc = r.json()
    with_body = _operations_with_a_body(doc)
    assert ("post", "/admin/routes/explain") in with_body and len(with_body) > 10
    undocumented = [f"{m.upper()} {p}" for m, p in with_body if "413" not in doc["paths"][p][m]["responses"]]
    assert undocumented == []
    assert doc["paths"]["/admin/routes/explain"]["post"]["responses"]["413"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"
    }
    prompt_limit = doc["components"]["schemas"]["ExplainRequest"]["properties"]["prompt"]["maxLength"]
    body = json.dumps({"model": "auto", "prompt": "\U0001f600" * prompt_limit}).encode()
    assert len(body) > 4 * 1024 * 1024
    r = httpx.post(f"{url}/admin/routes/explain", headers=auth | {"content-type": "application/json"}, content=body, timeout=60)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"
    assert httpx.get(f"{url}/healthz").status_code == 200


def test_a_body_that_is_not_utf8_is_a_400_on_every_operation_that_takes_one(echo_app: tuple[str, dict[str, str]]) -> None:
    # Schemathesis found this: msgspec raises UnicodeDecodeError, not its DecodeError, for bytes
    # that are not UTF-8, and every operation with a body answered 500.
    url, keys = echo_app
    auth = {"Authorization": f"Bearer {keys['admin']}", "content-type": "application/json"}
    doc = httpx.get(f"{url}/schema/openapi.json", headers=auth).json()
    answers = {}
    for method, path in _operations_with_a_body(doc):
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        r = httpx.request(method, f"{url}{concrete}", headers=auth, content=b'{"model": "v\xff!\xff"}')
        answers[f"{method.upper()} {path}"] = (r.status_code, r.json()["error"]["type"], "UTF-8" in r.json()["error"]["message"])
    assert {op: a for op, a in answers.items() if a != (400, "invalid_request_error", True)} == {}
    assert len(answers) > 10
    assert httpx.get(f"{url}/healthz").status_code == 200


@pytest.mark.parametrize("role", ["user", "admin"])  # admin last: it may expire any key
def test_schemathesis_finds_no_failure(echo_app: tuple[str, dict[str, str]], role: str, tmp_path: Path) -> None:
    url, keys = echo_app
    excluded = [arg for name in SELF_DESTRUCTIVE for arg in ("--exclude-name", name)] if role == "admin" else []
    config = tmp_path / "schemathesis.toml"
    config.write_text(REJECTIONS)
    proc = subprocess.run(
        [
            sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", f"{url}/schema/openapi.json",
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
