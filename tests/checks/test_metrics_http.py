"""`/metrics` of a real server with the default model: the exposition parses, every series the
Grafana dashboard draws is exported, counters move with real requests, the roles and the
separate bind are enforced, and no secret ever appears in it."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.checks.findings import Finding, Status
from appliance.checks.history import CheckHistory, CheckRun
from appliance.config import load_settings
from appliance.errors import ConfigError
from appliance.store import Store
from tests.conftest import MODEL_NAME, REPO, Server, free_port, init_data_dir, run_cli, start_server, stop_server
from tests.http_helpers import admin

DASHBOARD = REPO / "packaging" / "grafana" / "appliance.json"
UPSTREAM_SECRET = "sk-upstream-" + "q7Zt" * 8
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Data-dependent series with no sample on a machine without what they read.
HARDWARE = ("appliance_gpu_",)
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
PROMQL_WORDS = set(
    "sum by without rate irate increase histogram_quantile clamp_min time avg max min count label_values"
    " and or unless offset le e".split()
)
Scraped = tuple[Server, str, dict[str, str]]


@pytest.fixture(scope="module")
def metrics_server(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Scraped]:
    data = tmp_path_factory.mktemp("metrics")
    port = free_port()
    (data / "appliance.toml").write_text(
        "[runtime]\nslots = 4\nctx_per_slot = 512\n\n[auth]\nfailure_limit = 1000000\n\n"
        f'[metrics]\nlisten = "127.0.0.1:{port}"\n'
    )
    admin_key = init_data_dir(data, model_path)
    keys = {
        role: json.loads(
            run_cli("keys", "create", "--name", f"k-{role}", "--role", role, "--json", data_dir=data).stdout
        )["key"]
        for role in ("user", "operator", "auditor")
    }
    proc, url, log_path = start_server(data)
    server = Server(url, data, admin_key, keys["user"], proc, log_path)
    yield server, f"http://127.0.0.1:{port}", keys
    stop_server(proc)


def scrape(server: Server) -> str:
    response = admin(server, "GET", "/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == CONTENT_TYPE
    return response.text


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


def post(server: Server, key: str, path: str, body: dict[str, object]) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def chat(server: Server, key: str, **body: object) -> httpx.Response:
    messages = [{"role": "user", "content": "Say hi."}]
    return post(server, key, "/chat/completions", {"model": MODEL_NAME, "messages": messages, "max_tokens": 8} | body)


def dashboard_names() -> set[str]:
    """Every identifier in the dashboard's PromQL that is not a function, keyword or label."""
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in board["templating"]["list"] if v.get("definition")]
    assert len(exprs) > 20
    names = set()
    for expr in exprs:
        bare = re.sub(r'"[^"]*"', "", expr)
        bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", bare)  # label matchers, ranges
        bare = re.sub(r"\b(by|without)\s*\([^)]*\)", "", bare)  # grouping labels
        bare = re.sub(r"label_values\(([^,]*),[^)]*\)", r"(\1)", bare)
        for word in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", bare):
            if word not in PROMQL_WORDS:
                names.add(word)
    return names


def test_exposition_parses_and_exports_every_dashboard_series(metrics_server: Scraped) -> None:
    server, _, _ = metrics_server
    write_check_results(server.data_dir)
    team = admin(server, "POST", "/admin/teams", json={"name": "research"})
    assert team.status_code == 201, team.text
    budget = admin(
        server,
        "POST",
        "/admin/budgets",
        json={"scope": "team", "scope_id": "research", "amount": 1000, "unit": "tokens", "period": "day"},
    )
    assert budget.status_code == 201, budget.text
    text = scrape(server)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    exported = {s.name for f in families.values() for s in f.samples}
    declared = {name + suffix for name, f in families.items() for suffix in SUFFIXES.get(f.type, ("",))}
    for name in sorted(dashboard_names()):
        assert name in declared, f"the dashboard draws {name}, which /metrics does not export"
        if not name.startswith(HARDWARE):
            assert name in exported, f"{name} has no series yet: create it up front"
    assert value(text, "appliance_team_budget_remaining_ratio", team="research", unit="tokens", period="day") == 1.0
    assert value(text, "appliance_team_budget_remaining_tokens", team="research", period="day") == 1000
    assert value(text, "appliance_check_status", check="sqlite") == 0
    assert value(text, "appliance_check_status", check="gpu") == 2
    assert value(text, "appliance_check_last_duration_seconds", check="sqlite") == pytest.approx(0.012)
    assert value(text, "appliance_drift_psi", subject="script") == pytest.approx(0.31)
    assert value(text, "appliance_drift_change", subject="refusal") == pytest.approx(-0.05)
    assert ("appliance_drift_psi", frozenset({("subject", "0")})) not in samples(text)  # only the drift check's
    assert value(text, "appliance_golden_pass_ratio", set="smoke", target=MODEL_NAME) == 0.75
    assert value(text, "appliance_breaker_state", candidate=MODEL_NAME) == 0
    assert value(text, "appliance_engine_up", model=MODEL_NAME) == 1
    assert value(text, "appliance_engine_slots", model=MODEL_NAME) == 4
    assert all(
        value(text, "appliance_metrics_source_up", source=s) == 1 for s in ("engines", "checks", "golden", "budgets")
    )


def write_check_results(data_dir: Path) -> None:
    """Check runs and a golden run as the scheduler and the golden-set check record them."""
    store = Store(data_dir / "appliance.db").open()
    try:
        history = CheckHistory(store, keep_days=30, keep_runs=100)
        now = time.time()
        runs = [
            check_run("sqlite", "fail", now - 60, 40.0),
            check_run("sqlite", "ok", now, 12.0, Finding("ok", "quick_check ok", "appliance.db")),
            check_run("gpu", "fail", now, 3.0, Finding("fail", "hot", "0", {"psi": 9.0})),  # not drift: not drawn
            check_run(
                "drift",
                "fail",
                now,
                80.0,
                Finding("fail", "script mix moved", "script", {"psi": 0.31}),
                Finding("ok", "refusals steady", "refusal", {"change": -0.05}),
            ),
        ]
        for run in runs:
            store.write_sync(history.record_fn(run))

        def golden(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO golden_runs (set_name, target, trigger, started_at, duration_ms, total, passed, pass_rate,"
                " mean_similarity, baseline, results) VALUES ('smoke', ?, 'manual', ?, 900, 4, 3, 0.75, 0.9, 0, '[]')",
                (MODEL_NAME, now),
            )

        store.write_sync(golden)
    finally:
        store.close()


def check_run(check: str, status: Status, started: float, ms: float, *findings: Finding) -> CheckRun:
    return CheckRun(check, "schedule", started, ms, 0.0, status, status, list(findings))


def test_counters_move_with_real_requests(metrics_server: Scraped) -> None:
    server, _, keys = metrics_server
    key = keys["user"]
    ok = {"route": MODEL_NAME, "model": MODEL_NAME}
    before = scrape(server)
    replies = [chat(server, key), chat(server, key, stream=True, stream_options={"include_usage": True})]
    completion = post(server, key, "/completions", {"model": MODEL_NAME, "prompt": "Once", "max_tokens": 6})
    embedding = post(server, key, "/embeddings", {"model": MODEL_NAME, "input": ["a", "b"]})
    assert all(r.status_code == 200 for r in [*replies, completion, embedding])
    after = scrape(server)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("appliance_requests_total", **ok, type="chat", code="ok") == 2
    assert moved("appliance_requests_total", **ok, type="completion", code="ok") == 1
    assert moved("appliance_requests_total", **ok, type="embeddings", code="ok") == 1
    assert moved("appliance_request_duration_seconds_count", **ok, type="chat") == 2
    assert moved("appliance_time_to_first_token_seconds_count", **ok, type="chat") == 2
    assert moved("appliance_time_to_first_token_seconds_count", **ok, type="embeddings") == 0
    assert moved("appliance_time_to_first_token_seconds_sum", **ok, type="completion") > 0
    usage = completion.json()["usage"]
    assert moved("appliance_completion_tokens_total", **ok, type="completion") == usage["completion_tokens"]
    assert moved("appliance_prompt_tokens_total", **ok, type="completion") == usage["prompt_tokens"]
    assert moved("appliance_prompt_tokens_total", **ok, type="embeddings") == embedding.json()["usage"]["prompt_tokens"]
    generated = usage["completion_tokens"] + replies[0].json()["usage"]["completion_tokens"]
    assert moved("appliance_engine_generated_tokens_total", model=MODEL_NAME) >= generated
    assert moved("appliance_metrics_scrapes_total") == 1  # `before`, counted once it was rendered


def test_errors_are_counted_with_their_code(metrics_server: Scraped) -> None:
    server, _, keys = metrics_server
    before = scrape(server)
    missing = chat(server, keys["user"], model="no-such-model")
    too_long = chat(server, keys["user"], messages=[{"role": "user", "content": "word " * 2000}])
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    after = scrape(server)

    def moved(**labels: str) -> float:
        return value(after, "appliance_requests_total", **labels) - value(before, "appliance_requests_total", **labels)

    assert moved(route="none", model="none", type="chat", code="model_not_found") == 1
    assert moved(route=MODEL_NAME, model="none", type="chat", code="context_length_exceeded") == 1  # nothing served it
    assert moved(route=MODEL_NAME, model=MODEL_NAME, type="chat", code="ok") == 0


@pytest.mark.parametrize("role", ["operator", "auditor"])
def test_operator_and_auditor_keys_may_scrape(metrics_server: Scraped, role: str) -> None:
    server, _, keys = metrics_server
    response = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {keys[role]}"}, timeout=30)
    assert response.status_code == 200
    assert "appliance_requests_total" in response.text


@pytest.mark.parametrize(
    ("key", "status", "code"), [("user", 403, "permission_denied"), (None, 401, "invalid_api_key")]
)
def test_user_key_and_no_key_are_refused(metrics_server: Scraped, key: str | None, status: int, code: str) -> None:
    server, _, keys = metrics_server
    headers = {"Authorization": f"Bearer {keys[key]}"} if key else {}
    response = httpx.get(server.url + "/metrics", headers=headers, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    assert "appliance_" not in response.text


def test_separate_bind_serves_only_metrics_without_a_key(metrics_server: Scraped) -> None:
    server, metrics_url, _ = metrics_server
    response = httpx.get(metrics_url + "/metrics", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE
    assert value(response.text, "appliance_engine_up", model=MODEL_NAME) == 1
    assert httpx.head(metrics_url + "/metrics", timeout=30).status_code == 200
    as_admin = {"Authorization": f"Bearer {server.admin_key}"}
    for path in ("/v1/models", "/healthz", "/admin/keys", "/metrics/"):
        assert httpx.get(metrics_url + path, headers=as_admin, timeout=30).status_code == 404
    posted = httpx.post(metrics_url + "/metrics", timeout=30)
    assert posted.status_code == 405 and posted.headers["allow"] == "GET, HEAD"
    rebound = httpx.get(metrics_url + "/metrics", headers={"Host": "evil.example"}, timeout=30)
    assert rebound.status_code == 403 and "appliance_" not in rebound.text


def test_no_key_or_upstream_secret_appears(metrics_server: Scraped) -> None:
    server, metrics_url, keys = metrics_server
    dead = f"http://127.0.0.1:{free_port()}/v1"
    spec = {"base_url": dead, "models": ["big"], "api_key": UPSTREAM_SECRET, "max_retries": 0, "timeout_seconds": 5}
    upstream = admin(server, "PUT", "/admin/upstreams/peer", json=spec)
    assert upstream.status_code == 200, upstream.text
    run_cli("routes", "set", "remote", "--candidate", "peer/big", data_dir=server.data_dir)
    failed = chat(server, keys["user"], model="remote")
    assert failed.status_code >= 500, failed.text
    texts = [scrape(server), httpx.get(metrics_url + "/metrics", timeout=30).text]
    assert value(texts[0], "appliance_breaker_recent_failures", candidate="peer/big") == 1
    code = failed.json()["error"]["code"]
    assert value(texts[0], "appliance_requests_total", route="remote", model="none", type="chat", code=code) == 1
    for text in texts:
        for secret in (UPSTREAM_SECRET, server.admin_key, *keys.values(), dead):
            assert secret not in text
        assert "sk-" not in text


def test_a_wildcard_bind_is_refused_unless_allowed(tmp_path: Path) -> None:
    wildcard = {"APPLIANCE_METRICS_LISTEN": "0.0.0.0:9464"}
    refused = run_cli("serve", data_dir=tmp_path, check=False, env=wildcard)
    assert refused.returncode != 0
    assert "metrics.allow_remote" in refused.stderr
    allowed = load_settings(tmp_path, env=wildcard | {"APPLIANCE_METRICS_ALLOW_REMOTE": "true"})
    assert allowed.metrics.address() == ("0.0.0.0", 9464)
    with pytest.raises(ConfigError, match="allow_remote"):
        load_settings(tmp_path, env={"APPLIANCE_METRICS_LISTEN": "10.1.2.3:9464"})
