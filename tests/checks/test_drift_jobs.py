"""The scheduled "golden" and "drift" jobs on real services (`build_services` on a real data
directory with the default model, loaded on demand), called from a worker thread as the
scheduler calls them, their generations and embeddings on the running loop."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from appliance.api.app import build_services
from appliance.api.services import Services
from appliance.audit.log import cli_actor
from appliance.checks.drift_jobs import drift_checks, run_drift, run_golden
from appliance.checks.registry import CheckContext, CheckState
from appliance.config import load_settings
from tests.checks.test_drift_windows import shifted, usual, write_requests
from tests.conftest import MODEL_NAME


@pytest.fixture
async def site(tmp_path: Path, model_path: Path) -> AsyncIterator[tuple[Services, CheckContext]]:
    (tmp_path / "appliance.toml").write_text(
        '[audit]\ndefault_prompt_retention = "full"\n\n[check.drift]\nmin_requests = 20\nmin_centroid_prompts = 10\n'
    )
    settings = load_settings(tmp_path, env={})
    services = build_services(settings)
    try:
        services.models.add(model_path, MODEL_NAME, actor=cli_actor())
        await services.pool.start()
        options = {k: dict(v) for k, v in settings.check.items()}
        yield services, CheckContext(services, asyncio.get_running_loop(), CheckState(services.store), options)
    finally:
        await services.pool.close()
        await services.remote.client.aclose()
        services.store.close()


def test_the_jobs_and_their_schedules() -> None:
    ctx = CheckContext(None, asyncio.new_event_loop(), None, {})  # type: ignore[arg-type]
    try:
        jobs = {job.name: job for job in drift_checks(ctx)}
    finally:
        ctx.loop.close()
    assert {name: job.interval_seconds for name, job in jobs.items()} == {"golden": 3600.0, "drift": 3600.0}


async def test_drift_job_sets_the_first_baseline_then_measures_against_it(site: tuple[Services, CheckContext]) -> None:
    services, ctx = site
    now = time.time()
    first = await asyncio.to_thread(run_drift, ctx)  # no traffic yet: nothing to set a baseline from
    assert [f.subject for f in first] == ["baseline"] and "not enough traffic" in first[0].summary
    write_requests(services.store, services.audit, now - 7200, usual, 30, seed=1, retention="full")
    set_now = await asyncio.to_thread(run_drift, ctx)  # the last 24 h: 30 requests, their prompts kept
    assert set_now[0].subject == "baseline" and set_now[0].summary.startswith("drift baseline set")
    assert set_now[0].details["requests"] == 30 and set_now[0].details["kept_prompts"] == 30
    events = [json.loads(r["body"]) for r in services.store.query("SELECT body FROM audit WHERE kind = 'system'")]
    assert [e["trigger"] for e in events if e.get("event") == "drift.baseline"] == ["schedule"]

    write_requests(services.store, services.audit, now - 3600, shifted, 40, seed=2, retention="full")
    ctx.options["drift"]["window_hours"] = 1.0  # the current window: the shifted hour only
    found = {f.subject: f for f in await asyncio.to_thread(run_drift, ctx)}
    assert found["script"].status == "fail" and found["prompt_tokens"].status == "fail"
    centroid = found["embedding_centroid"]
    assert centroid.details["available"] is True and centroid.status in ("warn", "fail")


async def test_golden_job_runs_every_good_set_and_fails_the_bad_ones(site: tuple[Services, CheckContext]) -> None:
    services, ctx = site
    golden = services.settings.paths.golden
    golden.mkdir()
    case = {
        "id": "capital",
        "prompt": "What is the capital of France? Answer in one word.",
        "assert": {"contains": "paris", "similarity": True},
    }
    (golden / "good.json").write_text(json.dumps({"target": MODEL_NAME, "max_tokens": 16, "cases": [case]}))
    (golden / "bad.yaml").write_text("target: [unclosed\n")
    before = services.store.query_one("SELECT COUNT(*) AS n FROM usage")["n"]
    findings = {f.subject: f for f in await asyncio.to_thread(run_golden, ctx)}
    assert findings["bad"].status == "fail" and "bad.yaml: not valid YAML" in findings["bad"].summary
    good = findings["good"]
    assert good.status == "ok" and good.details["baseline"] is True and good.details["pass_rate"] == 1.0
    again = {f.subject: f for f in await asyncio.to_thread(run_golden, ctx)}["good"]
    assert again.details["baseline"] is False and again.details["mean_similarity"] >= 0.8
    assert services.store.query_one("SELECT COUNT(*) AS n FROM usage")["n"] == before  # billed to no one
    rows = services.store.query("SELECT trigger, baseline FROM golden_runs WHERE set_name = 'good' ORDER BY id")
    assert [(r["trigger"], r["baseline"]) for r in rows] == [("schedule", 1), ("schedule", 0)]
