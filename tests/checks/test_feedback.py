"""The feedback loop over a real server and model: `POST /v1/feedback` by the key that made the
request (or an admin), stored with its own audit record and linked to the request's through
`audit_responses`; the errors for bad input; `/admin/feedback` and `appliance feedback list`;
the export of prompt, answer and correction triples; and `appliance drift promote`."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from appliance.audit.retention import sha256_text
from appliance.feedback import MAX_FEEDBACK_CHARS
from appliance.feedback_promotion import messages_of
from tests.conftest import MODEL_NAME, Server, init_data_dir, own_server, run_cli, start_server, stop_server
from tests.http_helpers import admin, request_record

CHAT = {
    "model": MODEL_NAME,
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    "max_tokens": 8,
    "temperature": 0,
}
COMPLETION = {"model": MODEL_NAME, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}
KEEP_ALL = ("--prompt-retention", "full", "--answer-retention", "full")


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Server]:
    with own_server(tmp_path_factory.mktemp("feedback"), model_path, "[runtime]\nslots = 2\nctx_per_slot = 1024\n") as server:
        yield server


def _key(server: Server, *args: str) -> dict[str, Any]:
    return json.loads(run_cli("keys", "create", "--name", "fb", *args, "--json", data_dir=server.data_dir).stdout)


def _auth(key: dict[str, Any] | str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key if isinstance(key, str) else key['key']}"}


def _ask(server: Server, key: dict[str, Any], body: dict[str, Any] = CHAT) -> httpx.Response:
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    r = httpx.post(server.url + path, json=body, headers=_auth(key), timeout=120)
    assert r.status_code == 200, r.text
    return r


def _rate(server: Server, key: dict[str, Any] | str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + "/v1/feedback", json=body, headers=_auth(key), timeout=60)


def _db(server: Server) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{server.data_dir / 'appliance.db'}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    return conn


def _audit(server: Server, idx: int) -> dict[str, Any]:
    r = admin(server, "GET", "/admin/audit", params={"after": idx - 1, "limit": 1})
    assert r.status_code == 200, r.text
    return r.json()["data"][0]


def test_chat_feedback_is_stored_audited_and_linked_to_the_request(srv: Server) -> None:
    key = _key(srv, *KEEP_ALL)
    r = _ask(srv, key)
    response_id = r.json()["id"]
    request = request_record(srv, r.headers["x-request-id"])
    correction = "Paris. Write to paris@example.org for more."
    given = _rate(srv, key, {"id": response_id, "rating": "down", "correction": correction, "comment": "too vague"})
    assert given.status_code == 201, given.text
    fb = given.json()
    assert fb["id"].startswith("fb-") and fb["object"] == "feedback"
    assert (fb["response_id"], fb["rating"], fb["score"]) == (response_id, "down", 0.0) and fb["created_at"]

    with _db(srv) as db:
        (linked,) = db.execute("SELECT idx FROM audit_responses WHERE response_id = ?", (response_id,)).fetchone()
        row = dict(db.execute("SELECT * FROM feedback WHERE id = ?", (fb["id"],)).fetchone())
    assert linked == request["idx"] and request["body"]["response_id"] == response_id
    assert (row["request_idx"], row["key_id"], row["model"], row["rating"]) == (
        request["idx"],
        key["id"],
        MODEL_NAME,
        "down",
    )
    assert row["correction"] is None and row["comment"] is None  # kept beside the audit record, erasable there

    record = _audit(srv, row["audit_idx"])
    body = record["body"]
    assert record["kind"] == "admin" and record["key_id"] == key["id"]
    assert (body["action"], body["target"], body["request_id"]) == (
        "feedback.create",
        fb["id"],
        given.headers["x-request-id"],
    )
    assert body["after"]["score"] == 0.0 and body["after"]["request_idx"] == request["idx"]
    assert body["after"]["response_id"] == response_id and body["after"]["has_correction"] is True
    assert body["correction"] == {"kept": "full", "sha256": sha256_text(correction)}
    assert record["content"] == {"correction": correction, "comment": "too vague"}
    assert correction not in json.dumps(body)
    # The feedback request needs no request record of its own: the admin record is it.
    assert not [a for a in _requests(srv) if a["body"]["request_id"] == given.headers["x-request-id"]]

    shown = admin(srv, "GET", f"/admin/feedback/{fb['id']}").json()
    assert shown["correction"] == correction and shown["kind"] == "chat" and shown["current"] is True
    assert shown["kept"] == {"prompt": "full", "answer": "full", "correction": "full", "comment": "full"}


def test_completion_feedback_keeps_each_and_the_newest_is_the_rating(srv: Server) -> None:
    key = _key(srv)
    response_id = _ask(srv, key, COMPLETION).json()["id"]
    assert response_id.startswith("cmpl-")
    first = _rate(srv, key, {"id": response_id, "rating": 4})
    second = _rate(srv, key, {"id": response_id, "rating": 1, "comment": "changed my mind"})
    assert first.status_code == second.status_code == 201
    assert (first.json()["rating"], first.json()["score"], second.json()["score"]) == (4, 0.75, 0.0)
    listed = admin(srv, "GET", "/admin/feedback", params={"limit": 1000}).json()["data"]
    mine = [(f["id"], f["rating"], f["current"], f["kind"]) for f in listed if f["response_id"] == response_id]
    assert mine == [(second.json()["id"], 1, True, "completion"), (first.json()["id"], 4, False, "completion")]
    stars = admin(srv, "GET", "/admin/feedback", params={"rating": "4"}).json()["data"]
    assert first.json()["id"] in [f["id"] for f in stars] and all(f["rating"] == 4 for f in stars)
    # Default retention: a digest of the prompt, no answer, and a comment under the answer policy (none).
    shown = admin(srv, "GET", f"/admin/feedback/{second.json()['id']}").json()
    assert shown["kept"] == {"prompt": "sha256", "answer": "none", "correction": "absent", "comment": "none"}
    assert shown["comment"] is None


def test_only_the_requests_own_key_or_an_admin_may_rate_it(srv: Server) -> None:
    owner, other = _key(srv), _key(srv)
    auditor = _key(srv, "--role", "auditor")
    response_id = _ask(srv, owner).json()["id"]
    unknown = _rate(srv, other, {"id": "chatcmpl-" + "0" * 32, "rating": "up"})
    assert unknown.status_code == 404
    for stranger in (other, auditor):
        refused = _rate(srv, stranger, {"id": response_id, "rating": "up"})
        assert refused.status_code == 404  # as for an unknown id: ids cannot be probed
        assert refused.json()["error"] | {"message": ""} == unknown.json()["error"] | {"message": ""}
        assert refused.json()["error"]["param"] == "id"
    assert _rate(srv, srv.admin_key, {"id": response_id, "rating": "up"}).status_code == 201
    assert _rate(srv, owner, {"id": response_id, "rating": 5}).status_code == 201
    assert httpx.post(srv.url + "/v1/feedback", json={"id": response_id, "rating": "up"}, timeout=30).status_code == 401


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"rating": "up"}, 400, "id"),
        ({"id": "x"}, 400, "rating"),
        ({"id": "x", "rating": "sideways"}, 400, "rating"),
        ({"id": "x", "rating": 0}, 400, "rating"),
        ({"id": "x", "rating": 6}, 400, "rating"),
        ({"id": "x", "rating": 2.5}, 400, "rating"),
        ({"id": "x", "rating": True}, 400, "rating"),
        ({"id": "x", "rating": "3"}, 400, "rating"),
        ({"id": "", "rating": "up"}, 400, "id"),
        ({"id": "x", "rating": "up", "correction": "c" * (MAX_FEEDBACK_CHARS + 1)}, 400, "correction"),
        ({"id": "x", "rating": "up", "comment": "c" * (MAX_FEEDBACK_CHARS + 1)}, 400, "comment"),
        ({"id": "x", "rating": "up", "score": 1}, 400, "score"),
        ({"id": "x", "rating": "up"}, 404, "id"),
    ],
)
def test_bad_feedback_gets_openai_shaped_errors(srv: Server, body: dict[str, Any], status: int, param: str) -> None:
    r = _rate(srv, srv.admin_key, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param and error["message"]


def test_a_body_over_the_server_limit_is_413(srv: Server) -> None:
    r = _rate(srv, srv.admin_key, {"id": "x", "rating": "up", "comment": "c" * (5 * 1024 * 1024)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_embeddings_have_no_response_id(srv: Server) -> None:
    r = httpx.post(
        srv.url + "/v1/embeddings",
        json={"model": MODEL_NAME, "input": "hello"},
        headers=_auth(srv.admin_key),
        timeout=60,
    )
    assert r.status_code == 200, r.text
    record = request_record(srv, r.headers["x-request-id"])
    assert "response_id" not in record["body"]
    with _db(srv) as db:
        assert db.execute("SELECT COUNT(*) FROM audit_responses WHERE idx = ?", (record["idx"],)).fetchone()[0] == 0


def test_feedback_admin_routes_need_a_role(srv: Server) -> None:
    user = _key(srv)
    for path in ("/admin/feedback", "/admin/feedback/export", "/admin/feedback/fb-x"):
        assert httpx.get(srv.url + path, headers=_auth(user), timeout=30).status_code == 403
    operator = _key(srv, "--role", "operator")
    assert httpx.get(srv.url + "/admin/feedback", headers=_auth(operator), timeout=30).status_code == 200
    assert httpx.get(srv.url + "/admin/feedback/export", headers=_auth(operator), timeout=30).status_code == 403
    assert admin(srv, "GET", "/admin/feedback/fb-nope").status_code == 404
    assert admin(srv, "GET", "/admin/feedback", params={"since": "yesterday"}).json()["error"]["param"] == "since"


def test_list_cli(srv: Server) -> None:
    key = _key(srv, *KEEP_ALL)
    response_id = _ask(srv, key, COMPLETION).json()["id"]
    fb = _rate(srv, key, {"id": response_id, "rating": 2, "correction": "Paris."}).json()
    listed = json.loads(
        run_cli("feedback", "list", "--rating", "2", "--since", "1h", "--json", data_dir=srv.data_dir).stdout
    )
    assert [f["id"] for f in listed] == [fb["id"]] and listed[0]["correction"] == "Paris."
    text = run_cli("feedback", "list", "--model", MODEL_NAME, data_dir=srv.data_dir).stdout
    assert fb["id"] in text and "prompt:full" in text
    assert (
        run_cli("feedback", "list", "--model", "no-such-model", data_dir=srv.data_dir).stdout.strip() == "no feedback"
    )


def test_export_writes_triples_and_says_what_was_missing(srv: Server, tmp_path: Path) -> None:
    keeper, plain = _key(srv, *KEEP_ALL), _key(srv)
    kept_id = _ask(srv, keeper).json()["id"]
    plain_id = _ask(srv, plain, COMPLETION).json()["id"]
    kept_fb = _rate(srv, keeper, {"id": kept_id, "rating": "down", "correction": "Paris."}).json()
    plain_fb = _rate(srv, plain, {"id": plain_id, "rating": "up", "correction": "Paris, of course."}).json()
    out = tmp_path / "triples.jsonl"
    proc = run_cli("feedback", "export", "--format", "jsonl", "--out", str(out), data_dir=srv.data_dir)
    lines = {line["feedback_id"]: line for line in map(json.loads, out.read_text().splitlines())}
    assert all("summary" not in line for line in lines.values())
    whole = lines[kept_fb["id"]]
    answer = request_record(srv, _request_id_of(srv, kept_id))["content"]["answer"]
    assert whole["prompt"] == "system: Be brief.\nuser: What is the capital of France?"
    assert whole["messages"] == CHAT["messages"] and whole["answer"] == answer and whole["correction"] == "Paris."
    assert (whole["missing"], whole["rating"], whole["model"], whole["response_id"]) == (
        [],
        "down",
        MODEL_NAME,
        kept_id,
    )
    part = lines[plain_fb["id"]]
    assert (part["prompt"], part["answer"], part["correction"]) == (None, None, None)
    assert part["missing"] == ["prompt", "answer", "correction"]
    assert part["kept"] == {"prompt": "sha256", "answer": "none", "correction": "none"}
    assert "missing" in proc.stderr and "prompt" in proc.stderr and "sha256" in proc.stderr
    assert f"exported {len(lines)} rated responses" in proc.stderr

    r = admin(srv, "GET", "/admin/feedback/export", params={"format": "jsonl"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    http_lines = [json.loads(line) for line in r.text.splitlines()]
    summary = http_lines[-1]["summary"]
    assert summary["lines"] == len(http_lines) - 1 == len(lines)
    assert summary["missing"]["answer"]["none"] >= 1 and summary["complete"] >= 1


def test_promote_writes_a_golden_case_and_refuses_what_was_not_kept(srv: Server) -> None:
    keeper, plain = _key(srv, *KEEP_ALL), _key(srv)
    response_id = _ask(srv, keeper).json()["id"]
    fb = _rate(
        srv, keeper, {"id": response_id, "rating": "down", "correction": "Paris is the capital of France."}
    ).json()
    done = json.loads(
        run_cli("drift", "promote", fb["id"], "--set", "capitals", "--json", data_dir=srv.data_dir).stdout
    )
    path = srv.data_dir / "golden" / "capitals.yaml"
    assert done["path"] == str(path) and done["case_id"] == fb["id"]
    doc = yaml.safe_load(path.read_text())
    assert (doc["name"], doc["target"]) == ("capitals", MODEL_NAME)
    assert doc["cases"] == [
        {
            "id": fb["id"],
            "messages": CHAT["messages"],
            "model": MODEL_NAME,
            "reference": "Paris is the capital of France.",
            "assert": {"similarity": True},
        }
    ]
    assert admin(srv, "GET", f"/admin/feedback/{fb['id']}").json()["promoted_to"] == "capitals"
    promotions = [
        a
        for a in admin(srv, "GET", "/admin/audit", params={"kind": "admin", "limit": 10_000}).json()["data"]
        if a["body"]["action"] == "feedback.promote"
    ]
    assert [(p["body"]["target"], p["body"]["after"]["set"]) for p in promotions] == [(fb["id"], "capitals")]
    assert promotions[0]["body"]["actor"]["kind"] == "local"  # the CLI went through the admin socket

    again = admin(srv, "POST", f"/admin/feedback/{fb['id']}/promote", json={"set": "capitals"})
    assert again.status_code == 409 and "promoted already" in again.json()["error"]["message"]
    # A second feedback on another response: a case id that exists is refused, a new one appended.
    other = _rate(
        srv, keeper, {"id": _ask(srv, keeper, COMPLETION).json()["id"], "rating": 1, "correction": "Paris."}
    ).json()
    clash = admin(srv, "POST", f"/admin/feedback/{other['id']}/promote", json={"set": "capitals", "case_id": fb["id"]})
    assert clash.status_code == 409 and clash.json()["error"]["param"] == "case_id"
    added = admin(srv, "POST", f"/admin/feedback/{other['id']}/promote", json={"set": "capitals", "case_id": "paris-2"})
    assert added.status_code == 201, added.text
    cases = yaml.safe_load(path.read_text())["cases"]
    assert [c["id"] for c in cases] == [fb["id"], "paris-2"] and cases[1]["prompt"] == COMPLETION["prompt"]

    unkept = _rate(srv, plain, {"id": _ask(srv, plain).json()["id"], "rating": "down", "correction": "Paris."}).json()
    refused = run_cli("drift", "promote", unkept["id"], "--set", "capitals", data_dir=srv.data_dir, check=False)
    assert (
        refused.returncode == 1 and "cannot become a golden case" in refused.stderr and "correction" in refused.stderr
    )
    no_fix = _rate(srv, keeper, {"id": response_id, "rating": "up"}).json()
    r = admin(srv, "POST", f"/admin/feedback/{no_fix['id']}/promote", json={"set": "capitals"})
    assert r.status_code == 409 and "has no correction" in r.json()["error"]["message"]
    for bad in ("../escape", ".hidden", "a/b", ""):
        r = admin(srv, "POST", f"/admin/feedback/{fb['id']}/promote", json={"set": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "set", bad
    assert admin(srv, "POST", "/admin/feedback/fb-nope/promote", json={"set": "capitals"}).status_code == 404
    assert sorted(p.name for p in (srv.data_dir / "golden").iterdir()) == ["capitals.yaml"]


def test_promote_refuses_a_prompt_that_was_not_kept(srv: Server) -> None:
    # The correction is kept (answer retention full); the prompt only as a digest.
    key = _key(srv, "--answer-retention", "full")
    fb = _rate(srv, key, {"id": _ask(srv, key).json()["id"], "rating": "down", "correction": "Paris."}).json()
    r = admin(srv, "POST", f"/admin/feedback/{fb['id']}/promote", json={"set": "capitals"})
    assert r.status_code == 409
    assert "only a digest of its prompt was kept" in r.json()["error"]["message"]
    assert "prompt retention must be redacted or full" in r.json()["error"]["message"]
    assert admin(srv, "GET", f"/admin/feedback/{fb['id']}").json()["promoted_to"] is None


def test_offline_the_cli_works_on_the_database(tmp_path: Path, model_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "appliance.toml").write_text("[runtime]\nslots = 1\nctx_per_slot = 512\n")
    init_data_dir(data, model_path)
    key = json.loads(run_cli("keys", "create", "--name", "off", *KEEP_ALL, "--json", data_dir=data).stdout)
    proc, url, log_path = start_server(data)
    try:
        server = Server(url, data, "", "", proc, log_path)
        response_id = _ask(server, key, COMPLETION).json()["id"]
        fb = _rate(server, key, {"id": response_id, "rating": "up", "correction": "Paris."}).json()
    finally:
        stop_server(proc)
    listed = json.loads(run_cli("feedback", "list", "--json", data_dir=data).stdout)
    assert [f["id"] for f in listed] == [fb["id"]]
    exported = run_cli("feedback", "export", data_dir=data)
    (line,) = [json.loads(x) for x in exported.stdout.splitlines()]
    assert line["prompt"] == COMPLETION["prompt"] and line["correction"] == "Paris." and line["missing"] == []
    assert "1 with prompt, answer and correction" in exported.stderr
    run_cli("drift", "promote", fb["id"], "--set", "offline", data_dir=data)
    doc = yaml.safe_load((data / "golden" / "offline.yaml").read_text())
    assert doc["cases"][0]["prompt"] == COMPLETION["prompt"] and doc["cases"][0]["reference"] == "Paris."
    db = sqlite3.connect(data / "appliance.db")
    try:
        (body,) = db.execute("SELECT body FROM audit WHERE kind = 'admin' ORDER BY idx DESC LIMIT 1").fetchone()
        assert db.execute("SELECT promoted_to FROM feedback").fetchall() == [("offline",)]
    finally:
        db.close()
    assert json.loads(body)["action"] == "feedback.promote" and json.loads(body)["actor"]["kind"] == "cli"
    assert json.loads(run_cli("audit", "verify", "--json", data_dir=data).stdout)["ok"]


def test_chat_prompts_parse_back_into_messages() -> None:
    text = "system: Be brief.\nuser: line one\nline two\nassistant: ok\nuser: "
    assert messages_of(text) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "line one\nline two"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": ""},
    ]
    assert messages_of("no role here") == [{"role": "user", "content": "no role here"}]


def _requests(server: Server) -> list[dict[str, Any]]:
    return admin(server, "GET", "/admin/audit", params={"kind": "request", "limit": 10_000}).json()["data"]


def _request_id_of(server: Server, response_id: str) -> str:
    return next(r["body"]["request_id"] for r in _requests(server) if r["body"].get("response_id") == response_id)
