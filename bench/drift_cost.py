"""What a drift run costs (issue 17), in wall-clock milliseconds and CPU-seconds:

1. golden: a real `appliance serve` with the default model scores a golden set of N chat cases
   (`POST /admin/drift/golden/<set>/run`, temperature 0, `max_tokens` each, every case also
   embedded for its similarity to the baseline). The first run sets the baseline; the later
   runs are scored against it. CPU-seconds are the server process's (all its threads), read
   from psutil around each run.
2. drift: input and output drift (`drift_report`: one SQL pass with json_extract, the PSI of
   every feature) and setting the baseline, in process on a real store holding R request
   records in each of two windows, written with the real `AuditLog`; hash-only retention, so
   no prompt is embedded. CPU-seconds are this process's (`time.process_time`).
3. centroid: the embedding centroid of K kept prompts by the default model (in process,
   `LlamaEngine.embed`), the part of a drift run that needs prompts kept.

Prints JSON.

    .venv/bin/python bench/drift_cost.py [--only golden|drift|centroid] [--cases 10] [--runs 3]
        [--max-tokens 32] [--records 1000,10000,100000] [--prompts 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.audit import AuditLog, load_or_create_signing_key  # noqa: E402
from appliance.checks.drift import DriftOptions, baseline_fn, build_baseline, drift_report  # noqa: E402
from appliance.checks.features import looks_like_refusal, script_of  # noqa: E402
from appliance.config import DriftSettings  # noqa: E402
from appliance.store import Store  # noqa: E402
from bench._common import DEFAULT_MODEL, MODEL_NAME, start_appliance, summary  # noqa: E402

PROMPTS = [
    "How do I reset my {}?",
    "Where can I find my {}?",
    "My {} stopped working, what now?",
    "Explain {} in one line.",
]
TOPICS = ["password", "invoice", "printer", "VPN", "email", "laptop", "account", "refund", "order", "delivery"]


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def bench_golden(cases: int, runs: int, max_tokens: int) -> dict[str, Any]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = start_appliance(DEFAULT_MODEL, port=port)
    try:
        golden = app.data_dir / "golden"
        golden.mkdir()
        body = {
            "target": MODEL_NAME,
            "max_tokens": max_tokens,
            "cases": [
                {
                    "id": f"case-{i}",
                    "prompt": PROMPTS[i % len(PROMPTS)].format(TOPICS[i % len(TOPICS)]),
                    "assert": {"not_contains": "xylophone", "similarity": True},
                }
                for i in range(cases)
            ],
        }
        (golden / "bench.json").write_text(json.dumps(body))
        process = psutil.Process(app.process.pid)
        out: list[dict[str, Any]] = []
        for _ in range(runs + 1):
            cpu, started = cpu_seconds(process), time.perf_counter()
            response = httpx.post(
                f"{app.url}/admin/drift/golden/bench/run",
                json={},
                headers={"Authorization": f"Bearer {app.key}"},
                timeout=3600,
            )
            response.raise_for_status()
            run = response.json()
            out.append(
                {
                    "ms": (time.perf_counter() - started) * 1000,
                    "cpu_s": cpu_seconds(process) - cpu,
                    "baseline": run["baseline"],
                    "completion_tokens": sum(c.get("completion_tokens", 0) for c in run["cases"]),
                    "status": run["status"],
                }
            )
        scored = out[1:]
        return {
            "cases": cases,
            "max_tokens": max_tokens,
            "baseline_run": out[0],
            "scored_runs": {
                "ms": summary([r["ms"] for r in scored]),
                "cpu_s": summary([r["cpu_s"] for r in scored]),
                "completion_tokens": summary([float(r["completion_tokens"]) for r in scored]),
            },
            "per_case_ms": summary([r["ms"] / cases for r in scored]),
            "per_case_cpu_s": summary([r["cpu_s"] / cases for r in scored]),
        }
    finally:
        app.stop()


def write_window(store: Store, audit: AuditLog, start: float, n: int, seed: int, shift: float) -> None:
    rng = random.Random(seed)
    fns = []
    for i in range(n):
        prompt = rng.choice(PROMPTS).format(rng.choice(TOPICS))
        answer = "I'm sorry, I can't help." if rng.random() < 0.03 + shift / 10 else "Open the settings page."
        body = {
            "request_id": f"r{seed}-{i}",
            "principal": {"key_id": "k", "key_name": "app", "team": "default", "role": "user"},
            "route": "POST /v1/chat/completions",
            "models_tried": [MODEL_NAME],
            "model": MODEL_NAME,
            "outcome": "ok",
            "status": 200,
            "kind": "chat",
            "response_id": f"chatcmpl-{seed}-{i}",
            "tokens": {
                "prompt": int(rng.gauss(40 * (1 + shift), 8)),
                "completion": int(rng.gauss(60, 15)),
                "cached": 0,
            },
            "cost": 0.0002,
            "latency_ms": rng.gauss(800 * (1 + shift), 100),
            "client": "127.0.0.1",
            "user": None,
            "finish_reason": "stop",
            "prompt": {"sha256": "ab" * 32},
            "features": {"script": script_of(prompt), "refusal": looks_like_refusal(answer), "ttft_ms": 5.0},
        }
        fns.append(audit.append_fn("request", body, key_id="k", team_id="default", ts=start + 3600 * i / n))
        if len(fns) == 5000:
            batch, fns = fns, []
            store.write_sync(lambda conn, batch=batch: [fn(conn) for fn in batch])
    store.write_sync(lambda conn: [fn(conn) for fn in fns])


def timed(fn: Any) -> tuple[Any, float, float]:
    cpu, started = time.process_time(), time.perf_counter()
    result = fn()
    return result, (time.perf_counter() - started) * 1000, time.process_time() - cpu


def bench_drift(sizes: list[int]) -> list[dict[str, Any]]:
    out = []
    options = DriftOptions.from_settings(DriftSettings())
    t0 = 1_900_000_000.0
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            store = Store(Path(tmp) / "appliance.db").open()
            audit = AuditLog(store, load_or_create_signing_key(Path(tmp) / "keys"))
            write_window(store, audit, t0, n, seed=1, shift=0.0)
            write_window(store, audit, t0 + 3600, n, seed=2, shift=0.5)
            with store.snapshot() as conn:
                summaries, base_ms, base_cpu = timed(partial(build_baseline, conn, options, start=t0, end=t0 + 3600))
            store.write_sync(baseline_fn(audit, summaries, start=t0, end=t0 + 3600))
            with store.snapshot() as conn:
                report, ms, cpu = timed(partial(drift_report, conn, options, since=t0 + 3600, until=t0 + 7200))
            store.close()
        statuses = {f.subject: f.status for f in report.findings}
        out.append(
            {
                "records_per_window": n,
                "baseline_ms": base_ms,
                "baseline_cpu_s": base_cpu,
                "report_ms": ms,
                "report_cpu_s": cpu,
                "statuses": statuses,
            }
        )
    return out


def bench_centroid(prompts: int, model: Path) -> dict[str, Any]:
    from runtime.llama_engine import LlamaEngine

    engine = LlamaEngine(str(model), name="bench-embed", slots=1, n_ctx_per_slot=512)
    rng = random.Random(3)
    texts = [f"{rng.choice(PROMPTS).format(rng.choice(TOPICS))} (ticket {i})" for i in range(prompts)]
    try:
        asyncio.run(engine.embed(texts[:4]))  # the embedding context is created on first use

        def embed_all() -> int:
            return sum(len(asyncio.run(engine.embed(texts[i : i + 16])).vectors) for i in range(0, len(texts), 16))

        count, ms, cpu = timed(embed_all)
    finally:
        asyncio.run(engine.close())
    return {"prompts": count, "ms": ms, "cpu_s": cpu, "per_prompt_ms": ms / count, "per_prompt_cpu_s": cpu / count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["golden", "drift", "centroid"])
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--records", default="1000,10000,100000")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    args = parser.parse_args()
    out: dict[str, Any] = {"cpus": psutil.cpu_count(), "load_average": list(psutil.getloadavg())}
    if args.only in (None, "drift"):
        out["drift"] = bench_drift([int(n) for n in args.records.split(",")])
    if args.only in (None, "centroid"):
        out["centroid"] = bench_centroid(args.prompts, args.model)
    if args.only in (None, "golden"):
        out["golden"] = bench_golden(args.cases, args.runs, args.max_tokens)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
