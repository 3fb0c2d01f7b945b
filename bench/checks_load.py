"""What the scheduled checks cost serving (issue 17): tokens/s at concurrency 8 on the
default model with no check schedule, against the same with every check running every 10 s
(a canary, GPU, host, SQLite, the audit chain, model files, a backup, upstreams, a two-case
golden set and drift), in the same run: the two appliances run one after the other, round
after round, so a shared machine's drift lands on both sides. Also each check's own cost as
its runs recorded it (wall ms, CPU seconds of its thread). Prints JSON.

    .venv/bin/python bench/checks_load.py [--rounds 3] [--requests 24] [--max-tokens 64] [--seconds-between 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import time

import httpx
from _common import DEFAULT_MODEL, MODEL_NAME, start_appliance, stream_chat, summary

CHECKS = ("canary", "gpu", "host", "sqlite", "audit_chain", "model_files", "backup", "upstreams", "golden", "drift")
GOLDEN = """\
name: bench
target: smollm2-135m-instruct
max_tokens: 16
cases:
  - id: capital
    prompt: "What is the capital of France? Answer in one word."
    assert:
      contains: ["paris"]
  - id: colours
    prompt: "Name a colour."
    assert:
      max_latency_ms: 30000
"""


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.CalledProcessError):
        return platform.processor()


async def _load(url: str, key: str, *, requests: int, concurrency: int, max_tokens: int) -> dict:
    body = {"model": MODEL_NAME, "max_tokens": max_tokens, "temperature": 0.7}
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient() as client:

        async def one(i: int):
            async with gate:
                messages = [{"role": "user", "content": f"Write a short story about item {i}."}]
                return await stream_chat(client, url + "/v1/chat/completions", key, body | {"messages": messages})

        started = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(requests)))
        elapsed = time.perf_counter() - started
    tokens = sum(r.tokens for r in results)
    return {
        "tokens_per_s": round(tokens / elapsed, 2),
        "ttft_s": summary([r.ttft for r in results if r.ttft is not None]),
        "errors": sum(1 for r in results if r.error),
    }


def _check_costs(url: str, key: str) -> dict:
    runs = httpx.get(url + "/admin/checks/history", params={"limit": 1000}, headers={"Authorization": f"Bearer {key}"},
                     timeout=30).json()["data"]
    out: dict[str, dict] = {}
    for name in sorted({r["check"] for r in runs}):
        mine = [r for r in runs if r["check"] == name]
        out[name] = {
            "runs": len(mine),
            "wall_ms_median": round(statistics.median(r["duration_ms"] for r in mine), 2),
            "cpu_s_median": round(statistics.median(r["cpu_seconds"] for r in mine), 4),
            "statuses": sorted({r["status"] for r in mine}),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    base = "[runtime]\nslots = 8\n"
    quiet = base + "[checks]\nenabled = false\n"
    busy = base + "".join(f"[check.{name}]\ninterval_seconds = 10\n" for name in CHECKS)
    rounds: list[dict] = []
    costs: dict = {}
    for n in range(args.rounds):
        row: dict = {}
        for label, config in (("no_checks", quiet), ("checks_every_10s", busy)):
            app = start_appliance(DEFAULT_MODEL, port=18700 + n * 2 + (label != "no_checks"), config=config)
            try:
                if label != "no_checks":
                    golden = app.data_dir / "golden"
                    golden.mkdir(exist_ok=True)
                    (golden / "bench.yaml").write_text(GOLDEN)
                    time.sleep(12)  # let every check run once before measuring
                row[label] = asyncio.run(
                    _load(app.url, app.key, requests=args.requests, concurrency=args.concurrency, max_tokens=args.max_tokens)
                )
                if label != "no_checks":
                    costs = _check_costs(app.url, app.key)
            finally:
                app.stop()
        row["ratio"] = round(row["checks_every_10s"]["tokens_per_s"] / row["no_checks"]["tokens_per_s"], 3)
        rounds.append(row)
    print(json.dumps({
        "cpu": _cpu_model(),
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "rounds": rounds,
        "median_ratio_with_checks": statistics.median(r["ratio"] for r in rounds),
        "check_costs_last_round": costs,
    }, indent=2))


if __name__ == "__main__":
    main()
