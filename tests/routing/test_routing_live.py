"""Routes end to end on one real process: every fallback trigger, mid-stream failure, circuit
breakers, the decision trail in headers and audit, usage settled against the candidate that
served, the `auto` router over real models, `keyword_router`, and `/v1/models`."""

from __future__ import annotations

import concurrent.futures
import json
import time

import pytest

from tests.conftest import run_cli
from tests.routing.conftest import (
    GEMMA_NAME,
    MODEL_NAME,
    SPARE,
    TINY,
    Site,
    admin,
    chat,
    complete,
    put_route,
    request_record,
    sse_events,
)

HARD = (
    "Prove that the square root of 2 is irrational, then derive a closed form for the n-th Fibonacci number "
    "step by step, and explain the time complexity of computing it by matrix exponentiation."
)
EASY = "Say hello."
LONG = "one two three four five six seven eight nine ten"  # the FaultyEngine echoes it: enough tokens to fail after


def served(response) -> tuple[str, str]:  # noqa: ANN001
    return response.headers["x-appliance-model"], response.headers["x-appliance-route"]


@pytest.fixture(autouse=True)
def healthy(site: Site) -> None:
    for engine in ("broken", "slow"):
        site.fault(engine)


def test_an_engine_error_falls_back_with_the_trail_in_headers_and_audit(site: Site) -> None:
    put_route(site, "r-error", ["broken", MODEL_NAME])
    site.fault("broken", fail_before="unavailable")
    response = chat(site, "r-error")
    assert response.status_code == 200, response.text
    model, trail = served(response)
    assert model == MODEL_NAME
    assert trail == f"r-error>broken; fallback:error>{MODEL_NAME}"
    assert response.json()["model"] == MODEL_NAME
    record = request_record(site, response.headers["x-request-id"])
    assert record["body"]["route_trail"] == trail
    assert record["body"]["models_tried"] == ["broken", MODEL_NAME]
    assert record["body"]["model"] == MODEL_NAME


def test_overload_falls_back(site: Site) -> None:
    put_route(site, "r-overload", ["broken", MODEL_NAME])
    site.fault("broken", fail_before="overloaded")
    response = chat(site, "r-overload")
    assert response.status_code == 200, response.text
    assert served(response) == (MODEL_NAME, f"r-overload>broken; fallback:overloaded>{MODEL_NAME}")


def test_every_candidate_overloaded_is_a_503_with_retry_after(site: Site) -> None:
    put_route(site, "r-full", ["broken"])
    site.fault("broken", fail_before="overloaded", retry_after=3)
    response = chat(site, "r-full")
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_a_context_too_small_moves_to_a_candidate_that_fits(site: Site) -> None:
    put_route(site, "r-context", [TINY, MODEL_NAME])
    long_prompt = "Summarise this: " + "the quick brown fox jumps over the lazy dog. " * 30  # ~300 tokens > 128
    response = chat(site, "r-context", long_prompt)
    assert response.status_code == 200, response.text
    assert served(response) == (MODEL_NAME, f"r-context>{TINY}; fallback:context>{MODEL_NAME}")
    short = chat(site, "r-context", EASY)
    assert served(short) == (TINY, f"r-context>{TINY}")


def test_a_candidate_prompt_limit_is_a_fallback_trigger(site: Site) -> None:
    put_route(site, "r-limit", [{"model": SPARE, "max_prompt_tokens": 20}, MODEL_NAME])
    response = chat(site, "r-limit", "Describe, in detail, the seasons of the year and what each one is like.")
    assert served(response) == (MODEL_NAME, f"r-limit>{SPARE}; fallback:context>{MODEL_NAME}")


def test_no_first_token_before_the_deadline_falls_back(site: Site) -> None:
    put_route(site, "r-slow", ["slow", MODEL_NAME], first_token_timeout_seconds=0.5)
    site.fault("slow", first_token_delay_s=10)
    started = time.monotonic()
    response = chat(site, "r-slow")
    assert response.status_code == 200, response.text
    assert served(response) == (MODEL_NAME, f"r-slow>slow; fallback:timeout>{MODEL_NAME}")
    assert time.monotonic() - started < 10  # it did not wait for the slow engine


def test_a_failure_after_the_first_token_ends_the_stream_with_an_error_event(site: Site) -> None:
    put_route(site, "r-mid", ["broken", MODEL_NAME])
    site.fault("broken", fail_after_tokens=3, mid_stream="finish")
    response = chat(site, "r-mid", LONG, stream=True, max_tokens=16)
    assert response.status_code == 200
    assert served(response)[0] == "broken"
    events = sse_events(response)
    assert "[DONE]" not in events
    error = events[-1]["error"]
    assert set(error) == {"message", "type", "param", "code"}
    tokens = [e for e in events if isinstance(e, dict) and "choices" in e and e["choices"][0]["delta"].get("content")]
    assert tokens  # the client saw tokens first: no fallback is possible any more
    record = request_record(site, response.headers["x-request-id"])
    assert (record["body"]["outcome"], record["body"]["model"]) == ("error", "broken")
    assert record["body"]["models_tried"] == ["broken"]


def test_a_failure_mid_way_of_an_unsent_answer_falls_back(site: Site) -> None:
    put_route(site, "r-mid-whole", ["broken", MODEL_NAME])
    site.fault("broken", fail_after_tokens=3, mid_stream="raise")
    response = chat(site, "r-mid-whole", LONG, max_tokens=16)
    assert response.status_code == 200, response.text
    assert served(response) == (MODEL_NAME, f"r-mid-whole>broken; fallback:error>{MODEL_NAME}")


def test_breaker_opens_after_failures_goes_half_open_and_closes_on_a_good_probe(site: Site) -> None:
    put_route(site, "r-breaker", ["broken", MODEL_NAME])
    _fresh_breaker(site, "r-breaker", "broken")
    opened = _breaker(site, "r-breaker", "broken")["times_opened"]
    site.fault("broken", fail_before="unavailable")
    before = site.calls("broken")
    for _ in range(2):
        assert chat(site, "r-breaker").status_code == 200
    assert _breaker(site, "r-breaker", "broken")["state"] == "closed"
    assert chat(site, "r-breaker").status_code == 200  # breaker_failures = 3; each attempt a fallback moved on from counts
    state = _breaker(site, "r-breaker", "broken")
    # Open, or half-open already if the cooldown of 5 s passed on a slow box.
    assert state["state"] != "closed" and state["times_opened"] == opened + 1
    assert "unavailable" in state["last_error"]

    # Still broken: each half-open spell lets exactly one attempt through (a request or the
    # prober's canary), which fails and opens the breaker again, however many requests come.
    deadline = time.monotonic() + 12  # a cooldown of 5 s: at least two half-open spells
    trails: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        while time.monotonic() < deadline:
            responses = list(pool.map(lambda _: chat(site, "r-breaker"), range(4)))
            assert [(r.status_code, r.text) for r in responses if r.status_code != 200] == []
            trails += [r.headers["x-appliance-route"] for r in responses]
    assert f"r-breaker; skip:breaker_open(broken)>{MODEL_NAME}" in trails  # the open breaker kept requests away
    state = _breaker(site, "r-breaker", "broken")
    probes = site.calls("broken") - (before + 3)
    reopened = state["times_opened"] - (opened + 1)
    assert reopened >= 1
    assert probes in (reopened, reopened + 1)  # one per half-open spell (one may be in flight)

    # Healthy again: the next probe succeeds and closes it, and requests go to it again.
    site.fault("broken")
    _wait_for_state(site, "r-breaker", "broken", "closed")
    assert served(chat(site, "r-breaker")) == ("broken", "r-breaker>broken")


def _fresh_breaker(site: Site, route: str, candidate: str) -> None:
    """Closed, with no failures in its window (earlier tests failed this candidate too)."""
    _wait_for_state(site, route, candidate, "closed")
    response = chat(site, route)
    assert response.headers["x-appliance-model"] == candidate  # a success clears the window
    assert _breaker(site, route, candidate)["recent_failures"] == 0


def _breaker(site: Site, route: str, candidate: str) -> dict:
    return admin(site, "GET", f"/admin/routes/{route}").json()["breakers"][candidate]


def _wait_for_state(site: Site, route: str, candidate: str, want: str, timeout: float = 40) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if admin(site, "GET", f"/admin/routes/{route}").json()["breakers"][candidate]["state"] == want:
            return
        time.sleep(0.1)
    raise AssertionError(f"breaker of {candidate} never became {want}")


def test_usage_is_settled_against_the_candidate_that_served(site: Site) -> None:
    put_route(site, "r-usage", ["broken", SPARE])
    site.fault("broken", fail_before="unavailable")
    before = _usage_by_model(site)
    response = chat(site, "r-usage", max_tokens=4)
    assert response.status_code == 200
    usage = response.json()["usage"]
    after = _usage_by_model(site)
    assert after.get(SPARE, {}).get("requests", 0) == before.get(SPARE, {}).get("requests", 0) + 1
    assert after.get(SPARE, {}).get("completion_tokens", 0) - before.get(SPARE, {}).get("completion_tokens", 0) == (
        usage["completion_tokens"]
    )
    assert after.get("broken", {}).get("requests", 0) == before.get("broken", {}).get("requests", 0)


def _usage_by_model(site: Site) -> dict[str, dict]:
    """Usage is committed before the response ends, so it is there once the call returns."""
    rows = admin(site, "GET", "/admin/usage", params={"by": "model"}).json()["data"]
    return {r["model"]: r for r in rows}


def test_auto_sends_easy_chat_to_the_cheap_candidate_and_hard_to_the_trusted_one(site: Site) -> None:
    put_route(site, "auto", [
        {"model": SPARE, "max_difficulty": 0.5, "cost_per_1k_tokens": 0.0001},
        {"model": MODEL_NAME, "cost_per_1k_tokens": 0.01},
    ], strategy="auto")
    easy = chat(site, "auto", EASY)
    model, trail = served(easy)
    assert model == SPARE and trail.startswith("auto>score=") and trail.endswith(f">{SPARE}")
    assert float(trail.split("score=")[1].split(">")[0]) <= 0.5
    hard = chat(site, "auto", HARD)
    model, trail = served(hard)
    assert model == MODEL_NAME, trail
    assert float(trail.split("score=")[1].split(">")[0]) > 0.5


def test_auto_on_completions_sends_hard_prompts_to_gemma(site: Site) -> None:
    put_route(site, "auto-complete", [
        {"model": SPARE, "max_difficulty": 0.5, "cost_per_1k_tokens": 0.0001},
        {"model": GEMMA_NAME, "cost_per_1k_tokens": 0.002},
    ], strategy="auto")
    hard = complete(site, "auto-complete", HARD)
    assert hard.status_code == 200, hard.text
    assert served(hard)[0] == GEMMA_NAME
    assert hard.json()["choices"][0]["text"]  # Gemma really completed it
    easy = complete(site, "auto-complete", "The capital of France is")
    assert served(easy)[0] == SPARE


def test_gemma_is_never_offered_a_chat_request(site: Site) -> None:
    put_route(site, "r-chat-only", [GEMMA_NAME, MODEL_NAME])
    response = chat(site, "r-chat-only")
    assert served(response) == (MODEL_NAME, f"r-chat-only>{MODEL_NAME}")
    explained = admin(site, "POST", "/admin/routes/explain", json={"model": "r-chat-only", "prompt": EASY}).json()
    assert explained["skipped"] == {GEMMA_NAME: "cannot do chat"}


def test_cheapest_orders_by_price(site: Site) -> None:
    put_route(site, "r-cheap", [
        {"model": MODEL_NAME, "cost_per_1k_tokens": 0.02},
        {"model": SPARE, "cost_per_1k_tokens": 0.001},
    ], strategy="cheapest")
    assert served(chat(site, "r-cheap")) == (SPARE, f"r-cheap>cheapest>{SPARE}")


def test_conditions_keys_teams_and_tags(site: Site) -> None:
    other = json.loads(run_cli("keys", "create", "--name", "other-app", "--role", "user", "--json",
                               data_dir=site.data_dir).stdout)
    mine = admin(site, "GET", "/admin/keys").json()["data"]
    staff_id = next(k["id"] for k in mine if k["name"] == "staff-app")
    put_route(site, "r-cond", [
        {"model": SPARE, "keys": [staff_id]},
        {"model": TINY, "tags": ["legal"]},
        MODEL_NAME,
    ])
    assert served(chat(site, "r-cond"))[0] == SPARE
    assert served(chat(site, "r-cond", key=other["key"]))[0] == MODEL_NAME
    assert served(chat(site, "r-cond", key=other["key"], tags="legal"))[0] == TINY


def test_keyword_router_sends_matching_prompts_to_its_route(site: Site) -> None:
    put_route(site, "helpdesk", [MODEL_NAME, SPARE])
    plain = chat(site, "helpdesk", "My printer is jammed.")
    assert served(plain) == (MODEL_NAME, f"helpdesk>{MODEL_NAME}")
    escalated = chat(site, "helpdesk", "ESCALATE: my printer is on fire.")
    assert served(escalated) == (SPARE, f"helpdesk>keyword_router>{SPARE}")
    check = admin(site, "POST", "/admin/plugins/keyword_router/routes/check",
                  json={"text": "please ESCALATE", "model": "helpdesk"})
    assert check.json() == {"rule": "escalate", "to": [SPARE]}


def test_models_lists_the_routes_a_key_may_use(site: Site) -> None:
    put_route(site, "r-listed", [MODEL_NAME])
    listed = {m["id"]: m["owned_by"] for m in chat_models(site, site.user_key)}
    assert listed["r-listed"] == "route" and listed[MODEL_NAME] == "appliance"
    narrow = json.loads(run_cli("keys", "create", "--name", "narrow", "--role", "user", "--model", MODEL_NAME, "--json",
                                data_dir=site.data_dir).stdout)
    listed = {m["id"] for m in chat_models(site, narrow["key"])}
    assert "r-listed" not in listed and MODEL_NAME in listed
    refused = chat(site, "r-listed", key=narrow["key"])
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"


def chat_models(site: Site, key: str) -> list[dict]:
    import httpx

    response = httpx.get(site.base_url + "/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert response.status_code == 200
    return response.json()["data"]


def test_route_changes_are_audited_with_before_and_after(site: Site) -> None:
    put_route(site, "r-audited", [MODEL_NAME])
    put_route(site, "r-audited", [SPARE, MODEL_NAME], description="spare first")
    assert admin(site, "DELETE", "/admin/routes/r-audited").status_code == 200
    records = [r for r in admin(site, "GET", "/admin/audit", params={"kind": "admin", "limit": 1000}).json()["data"]
               if r["body"].get("target") == "r-audited"]
    actions = [r["body"]["action"] for r in records]
    assert actions == ["routes.set", "routes.set", "routes.delete"]
    second = records[1]["body"]
    assert [c["model"] for c in second["before"]["candidates"]] == [MODEL_NAME]
    assert [c["model"] for c in second["after"]["candidates"]] == [SPARE, MODEL_NAME]
    assert chat(site, "r-audited").status_code == 404


def test_explain_shows_the_decision_without_running_it(site: Site) -> None:
    put_route(site, "r-explain", ["broken", MODEL_NAME])
    before = site.calls("broken")
    out = admin(site, "POST", "/admin/routes/explain", json={"model": "r-explain", "prompt": EASY}).json()
    assert out["candidates"] == ["broken", MODEL_NAME]
    assert out["trail"] == "r-explain>broken"
    assert set(out["breakers"]) == {"broken", MODEL_NAME}
    assert site.calls("broken") == before


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"candidates": [{"model": "no-such-model"}]}, 404),
        ({"candidates": []}, 400),
        ({"candidates": [{"model": MODEL_NAME}], "strategy": "random"}, 400),
        ({"candidates": [{"model": MODEL_NAME, "max_difficulty": 2}]}, 400),
        ({"candidates": [{"model": MODEL_NAME}], "surprise": 1}, 400),
    ],
)
def test_bad_routes_are_refused_clearly(site: Site, body: dict, status: int) -> None:
    response = admin(site, "PUT", "/admin/routes/r-bad", json=body)
    assert response.status_code == status, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert admin(site, "GET", "/admin/routes/r-bad").status_code == 404


def test_a_route_cannot_hide_a_model_or_take_a_reserved_name(site: Site) -> None:
    assert admin(site, "PUT", f"/admin/routes/{MODEL_NAME}", json={"candidates": [{"model": SPARE}]}).status_code == 409
    assert admin(site, "PUT", "/admin/routes/explain", json={"candidates": [{"model": SPARE}]}).status_code in (405, 409)


def test_recalibrating_through_the_api_moves_auto_decisions_at_once(site: Site) -> None:
    put_route(site, "auto-cal", [
        {"model": SPARE, "max_difficulty": 0.5, "cost_per_1k_tokens": 0.0001},
        {"model": MODEL_NAME, "cost_per_1k_tokens": 0.01},
    ], strategy="auto")
    prompt = "Write a short poem about the sea."
    assert served(chat(site, "auto-cal", prompt))[0] == SPARE
    # A site whose golden set calls everything above a very low score hard.
    from appliance.routing.classifier import DifficultyClassifier

    classifier = DifficultyClassifier.load()
    raw = classifier.score(prompt)
    examples = [{"prompt": f"{'x' * i}", "label": "easy"} for i in range(1, 11)]
    examples += [{"prompt": prompt, "label": "hard"} for _ in range(15)]
    low = [e for e in examples if e["label"] == "easy" and classifier.score(e["prompt"]) >= raw]
    assert not low  # the easy ones score below the poem, so the cut falls under it
    golden = {label: [{"prompt": e["prompt"]} for e in examples if e["label"] == label] for label in ("easy", "hard")}
    fitted = admin(site, "PUT", "/admin/router/calibration", json=golden)
    assert fitted.status_code == 200, fitted.text
    assert fitted.json()["calibrated"] and fitted.json()["threshold"] < raw
    try:
        assert served(chat(site, "auto-cal", prompt))[0] == MODEL_NAME
        bad = admin(site, "PUT", "/admin/router/calibration", json={"easy": golden["easy"], "medium": golden["hard"]})
        assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}
        few = admin(site, "PUT", "/admin/router/calibration", json={"easy": golden["easy"], "hard": golden["hard"][:5]})
        assert few.status_code == 400
        assert admin(site, "GET", "/admin/router/calibration").json()["threshold"] == fitted.json()["threshold"]
    finally:
        reset = admin(site, "DELETE", "/admin/router/calibration")
        assert reset.status_code == 200 and not reset.json()["calibrated"]
    assert served(chat(site, "auto-cal", prompt))[0] == SPARE


def test_an_engine_that_raises_mid_stream_still_ends_with_an_error_event(site: Site) -> None:
    put_route(site, "r-mid-raise", ["broken", MODEL_NAME])
    site.fault("broken", fail_after_tokens=2, mid_stream="raise")
    response = chat(site, "r-mid-raise", LONG, stream=True, max_tokens=16)
    events = sse_events(response)
    assert "[DONE]" not in events
    assert set(events[-1]["error"]) == {"message", "type", "param", "code"}
    record = request_record(site, response.headers["x-request-id"])
    assert record["body"]["outcome"] == "error"


def test_a_recovered_local_model_is_closed_by_a_free_canary(site: Site) -> None:
    put_route(site, "r-canary", ["broken", MODEL_NAME])
    _fresh_breaker(site, "r-canary", "broken")
    site.fault("broken", fail_before="unavailable")
    for _ in range(3):
        chat(site, "r-canary")
    assert admin(site, "GET", "/admin/routes/r-canary").json()["breakers"]["broken"]["state"] == "open"
    site.fault("broken")
    before_calls, before_usage = site.calls("broken"), _usage_by_model(site).get("broken", {}).get("requests", 0)
    _wait_for_state(site, "r-canary", "broken", "closed")  # no request was sent: the prober did it
    assert site.calls("broken") > before_calls
    assert _usage_by_model(site).get("broken", {}).get("requests", 0) == before_usage  # billed to no one


def test_admin_models_shows_each_models_breaker(site: Site) -> None:
    put_route(site, "r-models", [MODEL_NAME])
    assert chat(site, "r-models").status_code == 200
    models = {m["name"]: m for m in admin(site, "GET", "/admin/models").json()["data"]}
    assert set(models) >= {MODEL_NAME, SPARE, TINY, GEMMA_NAME}
    breaker = models[MODEL_NAME]["breaker"]
    assert (breaker["state"], breaker["recent_failures"]) == ("closed", 0)
    assert set(breaker) == {"state", "recent_failures", "last_error", "times_opened", "seconds_since_change",
                            "half_open_in_seconds"}
