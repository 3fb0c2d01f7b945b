"""Event-loop stalls (issue 14): how much 4 MB prompts arriving slow down everyone else's stream.

Streams of ordinary chat requests run at a fixed concurrency; the time between consecutive
tokens of each stream is recorded. Then the same streams run again while another client sends
prompts of about 4 MB, one after another (each refused as too long for the model, after it
was decoded, rendered with the chat template and tokenised: the work that used to run on the
event loop, twice). Both phases run on one server, back to back, in this run; the key keeps
its prompts `redacted` in the audit log, so redaction runs over each one too.

Target: the inter-token gap p99 with the large prompts at most 2x the p99 without.

    .venv/bin/python bench/loop_stall.py [--streams 4] [--max-tokens 160] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time

import httpx
from _common import DEFAULT_MODEL, MODEL_NAME, REPO, percentile, start_appliance

sys.path.insert(0, str(REPO))

PROMPT_BYTES = 4 * 1024 * 1024 - 64 * 1024  # under the 4 MiB body limit with the JSON around it


async def stream_gaps(client: httpx.AsyncClient, url: str, key: str, i: int, max_tokens: int) -> list[float]:
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": f"Write a long story about a lighthouse, part {i}."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    gaps: list[float] = []
    last = None
    async with client.stream("POST", url + "/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {key}"}, timeout=600) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: {") or '"content":"' not in line:
                continue
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now
    return gaps


async def hostile(url: str, key: str, stop: asyncio.Event, sent: list[float]) -> None:
    words = ("Mail jane.doe@example.com or call +1 415 555 2671 about invoice DE89370400440532013000. " * 50_000)
    prompt = words[:PROMPT_BYTES]
    body = json.dumps({"model": MODEL_NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8}).encode()
    async with httpx.AsyncClient(timeout=600) as client:
        while not stop.is_set():
            t0 = time.perf_counter()
            r = await client.post(url + "/v1/chat/completions", content=body,
                                  headers={"Authorization": f"Bearer {key}", "content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text[:300]
            sent.append(time.perf_counter() - t0)


async def phase(url: str, key: str, streams: int, max_tokens: int, *, with_large_prompts: bool) -> dict:
    stop = asyncio.Event()
    handled: list[float] = []
    attack = asyncio.create_task(hostile(url, key, stop, handled)) if with_large_prompts else None
    if attack is not None:
        await asyncio.sleep(0.5)  # the first large prompt is under way
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=streams + 2)) as client:
        results = await asyncio.gather(*(stream_gaps(client, url, key, i, max_tokens) for i in range(streams)))
    stop.set()
    if attack is not None:
        await attack
    gaps = [g for r in results for g in r]
    return {
        "gaps": len(gaps),
        "gap_p50_ms": 1000 * (percentile(gaps, 0.5) or 0),
        "gap_p99_ms": 1000 * (percentile(gaps, 0.99) or 0),
        "gap_max_ms": 1000 * max(gaps, default=0),
        "large_prompts_handled": len(handled),
        "large_prompt_seconds_p50": percentile(handled, 0.5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    app = start_appliance(DEFAULT_MODEL, port=18410)
    try:
        key = json.loads(subprocess.run(
            [sys.executable, "-m", "appliance", "keys", "create", "--name", "bench", "--prompt-retention", "redacted",
             "--data-dir", str(app.data_dir), "--json"], check=True, capture_output=True, text=True,
        ).stdout)["key"]
        from runtime.cpu import detect

        report: dict = {"cpu": detect().model, "streams": args.streams, "max_tokens": args.max_tokens,
                        "prompt_bytes": PROMPT_BYTES, "rounds": []}
        asyncio.run(phase(app.url, key, 2, 16, with_large_prompts=False))  # warm-up
        for _ in range(args.rounds):
            quiet = asyncio.run(phase(app.url, key, args.streams, args.max_tokens, with_large_prompts=False))
            loud = asyncio.run(phase(app.url, key, args.streams, args.max_tokens, with_large_prompts=True))
            report["rounds"].append({"without": quiet, "with_large_prompts": loud,
                                     "p99_ratio": loud["gap_p99_ms"] / max(quiet["gap_p99_ms"], 1e-9)})
        ratios = sorted(r["p99_ratio"] for r in report["rounds"])
        report["median_p99_ratio"] = ratios[len(ratios) // 2]
        report["target"] = "p99 ratio <= 2"
    finally:
        app.stop()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
