"""Serving-core benchmark (issue 3): cold start of `appliance serve` to /readyz 200 with the
default model, single-stream tokens/s through the HTTP API, and raw `llama_cpp.Llama` in
process on the same model and thread count, all in one run. Prints JSON.

    .venv/bin/python bench/serving.py [--runs 5] [--max-tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import httpx
from _common import DEFAULT_MODEL, MODEL_NAME, start_appliance, stream_chat, summary

MESSAGES = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]


def raw_llama(model: Path, *, threads: int, max_tokens: int, runs: int) -> dict:
    import llama_cpp

    from runtime.backend import ensure_backend

    ensure_backend()  # the appliance's build loads its CPU kernels at run time
    llm = llama_cpp.Llama(str(model), n_ctx=2048, n_threads=threads, n_batch=512, verbose=False)
    rates, ttfts = [], []
    for _ in range(runs + 1):
        t0 = time.perf_counter()
        first = None
        n = 0
        for chunk in llm.create_chat_completion(MESSAGES, max_tokens=max_tokens, temperature=0, stream=True):
            if chunk["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter()
                n += 1
        total = time.perf_counter() - t0
        rates.append(n / total)
        ttfts.append((first or t0) - t0)
    return {"tokens_per_s": statistics.fmean(rates[1:]), "ttft_s": summary(ttfts[1:]), "tokens": n}


async def appliance_single_stream(url: str, key: str, *, max_tokens: int, runs: int) -> dict:
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0}
    rates, ttfts, tokens = [], [], 0
    async with httpx.AsyncClient() as client:
        for i in range(runs + 1):
            result = await stream_chat(client, url + "/v1/chat/completions", key, body)
            if result.error:
                raise RuntimeError(result.error)
            if i:  # the first run warms up
                rates.append(result.tokens / result.latency)
                ttfts.append(result.ttft or 0.0)
            tokens = result.tokens
    return {"tokens_per_s": statistics.fmean(rates), "ttft_s": summary(ttfts), "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--port", type=int, default=18080)
    args = parser.parse_args()

    config = f"[runtime]\nn_threads = {args.threads}\n"
    cold = []
    for i in range(3):
        app = start_appliance(args.model, port=args.port + i, config=config)
        cold.append(app.cold_start_s)
        if i < 2:
            app.stop()
    single = asyncio.run(appliance_single_stream(app.url, app.key, max_tokens=args.max_tokens, runs=args.runs))
    rss = app.rss_mb()
    app.stop()
    raw = raw_llama(args.model, threads=args.threads, max_tokens=args.max_tokens, runs=args.runs)
    print(json.dumps({
        "model": args.model.name,
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "cold_start_s": summary(cold),
        "appliance_http_single_stream": single,
        "raw_llama_in_process": raw,
        "ratio_appliance_to_raw": single["tokens_per_s"] / raw["tokens_per_s"],
        "appliance_rss_mb_after": rss,
    }, indent=2))


if __name__ == "__main__":
    main()
