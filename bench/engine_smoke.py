"""In-process LlamaEngine smoke benchmark; prints JSON.

Measures, on the default model: single-stream decode speed next to raw `llama_cpp.Llama` with
the same threads (runs interleaved, so both see the same machine); eight concurrent streams
(aggregate tokens/s, time to first token p50/p95); time to first token with a ~500-token system
prompt, cold and then warm from the prefix cache; and eight concurrent requests sharing that
system prompt. On a shared machine each run first waits (up to 60 s) for the CPUs to go quiet.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import raw_llama  # noqa: E402
from runtime.engine import GenerationRequest, SamplingParams, TokenEvent  # noqa: E402
from runtime.llama_engine import LlamaEngine  # noqa: E402
from runtime.model_file import inspect_model  # noqa: E402
from runtime.weights import serve_weights  # noqa: E402

GREEDY = SamplingParams(temperature=0)
TOPICS = ["volcanoes", "the moon", "bread", "chess", "rivers", "owls", "copper", "jazz"]
RULES = " ".join(f"Rule {i}: answer questions about topic {i} politely and briefly." for i in range(32))


def cpu_idle_fraction(window: float = 0.5) -> float:
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            values = [int(v) for v in fh.readline().split()[1:]]
        return values[3] + values[4], sum(values)

    idle0, total0 = sample()
    time.sleep(window)
    idle1, total1 = sample()
    return (idle1 - idle0) / max(1, total1 - total0)


def wait_quiet(max_wait: float = 60.0) -> None:
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline and os.path.exists("/proc/stat") and cpu_idle_fraction() < 0.9:
        pass


def raw_in_child(model: str, threads: int, max_tokens: int) -> float:
    """One raw `llama_cpp.Llama` run in its own process: a second llama context in this process
    would give libgomp two thread teams on two cores, and it then throttles both (see
    runtime/_embedder.py), which slowed the engine and the baseline alike to a third."""
    out = subprocess.run(
        [
            sys.executable,
            str(Path(raw_llama.__file__)),
            "--model",
            model,
            "--threads",
            str(threads),
            "--max-tokens",
            str(max_tokens),
            "--runs",
            "1",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(json.loads(out.stdout)["decode_tokens_per_s"])


def chat(text: str, system: str | None = None) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def timed(engine: LlamaEngine, req: GenerationRequest) -> dict:
    start = time.perf_counter()
    first = None
    finished = None
    async for event in engine.generate(req):
        if isinstance(event, TokenEvent):
            if first is None:
                first = time.perf_counter()
        else:
            finished = event
    end = time.perf_counter()
    return {
        "ttft": first - start,
        "decode_s": end - first,
        "tokens": finished.completion_tokens,
        "cached": finished.cached_tokens,
    }


async def concurrent(engine: LlamaEngine, reqs: list[GenerationRequest]) -> dict:
    start = time.perf_counter()
    results = await asyncio.gather(*(timed(engine, r) for r in reqs))
    wall = time.perf_counter() - start
    return {"tokens_per_s": sum(r["tokens"] for r in results) / wall, "results": results}


async def bench(engine: LlamaEngine, raw, max_tokens: int, runs: int) -> dict:
    story = GenerationRequest(max_tokens=max_tokens, messages=raw_llama.PROMPT, sampling=GREEDY)
    single, base = [], []
    for _ in range(runs):
        await engine.clear_prefix_cache()
        wait_quiet()
        r = await timed(engine, story)
        single.append((r["tokens"] - 1) / r["decode_s"])
        if raw is not None:
            wait_quiet()
            base.append(raw(max_tokens))

    eight = []
    for _ in range(runs):
        await engine.clear_prefix_cache()
        wait_quiet()
        reqs = [
            GenerationRequest(max_tokens=max_tokens, messages=chat(f"Write a long essay about {t}."), sampling=GREEDY)
            for t in TOPICS
        ]
        eight.append(await concurrent(engine, reqs))
    ttfts = [r["ttft"] for run in eight for r in run["results"]]

    prefix = []
    for _ in range(runs):
        system = f"Session {uuid.uuid4().hex}. You are the help desk assistant. {RULES}"
        wait_quiet()
        cold = await timed(
            engine,
            GenerationRequest(max_tokens=16, messages=chat("How do I reset my password?", system), sampling=GREEDY),
        )
        warm = await timed(
            engine, GenerationRequest(max_tokens=16, messages=chat("Where is the printer?", system), sampling=GREEDY)
        )
        prefix.append((cold, warm))

    shared = {"cold": [], "warm": []}
    for _ in range(runs):
        await engine.clear_prefix_cache()
        system = f"Session {uuid.uuid4().hex}. You are the help desk assistant. {RULES}"
        for phase in ("cold", "warm"):  # warm: the same system prompt again, now cached
            wait_quiet()
            reqs = [
                GenerationRequest(max_tokens=max_tokens, messages=chat(f"Tell me about {t}.", system), sampling=GREEDY)
                for t in TOPICS
            ]
            shared[phase].append(await concurrent(engine, reqs))

    def summary(runs_: list[dict]) -> dict:
        t = [r["ttft"] for run in runs_ for r in run["results"]]
        return {
            "aggregate_tokens_per_s": round(max(run["tokens_per_s"] for run in runs_), 1),
            "aggregate_tokens_per_s_median": round(statistics.median(run["tokens_per_s"] for run in runs_), 1),
            "ttft_p50_s": round(pct(t, 0.5), 3),
            "ttft_p95_s": round(pct(t, 0.95), 3),
            "cached_tokens": sorted(r["cached"] for r in runs_[-1]["results"]),
        }

    out = {
        "single_stream": {
            "decode_tokens_per_s": round(max(single), 1),
            "decode_tokens_per_s_median": round(statistics.median(single), 1),
            "runs": [round(x, 1) for x in single],
        },
        "concurrent_8": {
            "aggregate_tokens_per_s": round(max(run["tokens_per_s"] for run in eight), 1),
            "aggregate_tokens_per_s_median": round(statistics.median(run["tokens_per_s"] for run in eight), 1),
            "ttft_p50_s": round(pct(ttfts, 0.5), 3),
            "ttft_p95_s": round(pct(ttfts, 0.95), 3),
            "completion_tokens": [r["tokens"] for r in eight[-1]["results"]],
        },
        "prefix_cache": {
            "system_prompt_tokens": engine.count_chat_tokens(
                chat(
                    "How do I reset my password?",
                    f"Session {uuid.uuid4().hex}. You are the help desk assistant. {RULES}",
                )
            ),
            "cold_ttft_s": round(statistics.median(c["ttft"] for c, _ in prefix), 3),
            "warm_ttft_s": round(statistics.median(w["ttft"] for _, w in prefix), 3),
            "warm_cached_tokens": prefix[-1][1]["cached"],
        },
        "shared_prefix_concurrent_8_cold": summary(shared["cold"]),
        "shared_prefix_concurrent_8_warm": summary(shared["warm"]),
    }
    if base:
        out["raw_llama_single_stream"] = {
            "decode_tokens_per_s": round(max(base), 1),
            "decode_tokens_per_s_median": round(statistics.median(base), 1),
            "runs": [round(x, 1) for x in base],
        }
        out["single_vs_raw_best"] = round(max(single) / max(base), 3)
        out["single_vs_raw_median"] = round(statistics.median(single) / statistics.median(base), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("APPLIANCE_TEST_MODEL", str(raw_llama.DEFAULT_MODEL)))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-raw", action="store_true", help="skip the raw llama_cpp.Llama baseline")
    parser.add_argument("--weights", choices=["auto", "original", "q8_0"], default="auto", help="as [runtime] weights")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="appliance-weights-") as cache:
        # The engine runs what `serve` would load on this machine (a re-encoding of a Q4_1 file
        # on a CPU); raw llama_cpp.Llama runs the file as given.
        served = serve_weights(inspect_model(args.model), Path(cache), mode=args.weights)
        engine = LlamaEngine(
            served.path, name="bench", slots=8, n_ctx_per_slot=2048, n_threads=args.threads, weights=served
        )
        raw = None if args.no_raw else functools.partial(raw_in_child, args.model, args.threads)
        try:
            result = asyncio.run(bench(engine, raw, args.max_tokens, args.runs))
        finally:
            asyncio.run(engine.close())
    result["weights"] = served.encoding
    result["n_threads"] = args.threads
    result["load_avg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
