"""The model pool in a real server: the default model's file registered again under other
names with small contexts (real second engines), loaded on demand by a request, unloaded,
pinned and unpinned through the CLI (local admin socket) and over HTTP, refused when the
memory budget is too small, evicted to make room, unloaded when idle; pins kept across a
restart. Everything is polled; nothing depends on timing."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.memory_budget import memory_need
from appliance.model_pool import mb
from runtime.model_file import inspect_model
from tests.conftest import MODEL_NAME, init_data_dir, run_cli, start_server, stop_server, wait_alive, wait_ready

SECOND, BRIEF = "smol-second", "smol-brief"
SMALL = "slots = 1\nctx_per_slot = 256\n"
ROOMY = f"""[runtime]
slots = 2
ctx_per_slot = 512
idle_unload_seconds = 1

[auth]
failure_limit = 1000000

[[models]]
name = "{SECOND}"
{SMALL}idle_unload_seconds = 0

[[models]]
name = "{BRIEF}"
{SMALL}"""


@dataclass
class Live:
    data: Path
    url: str
    admin: str
    proc: Any

    def get(self, path: str, **params: Any) -> Any:
        r = httpx.get(self.url + path, params=params, headers=self._auth, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    def post(self, path: str, body: Any = None) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=self._auth, timeout=300)

    def model(self, name: str) -> dict[str, Any]:
        [entry] = [m for m in self.get("/admin/models")["data"] if m["name"] == name]
        return entry

    def chat(self, model: str) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4}
        return self.post("/v1/chat/completions", body)

    def records(self, kind: str) -> list[dict[str, Any]]:
        return [r["body"] for r in self.get("/admin/audit", kind=kind, limit=1000)["data"]]

    def cli(self, *args: str, check: bool = True) -> Any:
        return run_cli(*args, data_dir=self.data, check=check)

    @property
    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin}"}


def _until(check: Callable[[], Any], timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.2)


def _box(data: Path, model_path: Path, config: str, *spares: str, ready: bool = True) -> Live:
    (data / "appliance.toml").write_text(config)
    admin = init_data_dir(data, model_path)
    for name in spares:
        run_cli("models", "add", str(model_path), "--name", name, data_dir=data)
    proc, url, log_path = start_server(data, wait=False)
    if ready:
        wait_ready(url, proc, log_path)
    else:
        wait_alive(url)
    return Live(data, url, admin, proc)


@pytest.fixture(scope="module")
def roomy(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Live]:
    live = _box(tmp_path_factory.mktemp("pool-roomy"), model_path, ROOMY)
    yield live
    stop_server(live.proc)


def test_the_default_model_is_loaded_and_pinned_and_the_budget_is_shown(roomy: Live) -> None:
    status = roomy.get("/admin/models")
    [default] = status["data"]
    assert default["loaded"] and default["pinned"] and default["memory_bytes"] > 0
    assert default["idle_unload_seconds"] == 1 and default["last_used"] is not None
    ram, vram = status["budget"]["ram"], status["budget"]["vram"]
    assert ram["total_bytes"] > ram["free_bytes"] > 0 and ram["used_bytes"] == default["memory_bytes"]
    assert set(vram) == {"total_bytes", "used_bytes", "free_bytes"}
    assert "[loaded, pinned]" in roomy.cli("models", "list").stdout
    [listed] = json.loads(roomy.cli("models", "list", "--json").stdout)
    assert listed["loaded"] and listed["pinned"] and listed["memory_bytes"] == default["memory_bytes"]


def test_a_second_name_loads_on_demand_with_its_own_small_context(roomy: Live, model_path: Path) -> None:
    roomy.cli("models", "add", str(model_path), "--name", SECOND)  # while the server runs
    cold = roomy.model(SECOND)
    assert not cold["loaded"] and not cold["pinned"] and cold["last_used"] is None
    reply = roomy.chat(SECOND)
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == SECOND and reply.json()["choices"][0]["message"]["content"]
    warm = roomy.model(SECOND)
    assert warm["loaded"] and warm["memory_bytes"] > 0 and warm["last_used"] is not None
    assert warm["stats"]["slots"] == 1 and warm["stats"]["extra"]["n_ctx_per_slot"] == 256
    assert warm["memory_bytes"] < roomy.model(MODEL_NAME)["memory_bytes"]  # 1 x 256 tokens of KV cache, not 2 x 512
    loads = [r for r in roomy.records("system") if r.get("event") == "model.loaded"]
    assert [r["model"] for r in loads] == [SECOND]


def test_unload_pin_and_unpin_through_the_cli_and_over_http(roomy: Live) -> None:
    if not roomy.model(SECOND)["loaded"]:
        assert roomy.post(f"/admin/models/{SECOND}/load").status_code == 200
    out = roomy.cli("models", "unload", SECOND)
    assert out.stdout.strip() == f"{SECOND} is not loaded" and not roomy.model(SECOND)["loaded"]
    refused = roomy.cli("models", "unload", MODEL_NAME, check=False)
    assert refused.returncode == 1 and "pinned: unpin it first" in refused.stderr

    loaded = roomy.post(f"/admin/models/{SECOND}/load")
    assert loaded.status_code == 200 and loaded.json()["loaded"] and loaded.json()["evicted"] == []
    pinned = json.loads(roomy.cli("models", "pin", SECOND, "--json").stdout)
    assert pinned["pinned"] and pinned["loaded"]
    conflict = roomy.post(f"/admin/models/{SECOND}/unload")
    assert conflict.status_code == 409 and "unpin it first" in conflict.json()["error"]["message"]
    assert conflict.json()["error"]["code"] == "conflict"
    assert roomy.post(f"/admin/models/{SECOND}/unpin").json()["pinned"] is False
    unloaded = roomy.post(f"/admin/models/{SECOND}/unload")
    assert unloaded.status_code == 200 and unloaded.json()["loaded"] is False

    for action in ("load", "unload", "pin", "unpin"):
        missing = roomy.post(f"/admin/models/nope/{action}")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    missing_cli = roomy.cli("models", "pin", "nope", check=False)
    assert missing_cli.returncode == 1 and "nope" in missing_cli.stderr

    changes = [(r["action"], r["target"], r["actor"].get("kind", "key")) for r in roomy.records("admin")
               if r["action"].startswith("models.") and r["action"] != "models.add"]
    assert ("models.unload", SECOND, "local") in changes and ("models.pin", SECOND, "local") in changes
    assert ("models.unpin", SECOND, "key") in changes and ("models.load", SECOND, "key") in changes


def test_an_idle_unpinned_model_is_unloaded_and_the_pinned_default_stays(roomy: Live, model_path: Path) -> None:
    roomy.cli("models", "add", str(model_path), "--name", BRIEF)
    assert roomy.chat(BRIEF).status_code == 200
    assert roomy.model(BRIEF)["idle_unload_seconds"] == 1
    _until(lambda: not roomy.model(BRIEF)["loaded"])
    unloads = [r for r in roomy.records("system") if r.get("event") == "model.unloaded" and r["model"] == BRIEF]
    assert unloads and unloads[0]["reason"] == "idle for 1s"
    assert roomy.model(MODEL_NAME)["loaded"]  # idle as long, but pinned
    assert roomy.chat(BRIEF).status_code == 200  # and back on the next request


def test_pins_survive_a_restart(roomy: Live) -> None:
    roomy.cli("models", "pin", SECOND)
    assert roomy.post(f"/admin/models/{MODEL_NAME}/unpin").status_code == 200
    stop_server(roomy.proc)
    proc, url, log_path = start_server(roomy.data, wait=False)
    roomy.proc, roomy.url = proc, url
    wait_ready(url, proc, log_path)
    second, default = roomy.model(SECOND), roomy.model(MODEL_NAME)
    assert second["pinned"] and second["loaded"]  # pinned models load at start
    assert not default["pinned"] and default["loaded"]  # the rest too, while they fit
    roomy.cli("models", "pin", MODEL_NAME)
    roomy.cli("models", "unpin", SECOND)


def test_a_load_that_does_not_fit_is_refused_with_what_it_needs_and_what_is_free(
    tmp_path: Path, model_path: Path
) -> None:
    live = _box(tmp_path, model_path, "[runtime]\nmemory_budget_mb = 1\n", ready=False)
    try:
        status = live.get("/admin/models")
        [default] = status["data"]
        assert not default["loaded"] and "MB of RAM" in default["error"]
        assert status["budget"]["ram"]["total_bytes"] == 1 << 20
        assert httpx.get(live.url + "/readyz").status_code == 503
        for reply in (live.chat(MODEL_NAME), live.post(f"/admin/models/{MODEL_NAME}/load")):
            assert reply.status_code == 503 and reply.headers["retry-after"]
            error = reply.json()["error"]
            assert error["code"] == "insufficient_memory" and error["type"] == "server_error"
            need = mb(default["memory_bytes"])
            assert f"needs {need} MB of RAM" in error["message"]
            assert "only 1 MB of RAM is free (budget 1 MB" in error["message"]
            assert "memory_budget_mb" in error["message"]
    finally:
        stop_server(live.proc)


def test_an_idle_unpinned_model_is_evicted_to_make_room(tmp_path: Path, model_path: Path) -> None:
    info = inspect_model(model_path)
    need = memory_need(info.size_bytes, info.kv_cache_bytes(256)).total_bytes  # as the pool counts it
    config = f'[runtime]\n{SMALL}weights = "original"\nmemory_budget_mb = {int(mb(need) * 2.5)}\n'
    live = _box(tmp_path, model_path, config, "spare-1", "spare-2")
    try:
        assert [live.model(n)["loaded"] for n in (MODEL_NAME, "spare-1", "spare-2")] == [True, True, False]
        assert live.model(MODEL_NAME)["memory_bytes"] == need

        def load_spare_2() -> Any:  # spare-1 is evictable once no request has had it for a few seconds
            out = live.cli("models", "load", "spare-2", check=False)
            assert out.returncode == 0 or "spare-1 (in use)" in out.stderr, out.stderr
            return out.returncode == 0 and out.stdout

        assert "evicted spare-1 to make room" in _until(load_spare_2)
        assert [live.model(n)["loaded"] for n in (MODEL_NAME, "spare-1", "spare-2")] == [True, False, True]

        def ask_spare_1() -> bool:
            reply = live.chat("spare-1")
            assert reply.status_code in (200, 503), reply.text
            if reply.status_code == 503:
                message = reply.json()["error"]["message"]
                assert "spare-2 (in use)" in message and f"{MODEL_NAME} (pinned)" in message, message
            return reply.status_code == 200

        _until(ask_spare_1)
        assert [live.model(n)["loaded"] for n in (MODEL_NAME, "spare-1", "spare-2")] == [True, True, False]
        evictions = [r for r in live.records("system") if r.get("event") == "model.unloaded"]
        assert [(r["model"], r["reason"]) for r in evictions] == [
            ("spare-1", "evicted to make room for spare-2"),
            ("spare-2", "evicted to make room for spare-1"),
        ]
    finally:
        stop_server(live.proc)
