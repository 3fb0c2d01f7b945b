"""Baseline: raw `llama_cpp.Llama.create_chat_completion`, one stream, temperature 0; prints JSON.

Used by the throughput benches to compare the engine with llama-cpp-python's own high-level
path on the same model and thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]


def load(model: str, *, n_threads: int, n_ctx: int = 2048) -> Any:
    from llama_cpp import Llama

    from runtime.backend import ensure_backend

    ensure_backend()  # the appliance's build loads its CPU kernels at run time
    llm = Llama(model_path=model, n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads, verbose=False)
    llm.create_chat_completion(messages=PROMPT, max_tokens=4, temperature=0)  # warm-up
    return llm


def run_once(llm: Any, *, max_tokens: int = 128) -> dict[str, float]:
    """One streamed greedy completion from an empty cache: time to first token and decode tokens/s."""
    llm.reset()
    start = time.perf_counter()
    first = None
    n = 0
    for chunk in llm.create_chat_completion(messages=PROMPT, max_tokens=max_tokens, temperature=0, stream=True):
        if chunk["choices"][0]["delta"].get("content"):
            n += 1
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    return {"ttft_s": first - start, "tokens": n, "decode_tokens_per_s": (n - 1) / (end - first) if n > 1 else 0.0}


def measure(model: str, *, n_threads: int, max_tokens: int, runs: int, n_ctx: int = 2048) -> dict[str, Any]:
    llm = load(model, n_threads=n_threads, n_ctx=n_ctx)
    results = [run_once(llm, max_tokens=max_tokens) for _ in range(runs)]
    rates = [r["decode_tokens_per_s"] for r in results]
    return {
        "engine": "llama_cpp.Llama",
        "model": os.path.basename(model),
        "n_threads": n_threads,
        "max_tokens": max_tokens,
        "runs": runs,
        "decode_tokens_per_s": round(max(rates), 1),
        "decode_tokens_per_s_median": round(statistics.median(rates), 1),
        "decode_tokens_per_s_runs": [round(r, 1) for r in rates],
        "ttft_s": round(min(r["ttft_s"] for r in results), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("APPLIANCE_TEST_MODEL", str(DEFAULT_MODEL)))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--n-ctx", type=int, default=2048)
    args = parser.parse_args()
    result = measure(args.model, n_threads=args.threads, max_tokens=args.max_tokens, runs=args.runs, n_ctx=args.n_ctx)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
