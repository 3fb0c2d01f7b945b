"""The engine behind real HTTP: clients that disconnect free their slots and are still
accounted for, and a full queue answers 503 with Retry-After instead of queueing forever."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import MODEL_NAME, init_data_dir, run_cli, start_server, stop_server

LONG = {
    "model": MODEL_NAME,
    "messages": [{"role": "user", "content": "Write a very long story about a lighthouse."}],
    "max_tokens": 300,
    "temperature": 0,
}


@contextmanager
def _serve(data_dir: Path, model_path: Path, config: str) -> Iterator[tuple[str, str]]:
    key = init_data_dir(data_dir, model_path)
    (data_dir / "appliance.toml").write_text(config)
    proc, url, _ = start_server(data_dir)
    try:
        yield url, key
    finally:
        stop_server(proc)


def _engine_stats(url: str, key: str) -> dict:
    models = httpx.get(url + "/admin/models", headers={"Authorization": f"Bearer {key}"}).json()["data"]
    return models[0]["stats"]


def test_eight_disconnects_free_their_slots_and_are_accounted(tmp_path: Path, model_path: Path) -> None:
    with _serve(tmp_path, model_path, "[runtime]\nslots = 8\n") as (url, admin):
        user = json.loads(run_cli("keys", "create", "--name", "leaver", "--json", data_dir=tmp_path).stdout)
        budget = httpx.post(
            url + "/admin/budgets",
            headers={"Authorization": f"Bearer {admin}"},
            json={"scope": "key", "scope_id": user["id"], "amount": 1_000_000, "unit": "tokens", "period": "total"},
        )
        assert budget.status_code == 201

        async def leave_early() -> list[str]:
            async def one(client: httpx.AsyncClient) -> str:
                async with client.stream(
                    "POST",
                    url + "/v1/chat/completions",
                    json=LONG | {"stream": True},
                    headers={"Authorization": f"Bearer {user['key']}"},
                ) as r:
                    seen = 0
                    async for line in r.aiter_lines():
                        seen += line.startswith("data: ")
                        if seen >= 5:
                            break  # hang up mid-stream
                    return r.headers["x-request-id"]

            async with httpx.AsyncClient(timeout=60) as client:
                return await asyncio.gather(*(one(client) for _ in range(8)))

        request_ids = asyncio.run(leave_early())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _engine_stats(url, admin)["active_sequences"]:
            time.sleep(0.05)
        stats = _engine_stats(url, admin)
        assert stats["active_sequences"] == 0 and stats["queue_depth"] == 0

        # every hang-up is settled and recorded, with partial usage
        deadline = time.monotonic() + 10
        conn = sqlite3.connect(tmp_path / "appliance.db")
        while time.monotonic() < deadline:
            bodies = [json.loads(b) for (b,) in conn.execute("SELECT body FROM audit WHERE key_id = ?", (user["id"],))]
            if len(bodies) == 8:
                break
            time.sleep(0.1)
        assert sorted(b["request_id"] for b in bodies) == sorted(request_ids)
        assert all(b["outcome"] == "cancelled" for b in bodies)
        used = conn.execute(
            "SELECT COUNT(*), SUM(prompt_tokens + completion_tokens), MAX(completion_tokens) FROM usage WHERE key_id = ?",
            (user["id"],),
        ).fetchone()
        conn.close()
        assert used[0] == 8 and used[2] < LONG["max_tokens"]
        (status,) = [
            b
            for b in httpx.get(url + "/admin/budgets", headers={"Authorization": f"Bearer {admin}"}).json()["data"]
            if b["scope_id"] == user["id"]
        ]
        assert status["in_flight"] == 0 and status["spent"] == used[1]

        # the freed slots serve the next requests in full
        r = httpx.post(
            url + "/v1/chat/completions",
            json=LONG | {"max_tokens": 64},
            headers={"Authorization": f"Bearer {user['key']}"},
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 64


@pytest.mark.parametrize("config", ["[runtime]\nslots = 1\nqueue_limit = 1\n"])
def test_a_full_queue_answers_503_with_retry_after(tmp_path: Path, model_path: Path, config: str) -> None:
    with _serve(tmp_path, model_path, config) as (url, admin):

        async def flood() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(
                    *(
                        client.post(
                            url + "/v1/chat/completions",
                            json=LONG | {"max_tokens": 60},
                            headers={"Authorization": f"Bearer {admin}"},
                        )
                        for _ in range(6)
                    )
                )

        responses = asyncio.run(flood())
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(200) >= 2 and statuses.count(503) >= 1, statuses
        for r in responses:
            if r.status_code == 503:
                assert r.json()["error"]["code"] == "overloaded"
                assert int(r.headers["retry-after"]) >= 1
        conn = sqlite3.connect(tmp_path / "appliance.db")
        refused = [json.loads(b) for (b,) in conn.execute("SELECT body FROM audit WHERE body LIKE '%\"status\":503%'")]
        usage_rows = conn.execute("SELECT COUNT(*) FROM usage").fetchone()[0]
        conn.close()
        assert len(refused) == statuses.count(503) and all(b["error"] == "overloaded" for b in refused)
        assert usage_rows == statuses.count(200)  # a refusal costs nothing


def test_the_default_model_is_served_re_encoded_and_says_so(server) -> None:
    stats = _engine_stats(server.url, server.admin_key)
    registered = json.loads(run_cli("models", "list", "--json", data_dir=server.data_dir).stdout)[0]
    weights = stats["extra"]["weights"]
    assert weights["encoding"] == "q4_0_offsets" and weights["note"] == "" and weights["adapter_path"]
    assert weights["source_sha256"] == registered["sha256"] != weights["sha256"]
    assert Path(weights["path"]).parent == (server.data_dir / "models" / "encoded").resolve()


def test_weights_original_serves_the_registered_file(tmp_path: Path, model_path: Path) -> None:
    config = f'[runtime]\nslots = 2\n\n[[models]]\nname = "{MODEL_NAME}"\nweights = "original"\n'
    with _serve(tmp_path, model_path, config) as (url, key):
        weights = _engine_stats(url, key)["extra"]["weights"]
        assert weights["encoding"] == "original" and weights["sha256"] == weights["source_sha256"]
        assert Path(weights["path"]).parent == (tmp_path / "models").resolve()


def test_a_re_encoding_that_cannot_be_built_costs_speed_not_the_model(tmp_path: Path, model_path: Path) -> None:
    key = init_data_dir(tmp_path, model_path)
    encoded = tmp_path / "models" / "encoded"
    shutil.rmtree(encoded)
    encoded.write_text("a file where the cache directory should be")
    (tmp_path / "appliance.toml").write_text("[runtime]\nslots = 2\n")
    proc, url, log_path = start_server(tmp_path)
    try:
        weights = _engine_stats(url, key)["extra"]["weights"]
        assert weights["encoding"] == "original" and "cannot create" in weights["note"]
        reply = httpx.post(
            url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json=LONG | {"max_tokens": 4},
            timeout=60,
        )
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
    finally:
        stop_server(proc)
    assert "serving its file as it is" in log_path.read_text()
