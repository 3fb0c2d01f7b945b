"""Scale-out for real: a second appliance process on another port is the upstream of the first.
The front keeps auth, budgets and audit; the upstream's key never leaves its encrypted store;
a local-only request never reaches the upstream. Routes and upstreams are edited through the
CLI, which reaches the running front through its admin socket."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import MODEL_NAME, Server, free_port, init_data_dir, run_cli, start_server, stop_server
from tests.http_helpers import request_record
from tests.routing.conftest import admin, chat, sse_events

PEER_MODEL = f"peer/{MODEL_NAME}"


@dataclass
class Pair:
    front: Server
    peer: Server
    peer_key: str  # the front's credential at the peer: the secret that must never leak
    peer_key_id: str


def _site(tmp: Path, model_path: Path, name: str) -> Server:
    data_dir = tmp / name
    data_dir.mkdir()
    (data_dir / "appliance.toml").write_text("[runtime]\nslots = 2\nctx_per_slot = 1024\n")
    admin_key = init_data_dir(data_dir, model_path)
    user = json.loads(run_cli("keys", "create", "--name", "staff-app", "--role", "user", "--json", data_dir=data_dir).stdout)
    proc, url, log_path = start_server(data_dir)
    return Server(url, data_dir, admin_key, user["key"], proc, log_path)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Pair]:
    tmp = tmp_path_factory.mktemp("scale-out")
    peer = _site(tmp, model_path, "peer")
    front = _site(tmp, model_path, "front")
    created = json.loads(run_cli("keys", "create", "--name", "front-appliance", "--role", "user", "--json",
                                 data_dir=peer.data_dir).stdout)
    peer_key = created["key"]
    key_file = tmp / "peer.key"
    key_file.write_text(peer_key + "\n")
    out = run_cli("upstreams", "set", "peer", "--base-url", peer.base_url, "--model", MODEL_NAME, "--api-key-file",
                  str(key_file), "--prompt-price", "0.5", "--completion-price", "1.5", "--json", data_dir=front.data_dir)
    assert json.loads(out.stdout)["api_key"] == "set"
    key_file.unlink()
    yield Pair(front, peer, peer_key, created["id"])
    stop_server(front.process)
    stop_server(peer.process)


def _peer_requests(pair: Pair) -> int:
    """Requests the peer served for the front (its own admin reads are audited too, under another key)."""
    params = {"kind": "request", "limit": 1000, "key_id": pair.peer_key_id}
    return len(admin(pair.peer, "GET", "/admin/audit", params=params).json()["data"])


def test_the_cli_reached_the_running_front_through_its_socket(pair: Pair) -> None:
    listed = admin(pair.front, "GET", "/admin/upstreams").json()["data"]
    assert [(u["name"], u["models"], u["api_key"]) for u in listed] == [("peer", [MODEL_NAME], "set")]


def test_a_route_to_the_peer_is_served_by_it_and_governed_here(pair: Pair) -> None:
    run_cli("routes", "set", "remote", "--candidate", PEER_MODEL, data_dir=pair.front.data_dir)
    before = _peer_requests(pair)
    response = chat(pair.front, "remote", max_tokens=6)
    assert response.status_code == 200, response.text
    assert response.headers["x-appliance-model"] == PEER_MODEL
    assert response.headers["x-appliance-route"] == f"remote>{PEER_MODEL}"
    assert response.json()["choices"][0]["message"]["content"]
    assert _peer_requests(pair) == before + 1  # the peer really served it (and audited it too)
    row = _usage(pair.front)[PEER_MODEL]
    # Metered at the upstream's prices, on the tokens it reported. Its chat template adds
    # tokens the front cannot see, so the first reservation fell short (visible as unbilled)...
    expected = (row["prompt_tokens"] * 0.5 + row["completion_tokens"] * 1.5) / 1000
    assert row["cost"] + row["unbilled_cost"] == pytest.approx(expected, rel=1e-5)
    # ...and the next reservation covers it: the whole of the second request is billed.
    assert chat(pair.front, "remote", max_tokens=6).status_code == 200
    second = _usage(pair.front)[PEER_MODEL]
    assert second["unbilled_cost"] == pytest.approx(row["unbilled_cost"], abs=1e-9)
    assert second["cost"] > row["cost"]


def _usage(server: Server) -> dict[str, dict]:
    return {r["model"]: r for r in admin(server, "GET", "/admin/usage", params={"by": "model"}).json()["data"]}


def test_streaming_passes_through(pair: Pair) -> None:
    run_cli("routes", "set", "remote", "--candidate", PEER_MODEL, data_dir=pair.front.data_dir)
    response = chat(pair.front, "remote", stream=True, max_tokens=8)
    assert response.status_code == 200
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    assert any(e["choices"] and e["choices"][0]["delta"].get("content") for e in events[:-1] if isinstance(e, dict))


def test_local_only_requests_never_reach_the_peer(pair: Pair) -> None:
    run_cli("routes", "set", "mixed", "--candidate", PEER_MODEL, "--candidate", MODEL_NAME, data_dir=pair.front.data_dir)
    before = _peer_requests(pair)
    tagged = chat(pair.front, "mixed", tags="local-only")
    assert tagged.status_code == 200
    assert tagged.headers["x-appliance-model"] == MODEL_NAME
    run_cli("routes", "set", "private", "--candidate", PEER_MODEL, "--candidate", MODEL_NAME, "--local-only",
            data_dir=pair.front.data_dir)
    assert chat(pair.front, "private").headers["x-appliance-model"] == MODEL_NAME
    run_cli("routes", "set", "only-remote", "--candidate", PEER_MODEL, data_dir=pair.front.data_dir)
    refused = chat(pair.front, "only-remote", tags="local-only")
    assert refused.status_code == 404
    assert "local only" in refused.json()["error"]["message"]
    assert _peer_requests(pair) == before  # not one reached it
    assert chat(pair.front, "mixed").headers["x-appliance-model"] == PEER_MODEL  # untagged may go remote


def test_a_dead_peer_falls_back_to_the_local_model(pair: Pair, tmp_path: Path) -> None:
    run_cli("upstreams", "set", "gone", "--base-url", "http://127.0.0.1:9/v1", "--model", MODEL_NAME, "--retries", "2",
            "--timeout", "5", data_dir=pair.front.data_dir)
    run_cli("routes", "set", "resilient", "--candidate", f"gone/{MODEL_NAME}", "--candidate", MODEL_NAME,
            data_dir=pair.front.data_dir)
    response = chat(pair.front, "resilient")
    assert response.status_code == 200, response.text
    assert response.headers["x-appliance-route"] == f"resilient>gone/{MODEL_NAME}; fallback:error>{MODEL_NAME}"
    # With the local model next, the refused connection was not retried with backoff first;
    # as a route's only candidate the same upstream is (retries are for when nothing else can serve).
    def retries() -> list[str]:
        return [line for line in pair.front.log_path.read_text().splitlines()
                if f"gone/{MODEL_NAME}: cannot reach upstream gone" in line and "; retry " in line]

    assert retries() == []
    run_cli("routes", "set", "fragile", "--candidate", f"gone/{MODEL_NAME}", data_dir=pair.front.data_dir)
    alone = chat(pair.front, "fragile")
    assert alone.status_code == 503, alone.text
    assert len(retries()) == 2, retries()


def test_a_dead_upstream_keeps_its_retries_when_the_next_candidates_breaker_is_open(pair: Pair) -> None:
    front = pair.front
    for name, retries in (("dead-a", "2"), ("dead-b", "0")):
        run_cli("upstreams", "set", name, "--base-url", f"http://127.0.0.1:{free_port()}/v1", "--model", MODEL_NAME,
                "--retries", retries, "--timeout", "5", data_dir=front.data_dir)
    run_cli("routes", "set", "only-b", "--candidate", f"dead-b/{MODEL_NAME}", data_dir=front.data_dir)
    run_cli("routes", "set", "a-then-b", "--candidate", f"dead-a/{MODEL_NAME}", "--candidate", f"dead-b/{MODEL_NAME}",
            data_dir=front.data_dir)
    for _ in range(5):  # breaker_failures = 5 (the default): dead-b's breaker opens
        assert chat(front, "only-b").status_code == 503
    breaker = admin(front, "GET", "/admin/routes/a-then-b").json()["breakers"][f"dead-b/{MODEL_NAME}"]
    assert breaker["state"] == "open", breaker

    response = chat(front, "a-then-b")
    assert response.status_code == 503, response.text
    trail = request_record(front, response.headers["x-request-id"])["body"]["route_trail"]  # type: ignore[index]
    assert trail == f"a-then-b>dead-a/{MODEL_NAME}; fallback:error; skip:breaker_open(dead-b/{MODEL_NAME})"
    # Nothing else could serve, so dead-a was retried as the last candidate would be.
    retried = [line for line in front.log_path.read_text().splitlines()
               if f"dead-a/{MODEL_NAME}: cannot reach upstream dead-a" in line and "; retry " in line]
    assert len(retried) == 2, retried


def test_the_peer_key_is_never_in_a_response_log_or_audit_record(pair: Pair) -> None:
    chat(pair.front, "remote")
    front = pair.front
    texts = [
        admin(front, "GET", "/admin/upstreams").text,
        admin(front, "GET", "/admin/routes").text,
        admin(front, "GET", "/admin/audit", params={"limit": 1000}).text,
        run_cli("upstreams", "list", "--json", data_dir=front.data_dir).stdout,
        run_cli("audit", "export", data_dir=front.data_dir, check=False).stdout,
        front.log_text(),
    ]
    for text in texts:
        assert pair.peer_key not in text
    for path in front.data_dir.rglob("*"):
        if path.is_file() and path.suffix not in (".gguf",) and path.stat().st_size < 50_000_000:
            assert pair.peer_key.encode() not in path.read_bytes(), path
    secret_key = front.data_dir / "keys" / "upstreams.fernet"
    assert oct(os.stat(secret_key).st_mode & 0o777) == "0o600"


def test_there_is_no_per_request_base_url(pair: Pair) -> None:
    """Only an admin names an upstream's URL: a request that tries is refused, as OpenAI refuses
    unknown arguments, and nothing is sent anywhere."""
    before = _peer_requests(pair)
    response = httpx.post(
        pair.front.base_url + "/chat/completions",
        json={"model": "remote", "messages": [{"role": "user", "content": "hi"}], "base_url": "http://169.254.169.254/"},
        headers={"Authorization": f"Bearer {pair.front.user_key}"},
        timeout=60,
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "base_url"
    assert _peer_requests(pair) == before


def test_only_an_admin_sets_an_upstream(pair: Pair) -> None:
    operator = json.loads(run_cli("keys", "create", "--name", "ops", "--role", "operator", "--json",
                                  data_dir=pair.front.data_dir).stdout)["key"]
    response = httpx.put(pair.front.url + "/admin/upstreams/evil", json={"base_url": "http://10.0.0.1/v1", "models": ["x"]},
                         headers={"Authorization": f"Bearer {operator}"}, timeout=30)
    assert response.status_code == 403


def test_routes_cli_lists_shows_explains_and_deletes_through_the_socket(pair: Pair) -> None:
    data_dir = pair.front.data_dir
    run_cli("routes", "set", "cli-route", "--candidate", PEER_MODEL, "--candidate", MODEL_NAME, "--description", "via cli",
            data_dir=data_dir)
    listed = {r["name"]: r for r in json.loads(run_cli("routes", "list", "--json", data_dir=data_dir).stdout)}
    assert [c["model"] for c in listed["cli-route"]["candidates"]] == [PEER_MODEL, MODEL_NAME]
    assert set(listed["cli-route"]["breakers"]) == {PEER_MODEL, MODEL_NAME}  # only the running server knows them
    shown = json.loads(run_cli("routes", "show", "cli-route", data_dir=data_dir).stdout)
    assert shown["description"] == "via cli"
    explained = run_cli("routes", "explain", "--model", "cli-route", "--prompt", "hello", data_dir=data_dir).stdout
    assert f"trail:      cli-route>{PEER_MODEL}" in explained
    private = run_cli("routes", "explain", "--model", "cli-route", "--prompt", "hello", "--tags", "local-only",
                      data_dir=data_dir).stdout
    assert f"trail:      cli-route>{MODEL_NAME}" in private and f"skipped:    {PEER_MODEL}: local only" in private
    run_cli("routes", "delete", "cli-route", data_dir=data_dir)
    assert chat(pair.front, "cli-route").status_code == 404  # the running server saw the change at once
    missing = run_cli("routes", "show", "cli-route", data_dir=data_dir, check=False)
    assert missing.returncode != 0 and "no route named 'cli-route'" in missing.stderr
    actions = [r["body"]["action"] for r in admin(pair.front, "GET", "/admin/audit", params={"kind": "admin", "limit": 1000})
               .json()["data"] if r["body"].get("target") == "cli-route"]
    assert actions == ["routes.set", "routes.delete"]


def test_no_canary_secret_reaches_a_log_a_metric_an_error_or_a_check_finding(pair: Pair) -> None:
    """Traffic with a canary key (the front's staff key) through a canary upstream secret (the
    front's key at the peer), failures included; then every check runs and /metrics is
    scraped. Neither secret is in any of it."""
    front, canary_key = pair.front, pair.front.user_key
    run_cli("routes", "set", "remote", "--candidate", PEER_MODEL, data_dir=front.data_dir)
    said = [chat(front, "remote").text, chat(front, MODEL_NAME, stream=True).text, chat(front, "no-such-model").text]
    for bad in (canary_key + "x", canary_key[:-1], f"{canary_key} {canary_key}"):
        said.append(httpx.get(front.base_url + "/models", headers={"Authorization": f"Bearer {bad}"}, timeout=30).text)
    said.append(httpx.post(front.base_url + "/chat/completions", content=b"{" + canary_key.encode(),
                           headers={"Authorization": f"Bearer {canary_key}"}, timeout=30).text)
    checks = [c["name"] for c in admin(front, "GET", "/admin/checks").json()["data"]]
    assert {"canary", "upstreams", "host", "sqlite", "audit_chain"} <= set(checks)
    runs = [admin(front, "POST", f"/admin/checks/{name}/run").json() for name in checks]
    upstreams = next(r for r in runs if r["check"] == "upstreams")
    assert {f["subject"]: f["status"] for f in upstreams["findings"]}.get("peer") == "ok"  # it used the key
    metrics = admin(front, "GET", "/metrics")
    assert metrics.status_code == 200 and "appliance_requests_total" in metrics.text
    texts = [
        *said, json.dumps(runs), metrics.text, admin(front, "GET", "/admin/checks/history", params={"limit": 1000}).text,
        admin(front, "GET", "/admin/alerts").text, front.log_text(), pair.peer.log_text(),
    ]
    for text in texts:
        for secret in (canary_key, pair.peer_key, front.admin_key):
            assert secret not in text
            assert secret.split("_", 2)[-1] not in text  # nor its secret part (apl_<id>_<secret>; a secret may hold "_")
