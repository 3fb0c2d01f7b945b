"""Input and output drift measured on real audit records: request records written with the real
`AuditLog` (bodies shaped as governance writes them, features from the real feature functions)
into a real SQLite store, in a reference window and a current one, same or shifted. The prompt
centroid is embedded by the real default model."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.audit import verify
from appliance.audit.retention import retain
from appliance.checks.drift import DriftOptions, baseline_fn, build_baseline, drift_report, load_baseline
from appliance.checks.features import looks_like_refusal, script_of
from appliance.config import DriftSettings
from appliance.errors import Conflict
from appliance.store import Store
from tests.audit import open_log

T0 = 1_900_000_000.0  # the reference window is [T0, T0 + HOUR), the current one the next hour
HOUR = 3600.0
OPTIONS = DriftOptions.from_settings(
    DriftSettings(), {"min_requests": 40, "min_feedback": 10, "min_centroid_prompts": 10}
)
TOPICS = ["password", "invoice", "printer", "VPN", "email", "laptop", "account", "refund", "order", "delivery"]
ASKS = [
    "How do I reset my",
    "I cannot access my",
    "Where can I find my",
    "Please help me with my",
    "What should I do about my",
]
RUSSIAN = [
    "Как мне сбросить пароль от почты?",
    "Где найти мой счёт за прошлый месяц?",
    "Принтер не печатает, что делать?",
    "Не могу подключиться к VPN.",
    "Как вернуть деньги за заказ?",
]
CODE = [
    "sorts a list",
    "parses JSON",
    "reverses a string",
    "reads a CSV file",
    "computes a factorial",
    "merges two dicts",
]


def usual(rng: random.Random) -> dict[str, Any]:
    return {
        "prompt": f"{rng.choice(ASKS)} {rng.choice(TOPICS)}? It stopped working {rng.choice(['today', 'yesterday'])}.",
        "answer": "I'm sorry, I can't help with that."
        if rng.random() < 0.03
        else "Open the settings page and follow the steps.",
        "prompt_tokens": max(1, int(rng.gauss(40, 8))),
        "completion_tokens": max(1, int(rng.gauss(60, 15))),
        "finish_reason": "length" if rng.random() < 0.1 else "stop",
        "latency_ms": rng.gauss(800, 100),
        "cost": rng.gauss(0.0002, 0.00002),
    }


def shifted(rng: random.Random) -> dict[str, Any]:
    return {
        "prompt": rng.choice(RUSSIAN) if rng.random() < 0.5 else f"Write a Python function that {rng.choice(CODE)}.",
        "answer": "I'm sorry, I can't help with that." if rng.random() < 0.3 else "Вот ответ на ваш вопрос.",
        "prompt_tokens": max(1, int(rng.gauss(160, 30))),
        "completion_tokens": max(1, int(rng.gauss(200, 20))),
        "finish_reason": "length" if rng.random() < 0.6 else "stop",
        "latency_ms": rng.gauss(2400, 300),
        "cost": rng.gauss(0.0006, 0.00005),
    }


@pytest.fixture
def log(tmp_path: Path) -> Iterator[tuple[Store, Any]]:
    store, audit = open_log(tmp_path)
    with store:
        yield store, audit


def write_requests(
    store: Store,
    audit: Any,
    start: float,
    make: Callable[[random.Random], dict[str, Any]],
    n: int,
    *,
    seed: int,
    retention: str = "sha256",
) -> None:
    """`n` request records in [start, start + HOUR), as governance writes them."""
    rng = random.Random(seed)
    fns = []
    for i in range(n):
        r = make(rng)
        body: dict[str, Any] = {
            "request_id": f"req-{seed}-{i}",
            "principal": {"key_id": "0123456789ab", "key_name": "staff-app", "team": "default", "role": "user"},
            "route": "POST /v1/chat/completions",
            "models_tried": ["smollm2-135m-instruct"],
            "model": "smollm2-135m-instruct",
            "outcome": "ok",
            "status": 200,
            "kind": "chat",
            "response_id": f"chatcmpl-{seed}-{i}",
            "tokens": {"prompt": r["prompt_tokens"], "completion": r["completion_tokens"], "cached": 0},
            "cost": r["cost"],
            "latency_ms": round(r["latency_ms"], 3),
            "client": "127.0.0.1",
            "user": None,
            "finish_reason": r["finish_reason"],
            "features": {"script": script_of(r["prompt"]), "refusal": looks_like_refusal(r["answer"]), "ttft_ms": 5.0},
        }
        kept = retain(retention, r["prompt"])
        assert kept is not None
        body["prompt"] = kept.digest
        content = {"prompt": kept.text} if kept.text is not None else None
        fns.append(
            audit.append_fn(
                "request", body, key_id="0123456789ab", team_id="default", ts=start + HOUR * i / n, content=content
            )
        )
    store.write_sync(lambda conn: [fn(conn) for fn in fns])


def set_baseline(store: Store, audit: Any, embed: Any = None, model: str = "") -> None:
    with store.snapshot() as conn:
        summaries = build_baseline(conn, OPTIONS, start=T0, end=T0 + HOUR, embed=embed, model=model)
    store.write_sync(baseline_fn(audit, summaries, start=T0, end=T0 + HOUR, trigger="test"))


def report(store: Store, embed: Any = None, model: str = "") -> dict[str, Any]:
    with store.snapshot() as conn:
        out = drift_report(conn, OPTIONS, since=T0 + HOUR, until=T0 + 2 * HOUR, embed=embed, model=model)
    return {f.subject: f for f in out.findings}


class Spy:
    """An embedder that must not be called (hash-only retention keeps no text to embed)."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> list[list[float]]:
        self.calls.append(texts)
        return [[1.0, 0.0] for _ in texts]


def test_same_traffic_shows_no_drift(log: tuple[Store, Any]) -> None:
    store, audit = log
    write_requests(store, audit, T0, usual, 120, seed=1)
    write_requests(store, audit, T0 + HOUR, usual, 120, seed=2)
    set_baseline(store, audit)
    found = report(store)
    for name in (
        "prompt_tokens",
        "script",
        "completion_tokens",
        "finish_reason",
        "refusal_rate",
        "latency_p95_ms",
        "cost_per_request",
    ):
        assert found[name].status == "ok", found[name]
        assert found[name].details["reference_count"] == found[name].details["current_count"] == 120
    prompt = found["prompt_tokens"].details
    assert prompt["psi"] < prompt["chance_psi"]  # what two samples of 120 differ by, by chance
    assert found["script"].details["psi"] == 0.0 and found["script"].details["current"] == {"latin": 1.0}


def test_shifted_traffic_drifts_on_every_feature(log: tuple[Store, Any]) -> None:
    store, audit = log
    write_requests(store, audit, T0, usual, 120, seed=1)
    write_requests(store, audit, T0 + HOUR, shifted, 120, seed=3)
    set_baseline(store, audit)
    found = report(store)
    for name in ("prompt_tokens", "script", "completion_tokens", "finish_reason"):
        assert found[name].status == "fail", found[name]
        assert found[name].details["psi"] >= OPTIONS.psi_fail
    for name in ("refusal_rate", "latency_p95_ms", "cost_per_request"):
        assert found[name].status == "fail", found[name]
        assert found[name].details["change"] >= 1.0
    prompt = found["prompt_tokens"].details
    assert prompt["reference"]["mean"] == pytest.approx(40, abs=3) and prompt["current"]["mean"] == pytest.approx(
        160, abs=10
    )
    assert found["script"].details["current"]["cyrillic"] == pytest.approx(0.5, abs=0.12)
    assert found["latency_p95_ms"].details["current"] > 2 * found["latency_p95_ms"].details["reference"]


def test_too_little_traffic_is_not_an_alarm(log: tuple[Store, Any]) -> None:
    store, audit = log
    write_requests(store, audit, T0, usual, 120, seed=1)
    write_requests(store, audit, T0 + HOUR, shifted, 10, seed=3)  # shifted, but 10 < min_requests
    set_baseline(store, audit)
    found = report(store)
    assert found["prompt_tokens"].status == "ok" and found["prompt_tokens"].summary.startswith("not enough traffic")
    assert all(f.status == "ok" for f in found.values())


def test_hash_only_retention_uses_no_prompt_text(log: tuple[Store, Any]) -> None:
    store, audit = log
    write_requests(store, audit, T0, usual, 60, seed=1, retention="sha256")
    write_requests(store, audit, T0 + HOUR, shifted, 60, seed=3, retention="sha256")
    spy = Spy()
    set_baseline(store, audit, embed=spy, model="m")
    found = report(store, embed=spy, model="m")
    assert spy.calls == []  # no text was read, so nothing was embedded
    assert store.query_one("SELECT COUNT(*) AS n FROM audit_content")["n"] == 0
    centroid = found["embedding_centroid"]
    assert centroid.status == "ok" and "not available (prompts not kept)" in centroid.summary
    assert centroid.details["available"] is False
    assert found["script"].status == "fail"  # the features stored at request time still tell


def test_no_baseline_yet_and_a_baseline_needs_traffic(log: tuple[Store, Any]) -> None:
    store, audit = log
    write_requests(store, audit, T0 + HOUR, usual, 60, seed=1)
    found = report(store)
    assert list(found) == ["baseline"] and found["baseline"].status == "ok"
    with store.snapshot() as conn, pytest.raises(Conflict, match="only 0 requests"):
        build_baseline(conn, OPTIONS, start=T0, end=T0 + HOUR)


def test_a_baseline_is_stored_with_an_audit_record(log: tuple[Store, Any], tmp_path: Path) -> None:
    store, audit = log
    write_requests(store, audit, T0, usual, 50, seed=1)
    set_baseline(store, audit)
    with store.snapshot() as conn:
        stored = load_baseline(conn)
        assert verify(conn, public_key=audit.signer.public_key_hex).ok
    assert stored is not None and stored["window_start"] == T0 and stored["input"]["count"] == 50
    assert set(stored["output"]["finish_reason"]) <= {"stop", "length"}
    edges = stored["input"]["prompt_tokens"]["edges"]
    assert edges == sorted(edges) and len(stored["input"]["prompt_tokens"]["shares"]) == len(edges) + 1
    record = store.query_one("SELECT body FROM audit WHERE kind = 'system' ORDER BY idx DESC LIMIT 1")
    assert '"event":"drift.baseline"' in record["body"] and '"requests":50' in record["body"]


def test_feedback_scores_per_model(log: tuple[Store, Any]) -> None:
    store, audit = log
    write_requests(store, audit, T0, usual, 50, seed=1)

    def feedback(conn: Any) -> None:
        rng = random.Random(5)
        for i in range(30):  # model a: liked, then disliked; model b: too little feedback
            for model, start, score in (("a", T0, 0.9), ("a", T0 + HOUR, 0.4), ("b", T0 + HOUR, 0.0)):
                if model == "b" and i >= 3:
                    continue
                conn.execute(
                    "INSERT INTO feedback (id, response_id, request_idx, model, rating, score, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        f"{model}-{start}-{i}",
                        f"r-{i}",
                        1,
                        model,
                        "up",
                        min(1.0, max(0.0, rng.gauss(score, 0.05))),
                        start + i,
                    ),
                )

    store.write_sync(feedback)
    set_baseline(store, audit)
    found = report(store)
    a = found["feedback_score:a"]
    assert a.status == "fail" and a.details["change"] == pytest.approx(-0.5, abs=0.05)
    assert a.details["reference_count"] == a.details["current_count"] == 30
    assert found["feedback_score:b"].status == "ok" and "not enough feedback" in found["feedback_score:b"].summary


@pytest.fixture(scope="module")
def embedder(model_path: Path) -> Iterator[Callable[[list[str]], list[list[float]]]]:
    from runtime.llama_engine import LlamaEngine

    engine = LlamaEngine(str(model_path), name="drift-embed", slots=1, n_ctx_per_slot=512)
    yield lambda texts: asyncio.run(engine.embed(texts)).vectors
    asyncio.run(engine.close())


def test_prompt_centroid_from_kept_prompts(
    log: tuple[Store, Any], embedder: Callable[[list[str]], list[list[float]]]
) -> None:
    """The same kind of prompts an hour later stay near the reference's centroid; Russian
    and code prompts move it (embedded by the real model)."""
    store, audit = log
    write_requests(store, audit, T0, usual, 30, seed=1, retention="full")
    write_requests(store, audit, T0 + HOUR, usual, 30, seed=2, retention="full")
    write_requests(store, audit, T0 + 2 * HOUR, shifted, 30, seed=3, retention="full")
    options = DriftOptions.from_settings(DriftSettings(), {"min_requests": 20, "min_centroid_prompts": 10})
    with store.snapshot() as conn:
        summaries = build_baseline(conn, options, start=T0, end=T0 + HOUR, embed=embedder, model="smollm2")
    assert summaries["input"]["embedding_centroid"]["count"] == 30
    store.write_sync(baseline_fn(audit, summaries, start=T0, end=T0 + HOUR))
    found = []
    with store.snapshot() as conn:
        for hour in (1, 2):
            out = drift_report(
                conn, options, since=T0 + hour * HOUR, until=T0 + (hour + 1) * HOUR, embed=embedder, model="smollm2"
            )
            found.append({f.subject: f for f in out.findings})
    same, moved = found
    near, far = same["embedding_centroid"], moved["embedding_centroid"]
    assert near.details["available"] is True and near.details["current_count"] == 30
    assert near.status == "ok" and near.details["distance"] < options.centroid_warn
    assert far.status in ("warn", "fail") and far.details["distance"] >= options.centroid_warn
    assert far.details["distance"] > 10 * near.details["distance"]


@pytest.mark.parametrize(
    ("text", "script"),
    [
        ("Say hello.", "latin"),
        ("Grüße aus Köln", "latin"),
        ("12345 !!", "none"),
        ("", "none"),
        ("Привет, мир", "cyrillic"),
        ("hi Привет мир", "cyrillic"),
        ("你好，世界", "cjk"),
        ("Καλημέρα", "greek"),
    ],
)
def test_the_script_of_a_prompt_is_that_of_most_of_its_letters(text: str, script: str) -> None:
    assert script_of(text) == script
