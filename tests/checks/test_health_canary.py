"""The canary job on real services with the real default model: a free probe that counts
as no use and leaves no usage or audit record; warn against a (seeded) baseline; fail on an
error or a timeout; and auto-recovery, with a `FaultyEngine` served under the name of a
registered model so that the pool's reload brings the real model back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_health_support import Site, by_subject, encoded_cache, open_site, replace_changed, restore_link

from appliance.audit import cli_actor
from appliance.routing.breakers import BreakerPolicy, Breakers
from appliance.routing.prober import CanaryProber
from runtime.llama_engine import LlamaEngine
from runtime.stand_ins import FaultyEngine
from tests.conftest import MODEL_NAME

FLAKY = "flaky"


@pytest.fixture
def encoded(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Path:
    return encoded_cache(tmp_path_factory, model_path)


@pytest.fixture
async def site(tmp_path: Path, model_path: Path, encoded: Path) -> AsyncIterator[Site]:
    async with open_site(tmp_path / "data", model_path, encoded, extra_models=[FLAKY]) as site:
        yield site


async def swap_in_faulty(site: Site, **faults: object) -> FaultyEngine:
    """Serve a `FaultyEngine` as the registered model `flaky` (what a broken engine looks like)."""
    pool = site.services.pool
    old = pool.remove(FLAKY)
    if old is not None:
        await old.close()
    faulty = FaultyEngine(FLAKY, **faults)  # type: ignore[arg-type]
    pool.add(faulty)
    return faulty


def counts(site: Site) -> tuple[int, int]:
    store = site.services.store
    return store.query_one("SELECT COUNT(*) FROM audit")[0], store.query_one("SELECT COUNT(*) FROM usage")[0]


def loads_of(site: Site, name: str) -> int:
    return sum(1 for b in site.audit_bodies() if b.get("event") == "model.loaded" and b.get("model") == name)


async def test_the_canary_probes_loaded_models_only_and_costs_nobody_anything(site: Site, model_path: Path) -> None:
    pool, models = site.services.pool, site.services.models
    models.add(model_path, "later", actor=cli_actor())
    used_before = pool._resident[MODEL_NAME].last_used  # the exact monotonic stamp of its last use
    before = counts(site)
    found = by_subject(await site.run("canary"))
    assert counts(site) == before  # no usage record, no audit record
    assert pool._resident[MODEL_NAME].last_used == used_before  # not a use: it keeps no model from its idle unload
    first = found[MODEL_NAME]
    assert first.status == "ok", first
    assert first.details["tokens"] >= 1 and first.details["ttft_ms"] > 0
    assert first.summary.startswith("answered: first token in")
    assert found["later"].status == "ok" and found["later"].summary == "not loaded, skipped"
    assert pool.peek("later") is None  # not loaded for it
    state = site.state("canary", MODEL_NAME)
    assert state is not None and state["samples"] == 1 and state["ttft_ewma"] > 0 and state["failures"] == 0
    await site.run("canary")
    assert site.state("canary", MODEL_NAME)["samples"] == 2  # type: ignore[index]


async def test_a_run_much_slower_than_the_baseline_warns(site: Site) -> None:
    # A baseline no real run can match: 0.1 us to the first token, a billion tokens/s.
    site.ctx.state.put("canary", MODEL_NAME, {"samples": 10, "ttft_ewma": 1e-7, "tps_ewma": 1e9})
    found = by_subject(await site.run("canary", ttft_floor_ms=0))[MODEL_NAME]
    assert found.status == "warn", found
    assert "time to first token" in found.summary and "over 3x its baseline" in found.summary
    assert "tokens/s is under 1/3 of its baseline" in found.summary
    assert found.details["samples"] == 10
    # Under `min_samples` runs, no baseline is trusted yet.
    site.ctx.state.put("canary", MODEL_NAME, {"samples": 4, "ttft_ewma": 1e-7, "tps_ewma": 1e9})
    assert by_subject(await site.run("canary"))[MODEL_NAME].status == "ok"
    # A first token sooner than `ttft_floor_ms` is never slow, whatever the baseline.
    site.ctx.state.put("canary", MODEL_NAME, {"samples": 10, "ttft_ewma": 1e-7})
    found = by_subject(await site.run("canary", ttft_floor_ms=600_000))[MODEL_NAME]
    assert found.status == "ok", found


async def test_an_error_or_a_timeout_fails_and_a_stand_in_is_never_reloaded(site: Site) -> None:
    # (The real model may miss so short a deadline on a busy box: its finding is not looked at here.)
    site.services.pool.add(FaultyEngine("sleepy", first_token_delay_s=30.0))
    site.services.pool.add(FaultyEngine("broken", fail_before="unavailable"))
    found = by_subject(await site.run("canary", generation_timeout_seconds=1.0, failures_before_reload=2))
    assert (
        found["sleepy"].status == "fail"
        and found["sleepy"].summary == "canary failed (1 in a row): no answer within 1 s"
    )
    assert found["broken"].status == "fail" and "engine broken is unavailable" in found["broken"].summary
    assert site.services.breakers.get("broken").state == "closed"
    found = by_subject(await site.run("canary"))
    assert "its circuit breaker is open; it cannot be reloaded (the pool did not load it)" in found["broken"].summary
    assert site.services.breakers.get("broken").state == "open"
    assert site.services.breakers.get("sleepy").state == "open"
    assert loads_of(site, "broken") == 0 and site.services.pool.peek("broken") is not None


async def test_a_model_failing_its_canary_is_reloaded_once_then_held_off(site: Site) -> None:
    pool, breaker = site.services.pool, site.services.breakers.get(FLAKY)
    await swap_in_faulty(site, fail_before="unavailable")
    for n in (1, 2):
        found = by_subject(await site.run("canary", failures_before_reload=3))[FLAKY]
        assert found.status == "fail" and found.summary.startswith(f"canary failed ({n} in a row)")
        assert breaker.times_opened == 0 and loads_of(site, FLAKY) == 0

    found = by_subject(await site.run("canary"))[FLAKY]
    assert found.status == "warn" and found.summary.startswith("recovered: canary failed (3 in a row)"), found
    assert "reloaded, and the canary passes again" in found.summary
    assert breaker.times_opened == 1 and breaker.state == "closed"  # opened, then closed by the probe
    assert isinstance(pool.peek(FLAKY), LlamaEngine)  # the real model is back
    events = [(b["event"], b.get("reason")) for b in site.audit_bodies() if b.get("model") == FLAKY]
    assert events == [("model.unloaded", "reloaded after 3 failed health canaries"), ("model.loaded", None)]
    state = site.state("canary", FLAKY)
    assert state is not None and state["reloads"] == 1 and state["failures"] == 0
    assert state["next_reload_at"] - state["last_reload_at"] == 600

    faulty = await swap_in_faulty(site, fail_before="unavailable")  # broken again, within the backoff
    for _ in range(4):
        found = by_subject(await site.run("canary"))[FLAKY]
    assert found.status == "fail" and "so not again before" in found.summary, found
    assert breaker.state == "open" and breaker.times_opened == 2
    assert loads_of(site, FLAKY) == 1 and pool.peek(FLAKY) is faulty  # no second reload
    assert site.state("canary", FLAKY)["reloads"] == 1  # type: ignore[index]


async def test_a_reload_that_fails_is_retried_with_a_doubling_backoff(site: Site, model_path: Path) -> None:
    pool = site.services.pool
    registered = Path(site.services.models.get(FLAKY).path)
    await swap_in_faulty(site, fail_before="unavailable")
    replace_changed(registered)  # so its load, which re-hashes the file, fails
    found = by_subject(await site.run("canary", failures_before_reload=1, reload_backoff_seconds=600))[FLAKY]
    assert found.status == "fail" and "the reload failed" in found.summary and "sha256 mismatch" in found.summary
    assert pool.peek(FLAKY) is None
    state = site.state("canary", FLAKY)
    assert state is not None and state["reload_pending"] and state["failed_reloads"] == 1
    assert state["backoff_seconds"] == 600

    found = by_subject(await site.run("canary"))[FLAKY]  # not loaded, and the backoff holds
    assert found.status == "fail" and "next attempt not before" in found.summary
    assert site.state("canary", FLAKY)["reloads"] == 1  # type: ignore[index]

    site.ctx.state.put("canary", FLAKY, site.state("canary", FLAKY) | {"next_reload_at": 0.0})  # type: ignore[operator]
    found = by_subject(await site.run("canary"))[FLAKY]
    assert found.status == "fail" and "the reload failed" in found.summary
    state = site.state("canary", FLAKY)
    assert state["reloads"] == 2 and state["failed_reloads"] == 2 and state["backoff_seconds"] == 1200  # type: ignore[index]

    restore_link(model_path, registered)
    site.ctx.state.put("canary", FLAKY, state | {"next_reload_at": 0.0})  # type: ignore[operator]
    found = by_subject(await site.run("canary"))[FLAKY]
    assert found.status == "warn" and "reloaded, and the canary passes again" in found.summary, found
    assert isinstance(pool.peek(FLAKY), LlamaEngine)
    state = site.state("canary", FLAKY)
    assert state["failed_reloads"] == 0 and not state["reload_pending"]  # type: ignore[index]
    assert site.services.breakers.get(FLAKY).state == "closed"
    assert by_subject(await site.run("canary"))[FLAKY].status == "ok"


async def test_the_health_prober_still_closes_a_half_open_breaker_with_the_shared_canary(site: Site) -> None:
    now = [1000.0]
    breakers = Breakers(BreakerPolicy(failures=1, window_seconds=60, cooldown_seconds=30), clock=lambda: now[0])
    prober = CanaryProber(breakers, site.services.catalog, interval_seconds=1)
    faulty = FaultyEngine("wobbly", fail_before="unavailable")
    site.services.pool.add(faulty)
    for name in (MODEL_NAME, "wobbly"):
        breakers.get(name).failure("a request failed")
    now[0] += 31  # both half-open
    before = counts(site)
    assert await prober.probe_once() == {MODEL_NAME: "ok", "wobbly": "failed"}
    assert counts(site) == before
    assert breakers.get(MODEL_NAME).state == "closed" and breakers.get("wobbly").state == "open"
    faulty.fail_before = None
    now[0] += 31
    assert await prober.probe_once() == {"wobbly": "ok"}
    assert breakers.get("wobbly").state == "closed" and prober.canaries == 3


def test_a_health_verdict_trips_a_closed_breaker_at_once_and_it_cools_down_as_usual() -> None:
    now = [1000.0]
    breaker = Breakers(BreakerPolicy(failures=5, window_seconds=60, cooldown_seconds=30), clock=lambda: now[0]).get("m")
    breaker.trip("health canary failed 3 times in a row")
    assert breaker.state == "open" and breaker.last_error == "health canary failed 3 times in a row"
    assert breaker.times_opened == 1 and not breaker.allow()
    breaker.trip("again")  # already open: not opened twice, its cooldown not restarted
    assert breaker.times_opened == 1
    now[0] += 31
    assert breaker.state == "half_open" and breaker.allow()
    breaker.success()
    assert breaker.state == "closed"
