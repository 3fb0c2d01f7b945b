"""Golden sets and drift end to end on a real `appliance serve` with the default model: runs
through the admin API and the CLI (over the admin socket), baselines and their audit records,
the gate's exit status, malformed files, the scheduled "golden" check, and input drift from
real traffic (prompts kept, so the embedding centroid is measured too)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import MODEL_NAME, Server, init_data_dir, run_cli, start_server, stop_server
from tests.http_helpers import admin, audit_records

CONFIG = """\
[runtime]
slots = 4
ctx_per_slot = 1024

[audit]
default_prompt_retention = "full"

[check.drift]
min_requests = 8
min_centroid_prompts = 5
"""


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("golden-drift")
    (data_dir / "appliance.toml").write_text(CONFIG)
    admin_key = init_data_dir(data_dir, model_path)
    user = json.loads(run_cli("keys", "create", "--name", "app", "--role", "user", "--json", data_dir=data_dir).stdout)
    proc, url, log_path = start_server(data_dir)
    server = Server(url, data_dir, admin_key, user["key"], proc, log_path)
    yield server
    stop_server(proc)


def golden(server: Server, name: str, cases: list[dict[str, Any]], **top: Any) -> None:
    directory = server.data_dir / "golden"
    directory.mkdir(exist_ok=True)
    body = {"target": MODEL_NAME, "max_tokens": 24, **top, "cases": cases}
    (directory / f"{name}.json").write_text(json.dumps(body))


def run_set(server: Server, name: str, **body: Any) -> dict[str, Any]:
    response = httpx.post(
        f"{server.url}/admin/drift/golden/{name}/run",
        json=body,
        headers={"Authorization": f"Bearer {server.admin_key}"},
        timeout=600,
    )
    assert response.status_code == 200, response.text
    return response.json()


def generation_records(server: Server) -> int:
    return sum(1 for r in audit_records(server, "request") if r["body"].get("kind") in ("chat", "completion"))


def baseline_events(server: Server, name: str) -> list[dict[str, Any]]:
    return [
        r["body"]
        for r in audit_records(server, "system")
        if r["body"].get("event") == "golden.baseline" and r["body"].get("set") == name
    ]


CAPITAL = {
    "id": "capital",
    "prompt": "What is the capital of France? Answer in one word.",
    "assert": {"contains": ["paris"], "not_contains": "xylophone", "similarity": True},
}
SUM = {"id": "sum", "prompt": "What is 2+2?", "reference": "2+2 equals 4.", "assert": {"similarity": 0.5}}


def test_first_run_sets_the_baseline_and_later_runs_are_scored_against_it(live: Server) -> None:
    golden(live, "basics", [CAPITAL, SUM])
    before = generation_records(live)
    first = run_set(live, "basics")
    assert first["baseline"] is True and first["status"] == "ok" and first["gate"] == "pass"
    assert first["total"] == 2 and first["passed"] == 2 and first["pass_rate"] == 1.0
    cases = {c["id"]: c for c in first["cases"]}
    assert cases["capital"]["baseline_set"] is True and "paris" in cases["capital"]["answer"].lower()
    assert cases["capital"]["model"] == MODEL_NAME and cases["capital"]["finish_reason"] in ("stop", "length")
    # A case with a reference is compared with it, from the first run on, and sets no baseline.
    assert "baseline_set" not in cases["sum"] and 0.5 <= cases["sum"]["similarity"] < 1.0

    second = run_set(live, "basics")
    assert second["baseline"] is False and second["reference_pass_rate"] == 1.0 and second["status"] == "ok"
    again = {c["id"]: c for c in second["cases"]}
    assert "baseline_set" not in again["capital"] and again["capital"]["similarity"] >= 0.8
    assert [c["assertion"] for c in again["capital"]["checks"]] == ["contains", "not_contains", "similarity"]

    history = admin(live, "GET", "/admin/drift/golden/basics/history").json()["data"]
    assert [r["id"] for r in history[:2]] == [second["id"], first["id"]]
    assert history[1]["baseline"] is True and "cases" not in history[0]
    events = baseline_events(live, "basics")
    assert len(events) == 1 and events[0]["cases"] == ["capital"] and events[0]["rebaseline"] is False
    assert generation_records(live) == before  # golden generations write no request record
    listed = {s["name"]: s for s in admin(live, "GET", "/admin/drift/golden").json()["data"]}
    assert listed["basics"]["last_run"]["id"] == second["id"] and listed["basics"]["error"] is None


def test_failing_cases_lower_the_pass_rate_and_fail_the_gate(live: Server) -> None:
    golden(
        live,
        "gate",
        [
            CAPITAL,
            {"id": "impossible", "prompt": "Say hello.", "assert": {"contains": "xylophone-zebra"}},
            {
                "id": "promoted",
                "prompt": "Say hello.",
                "reference": "Bonjour tout le monde, je suis un chat qui danse.",
                "assert": {"similarity": 0.97},
            },
        ],
    )
    proc = run_cli("drift", "run", "--set", "gate", data_dir=live.data_dir, check=False)  # the baseline run
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "gate: FAIL" in proc.stdout and "'xylophone-zebra' not found" in proc.stdout
    assert "pass rate 33% (reference 100%)" in proc.stdout
    later = run_cli("drift", "run", "--set", "gate", "--json", data_dir=live.data_dir, check=False)
    run = json.loads(later.stdout)
    assert run["passed"] == 1 and run["pass_rate"] == pytest.approx(1 / 3)
    why = {c["id"]: c["why"] for c in run["failed_cases"]}
    assert set(why) == {"impossible", "promoted"} and why["promoted"].startswith("similarity: ")
    # Measured against the baseline run, which failed the same cases: a warning, no regression.
    assert run["reference_pass_rate"] == pytest.approx(1 / 3) and run["status"] == "warn"
    assert run["gate"] == "pass" and later.returncode == 0
    strict = run_cli("drift", "run", "--set", "gate", "--min-pass-rate", "0.9", data_dir=live.data_dir, check=False)
    assert strict.returncode == 1 and "gate: FAIL" in strict.stdout

    golden(live, "passing", [CAPITAL])
    proc = run_cli("drift", "run", "--set", "passing", data_dir=live.data_dir, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gate: pass" in proc.stdout


def test_another_model_or_route_is_scored_against_the_baseline(live: Server) -> None:
    golden(live, "routed", [CAPITAL])
    run_set(live, "routed")  # the configured model's baseline
    run_cli("routes", "set", "golden-route", "--candidate", MODEL_NAME, data_dir=live.data_dir)
    routed = run_set(live, "routed", model="golden-route")
    case = routed["cases"][0]
    assert routed["target"] == "golden-route" and routed["baseline"] is False
    assert case["trail"].startswith("golden-route") and case["model"] == MODEL_NAME and case["similarity"] >= 0.8
    assert len(baseline_events(live, "routed")) == 1  # scoring another target set no baseline

    again = run_set(live, "routed", model="golden-route", rebaseline=True)
    assert again["baseline"] is True
    events = baseline_events(live, "routed")
    assert len(events) == 2 and events[-1]["rebaseline"] is True and events[-1]["target"] == "golden-route"

    missing = admin(live, "POST", "/admin/drift/golden/routed/run", json={"model": "no-such-model"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert admin(live, "POST", "/admin/drift/golden/no-such-set/run", json={}).status_code == 404
    proc = run_cli("drift", "run", "--set", "routed", "--model", "no-such-model", data_dir=live.data_dir, check=False)
    assert proc.returncode == 1 and "no-such-model" in proc.stderr


def test_malformed_sets_are_reported_and_skipped(live: Server) -> None:
    golden(live, "fine", [CAPITAL])
    (live.data_dir / "golden" / "broken.yaml").write_text(
        f"target: {MODEL_NAME}\ncases:\n  - id: bad-case\n    prompt: hi\n    assert: {{containz: x}}\n"
    )
    response = admin(live, "POST", "/admin/drift/golden/broken/run", json={})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_golden_set"
    assert error["message"].startswith("broken.yaml: case 'bad-case': unknown assertion containz")
    listed = {s["name"]: s for s in admin(live, "GET", "/admin/drift/golden").json()["data"]}
    assert listed["broken"]["error"].startswith("broken.yaml: ") and listed["fine"]["error"] is None

    check = httpx.post(
        f"{live.url}/admin/checks/golden/run", headers={"Authorization": f"Bearer {live.admin_key}"}, timeout=900
    )
    assert check.status_code == 200, check.text
    findings = {f["subject"]: f for f in check.json()["findings"]}
    assert findings["broken"]["status"] == "fail" and "unknown assertion containz" in findings["broken"]["summary"]
    assert findings["fine"]["status"] in ("ok", "warn") and findings["fine"]["details"]["total"] == 1
    assert check.json()["status"] == "fail"
    runs = admin(live, "GET", "/admin/drift/golden/fine/history").json()["data"]
    assert runs[0]["trigger"] == "schedule"
    (live.data_dir / "golden" / "broken.yaml").unlink()


def chat(server: Server, prompt: str) -> None:
    response = httpx.post(
        f"{server.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {server.user_key}"},
        json={
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 4,
            "temperature": 0,
        },
        timeout=120,
    )
    assert response.status_code == 200, response.text


def test_input_drift_from_real_traffic(live: Server) -> None:
    start = time.time()
    for i in range(10):
        chat(live, f"How do I reset my password? Attempt {i}.")
    middle = time.time()
    for i in range(10):
        chat(
            live,
            f"Привет! Напишите, пожалуйста, очень подробное письмо коллеге о переносе встречи номер {i} "
            "на следующую неделю, с извинениями и объяснением причин переноса.",
        )
    end = time.time()
    iso = lambda t: time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"  # noqa: E731
    stored = json.loads(
        run_cli(
            "drift", "baseline", "--since", iso(start), "--until", iso(middle), "--json", data_dir=live.data_dir
        ).stdout
    )
    assert stored["requests"] == 10 and stored["kept_prompts"] == 10
    out = run_cli("drift", "report", "--since", iso(middle), "--until", iso(end + 1), "--json", data_dir=live.data_dir)
    report = json.loads(out.stdout)
    found = {f["subject"]: f for f in report["findings"]}
    assert report["window"]["count"] == 10 and report["baseline"]["count"] == 10
    assert found["script"]["status"] == "fail" and found["script"]["details"]["current"] == {"cyrillic": 1.0}
    assert found["prompt_tokens"]["status"] == "fail" and found["prompt_tokens"]["details"]["psi"] > 1
    assert found["embedding_centroid"]["details"]["available"] is True
    assert found["embedding_centroid"]["status"] in ("warn", "fail")
    assert found["finish_reason"]["details"]["reference_count"] == 10
    text = run_cli("drift", "report", "--since", iso(middle), "--until", iso(end + 1), data_dir=live.data_dir).stdout
    assert text.startswith("drift: fail") and "script" in text
    # The same window against itself: no drift on the features its requests share.
    same = admin(live, "GET", "/admin/drift/report", params={"since": iso(start), "until": iso(middle)}).json()
    same_found = {f["subject"]: f for f in same["findings"]}
    assert same_found["script"]["status"] == same_found["prompt_tokens"]["status"] == "ok"
    assert same_found["embedding_centroid"]["details"]["distance"] < 1e-6
