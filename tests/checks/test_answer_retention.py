"""Answer retention over a real server and model: per key and per team (key wins, then team,
then `[audit] default_answer_retention`), the digest in the hashed body and the kept text
beside it, verified by `appliance audit verify` and removed by `appliance audit erase`, and the
policies' own administration (keys create/update, teams create/set-retention), audited."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.redaction import redact
from tests.conftest import MODEL_NAME, Server, own_server, run_cli
from tests.http_helpers import admin, request_record

# At temperature 0 the default model continues this list with another address.
EMAILS = {
    "model": MODEL_NAME,
    "prompt": "alice@example.com, bob@example.com, carol@example.com, dave@",
    "max_tokens": 12,
    "temperature": 0,
}
CHAT = {
    "model": MODEL_NAME,
    "messages": [{"role": "user", "content": "Name a colour."}],
    "max_tokens": 8,
    "temperature": 0,
}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Server]:
    with own_server(tmp_path_factory.mktemp("answers"), model_path, "[runtime]\nslots = 2\nctx_per_slot = 1024\n") as server:
        yield server


def _key(srv: Server, *args: str) -> dict[str, Any]:
    return json.loads(run_cli("keys", "create", "--name", "answers", *args, "--json", data_dir=srv.data_dir).stdout)


def _ask(srv: Server, key: dict[str, Any], body: dict[str, Any] = EMAILS) -> tuple[str, dict[str, Any]]:
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    r = httpx.post(srv.url + path, json=body, headers={"Authorization": f"Bearer {key['key']}"}, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    answer = choice["text"] if "text" in choice else choice["message"]["content"]
    return answer, request_record(srv, r.headers["x-request-id"])


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("policy", ["none", "sha256", "redacted", "full"])
def test_answer_retention_per_key(srv: Server, policy: str) -> None:
    answer, record = _ask(srv, _key(srv, "--answer-retention", policy))
    assert "@example.com" in answer  # what makes the redacted case meaningful
    digest, content = record["body"].get("answer"), record.get("content")
    assert answer not in json.dumps(record["body"])  # never in the hashed body
    if policy == "none":
        assert digest is None and content is None
    elif policy == "sha256":
        assert digest == {"sha256": _sha(answer)} and content is None
    else:
        kept = redact(answer) if policy == "redacted" else answer
        assert digest == {"kept": policy, "sha256": _sha(kept)}
        assert content == {"answer": kept}  # the default prompt policy (sha256) keeps no prompt text
        if policy == "redacted":
            assert "[EMAIL]" in kept and "@example.com" not in kept


def test_the_default_keeps_no_answer_and_a_key_wins_over_its_team(srv: Server) -> None:
    _, record = _ask(srv, _key(srv))
    assert "answer" not in record["body"]  # [audit] default_answer_retention = "none"
    run_cli("teams", "create", "Answer Keepers", "--answer-retention", "full", data_dir=srv.data_dir)
    answer, record = _ask(srv, _key(srv, "--team", "answer-keepers"))
    assert record["content"] == {"answer": answer} and record["body"]["answer"]["kept"] == "full"
    _, record = _ask(srv, _key(srv, "--team", "answer-keepers", "--answer-retention", "sha256"))
    assert set(record["body"]["answer"]) == {"sha256"} and "content" not in record


def test_streamed_answers_are_kept_whole(srv: Server) -> None:
    key = _key(srv, "--answer-retention", "full", "--prompt-retention", "full")
    with httpx.stream(
        "POST",
        srv.url + "/v1/chat/completions",
        json=CHAT | {"stream": True},
        headers={"Authorization": f"Bearer {key['key']}"},
        timeout=120,
    ) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        request_id = r.headers["x-request-id"]
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    record = request_record(srv, request_id)
    assert streamed and record["content"] == {"prompt": "user: Name a colour.", "answer": streamed}
    assert record["body"]["answer"] == {"kept": "full", "sha256": _sha(streamed)}


def test_kept_answers_verify_are_exported_and_can_be_erased(srv: Server) -> None:
    key = _key(srv, "--answer-retention", "full")
    answer, record = _ask(srv, key)
    verified = json.loads(run_cli("audit", "verify", "--json", data_dir=srv.data_dir).stdout)
    assert verified["ok"] and verified["content_checked"] >= 1
    exported = [json.loads(line) for line in run_cli("audit", "export", data_dir=srv.data_dir).stdout.splitlines()]
    assert [r.get("content") for r in exported if r["idx"] == record["idx"]] == [{"answer": answer}]

    db = sqlite3.connect(srv.data_dir / "appliance.db")
    try:  # an edited kept answer is caught, like an edited prompt
        with db:
            db.execute(
                "UPDATE audit_content SET content = ? WHERE idx = ?", (json.dumps({"answer": "edited"}), record["idx"])
            )
        broken = json.loads(run_cli("audit", "verify", "--json", data_dir=srv.data_dir, check=False).stdout)
        assert not broken["ok"] and broken["first_bad_index"] == record["idx"] and "answer" in broken["problem"]
    finally:
        with db:
            db.execute(
                "UPDATE audit_content SET content = ? WHERE idx = ?",
                (json.dumps({"answer": answer}, ensure_ascii=False, separators=(",", ":")), record["idx"]),
            )
        db.close()

    erased = json.loads(run_cli("audit", "erase", "--key", key["id"], "--json", data_dir=srv.data_dir).stdout)
    assert erased["erased"] == 1
    after = request_record(srv, record["body"]["request_id"])
    assert "content" not in after and after["content_erased_at"] and after["body"]["answer"] == record["body"]["answer"]
    verified = json.loads(run_cli("audit", "verify", "--json", data_dir=srv.data_dir).stdout)
    assert verified["ok"] and verified["content_erased"] >= 1


def test_kept_text_with_key_shaped_strings_still_verifies(srv: Server) -> None:
    # The audit log scrubs key-shaped strings from kept text; the digest is of what it stores.
    key = _key(srv, "--answer-retention", "full", "--prompt-retention", "full")
    secret = "sk-" + "Zq3v" * 10
    _, record = _ask(
        srv,
        key,
        {"model": MODEL_NAME, "prompt": f"My key is {secret}. Again: {secret[:20]}", "max_tokens": 8, "temperature": 0},
    )
    assert secret not in json.dumps(record)
    verified = json.loads(run_cli("audit", "verify", "--json", data_dir=srv.data_dir).stdout)
    assert verified["ok"], verified


def test_policies_are_administered_and_audited(srv: Server) -> None:
    key = _key(srv, "--answer-retention", "redacted")
    assert key["answer_retention"] == "redacted" and key["prompt_retention"] is None
    changed = json.loads(
        run_cli(
            "keys",
            "update",
            key["id"],
            "--answer-retention",
            "full",
            "--prompt-retention",
            "redacted",
            "--json",
            data_dir=srv.data_dir,
        ).stdout
    )
    assert (changed["answer_retention"], changed["prompt_retention"]) == ("full", "redacted")
    r = admin(srv, "PATCH", f"/admin/keys/{key['id']}", json={"answer_retention": None})
    assert r.status_code == 200 and r.json()["answer_retention"] is None and r.json()["prompt_retention"] == "redacted"
    r = admin(srv, "PATCH", f"/admin/keys/{key['id']}", json={"answer_retention": "forever"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "answer_retention"
    updates = [
        a for a in _admin_records(srv) if a["body"]["action"] == "keys.update" and a["body"]["target"] == key["id"]
    ]
    assert [(u["body"]["before"]["answer_retention"], u["body"]["after"]["answer_retention"]) for u in updates] == [
        ("redacted", "full"),
        ("full", None),
    ]

    run_cli("teams", "create", "Quiet Team", data_dir=srv.data_dir)
    team = json.loads(
        run_cli("teams", "set-retention", "quiet-team", "--answer", "sha256", "--json", data_dir=srv.data_dir).stdout
    )
    assert (team["answer_retention"], team["prompt_retention"]) == ("sha256", None)
    r = admin(srv, "PATCH", "/admin/teams/quiet-team", json={"prompt_retention": "none"})
    assert r.status_code == 200 and (r.json()["prompt_retention"], r.json()["answer_retention"]) == ("none", "sha256")
    listed = {t["id"]: t for t in admin(srv, "GET", "/admin/teams").json()["data"]}
    assert listed["quiet-team"]["answer_retention"] == "sha256"
    assert "answer sha256" in run_cli("teams", "list", data_dir=srv.data_dir).stdout
    team_updates = [a["body"] for a in _admin_records(srv) if a["body"]["action"] == "teams.update"]
    assert [(b["before"]["answer_retention"], b["after"]["answer_retention"]) for b in team_updates] == [
        (None, "sha256"),
        ("sha256", "sha256"),
    ]
    assert admin(srv, "PATCH", "/admin/teams/no-such-team", json={"answer_retention": "full"}).status_code == 404
    # The new team's policy applies to its keys' answers.
    _, record = _ask(srv, _key(srv, "--team", "quiet-team"))
    assert set(record["body"]["answer"]) == {"sha256"} and "prompt" not in record["body"]


def _admin_records(srv: Server) -> list[dict[str, Any]]:
    r = admin(srv, "GET", "/admin/audit", params={"kind": "admin", "limit": 10_000})
    assert r.status_code == 200, r.text
    return r.json()["data"]
