"""A short greedy generation on one CPU variant, printed as JSON: the check that a build of
llama.cpp runs on this machine (or an emulated older one) with the kernels chosen for it.

    python -m runtime.smoke MODEL [--adapter A] [--cpu-variant auto|NAME] [--tokens N]

Exits 1 with the reason on stderr when the variant cannot be loaded or the model not run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from runtime.backend import ensure_backend
from runtime.engine import Finished, GenerationRequest, SamplingParams, TokenEvent
from runtime.errors import RuntimeFault
from runtime.llama_engine import LlamaEngine
from runtime.weights import ServedWeights

PROMPT = [{"role": "user", "content": "Name three colours."}]


async def generate(engine: LlamaEngine, tokens: int) -> tuple[str, Finished]:
    request = GenerationRequest(max_tokens=tokens, messages=PROMPT, sampling=SamplingParams(temperature=0.0))
    parts: list[str] = []
    async for event in engine.generate(request):
        if isinstance(event, TokenEvent):
            parts.append(event.text)
        else:
            return "".join(parts), event
    raise RuntimeError("the stream ended without Finished")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--adapter", default="", help="the block-offset adapter of a split (q4_0_offsets) model")
    parser.add_argument("--cpu-variant", default="auto")
    parser.add_argument("--tokens", type=int, default=8)
    opts = parser.parse_args(argv)
    started = time.monotonic()
    try:
        report = ensure_backend(opts.cpu_variant)
        weights = (
            ServedWeights(opts.model, "", "q4_0_offsets", "", 0, adapter_path=opts.adapter) if opts.adapter else None
        )
        engine = LlamaEngine(
            opts.model, name="smoke", slots=1, n_ctx_per_slot=256, embeddings=False, draft_tokens=0, weights=weights
        )
    except RuntimeFault as exc:
        print(f"smoke: {exc}", file=sys.stderr)
        return 1
    try:
        text, finished = asyncio.run(generate(engine, opts.tokens))
        stats = engine.stats().extra
    finally:
        asyncio.run(engine.close())
    result = {
        "variant": report.variant,
        "cpu": report.cpu.to_dict(),
        "buffer_types": stats["buffer_types"],
        "text": text,
        "completion_tokens": finished.completion_tokens,
        "finish_reason": finished.reason,
        "seconds": round(time.monotonic() - started, 2),
    }
    print(json.dumps(result))
    return 0 if finished.reason in ("stop", "length") else 1


if __name__ == "__main__":
    sys.exit(main())
