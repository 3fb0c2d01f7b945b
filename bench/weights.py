"""What serving the default model re-encoded (runtime/weights.py) buys and costs. Prints JSON.

For the registered Q4_1 file, its Q8_0 re-encoding and its split into Q4_0 codes plus a
block-offset adapter (what the appliance serves), in one run and with the same threads:

- quality: perplexity over a fixed ~500-token English text, with the appliance's KV cache
  types and, as a yardstick, with an F16/F16 cache on the Q4_1 file (what llama-cpp-python
  uses by default); and how many of 16 greedy 128-token answers (the throughput benchmark's
  prompts) come out identical, with the mean length of the common prefix where they differ,
  next to the same comparison between an F16/F16 cache and the appliance's on the Q4_1 file;
- speed: the bare low-level loop decoding 1 and 8 sequences (alternating files, `--rounds`);
- size: of each file and adapter (bench/throughput.py reports the server's RSS).

    .venv/bin/python bench/weights.py [--rounds 3] [--alternatives]

`--alternatives` also re-quantizes the registered file to Q6_K, Q5_0, Q4_K_S, Q4_0 and IQ4_NL
and reports, for each and for the two re-encodings, the mean KL divergence of its next-token
distributions from the registered file's, how often the top token agrees, perplexity, and
the bare 8-sequence decode speed: what a faster batched kernel would cost in fidelity.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import llama_cpp  # noqa: E402
from _common import DEFAULT_MODEL  # noqa: E402
from throughput import TOPICS, batched_ceiling  # noqa: E402

import runtime._native as native  # noqa: E402
from runtime.engine import GenerationRequest, SamplingParams, TokenEvent  # noqa: E402
from runtime.llama_engine import LlamaEngine  # noqa: E402
from runtime.model_file import inspect_model  # noqa: E402
from runtime.weights import ServedWeights, original_weights, serve_weights  # noqa: E402

# Public-domain prose: the Gettysburg Address and the opening of A Tale of Two Cities.
TEXT = """Four score and seven years ago our fathers brought forth on this continent, a new nation, \
conceived in Liberty, and dedicated to the proposition that all men are created equal. Now we are \
engaged in a great civil war, testing whether that nation, or any nation so conceived and so \
dedicated, can long endure. We are met on a great battle-field of that war. We have come to \
dedicate a portion of that field, as a final resting place for those who here gave their lives \
that that nation might live. It is altogether fitting and proper that we should do this. But, in \
a larger sense, we can not dedicate, we can not consecrate, we can not hallow this ground. The \
brave men, living and dead, who struggled here, have consecrated it, far above our poor power to \
add or detract. The world will little note, nor long remember what we say here, but it can never \
forget what they did here. It is for us the living, rather, to be dedicated here to the unfinished \
work which they who fought here have thus far so nobly advanced. It is rather for us to be here \
dedicated to the great task remaining before us, that from these honored dead we take increased \
devotion to that cause for which they gave the last full measure of devotion, that we here highly \
resolve that these dead shall not have died in vain, that this nation, under God, shall have a new \
birth of freedom, and that government of the people, by the people, for the people, shall not \
perish from the earth.

It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of \
foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of \
Light, it was the season of Darkness, it was the spring of hope, it was the winter of despair, we \
had everything before us, we had nothing before us, we were all going direct to Heaven, we were \
all going direct the other way. In short, the period was so far like the present period, that some \
of its noisiest authorities insisted on its being received, for good or for evil, in the \
superlative degree of comparison only. There were a king with a large jaw and a queen with a plain \
face, on the throne of England; there were a king with a large jaw and a queen with a fair face, on \
the throne of France. In both countries it was clearer than crystal to the lords of the State \
preserves of loaves and fishes, that things in general were settled for ever."""


@contextlib.contextmanager
def kv_types(kv: tuple[int, int] | None) -> Iterator[None]:
    """Contexts created inside get these (K, V) cache types instead of the appliance's."""
    saved = native._kv_types
    if kv is not None:
        native._kv_types = lambda gpu: kv
    try:
        yield
    finally:
        native._kv_types = saved


def next_token_logprobs(
    weights: ServedWeights, threads: int, kv: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Log-probabilities of every next token over TEXT (one row per position, each predicted
    from all before it), and the tokens that actually follow."""
    model = native.Model(weights.path, adapter_path=weights.adapter_path)
    with kv_types(kv):
        ctx = native.new_context(model, n_ctx=1024, n_batch=512, n_seq_max=1, n_threads=threads)
    tokens = model.tokenize(TEXT, add_special=True)
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    rows: list[np.ndarray] = []
    try:
        for start in range(0, len(tokens), 512):
            chunk = tokens[start : start + 512]
            for i, tok in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0] = tok, start + i, 1, 0
                batch.logits[i] = 1
            batch.n_tokens = len(chunk)
            assert llama_cpp.llama_decode(ctx, batch) == 0
            for i in range(len(chunk)):
                if start + i + 1 >= len(tokens):
                    break
                ptr = llama_cpp.llama_get_logits_ith(ctx, i)
                logits = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (model.n_vocab,))
                shifted = logits.astype(np.float64) - float(logits.max())
                rows.append((shifted - np.log(np.exp(shifted).sum())).astype(np.float32))
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        model.free()
    return np.stack(rows), np.array(tokens[1:])


def perplexity(weights: ServedWeights, threads: int, kv: tuple[int, int] | None = None) -> dict:
    """exp(mean negative log-likelihood) of TEXT, every token predicted from all before it."""
    logprobs, targets = next_token_logprobs(weights, threads, kv)
    nll = -float(logprobs[np.arange(len(targets)), targets].astype(np.float64).mean())
    return {"tokens": len(targets), "perplexity": float(np.exp(nll))}


# Encodings llama.cpp could re-quantize the registered file to (llama_ftype numbers), for
# `--alternatives`: faster batched kernels, at what cost in fidelity to the registered file.
ALTERNATIVES = {"q6_k": 18, "q5_0": 8, "q4_k_s": 14, "q4_0": 2, "iq4_nl": 25}


def fidelity(reference: tuple[np.ndarray, np.ndarray], weights: ServedWeights, threads: int) -> dict:
    """Mean KL divergence from the reference's next-token distributions, top-1 agreement, perplexity."""
    ref, targets = reference
    other, _ = next_token_logprobs(weights, threads)
    kl = (np.exp(ref.astype(np.float64)) * (ref.astype(np.float64) - other)).sum(axis=1)
    return {
        "mean_kl_vs_registered": float(kl.mean()),
        "top1_agreement": float((ref.argmax(axis=1) == other.argmax(axis=1)).mean()),
        "perplexity": float(np.exp(-other[np.arange(len(targets)), targets].astype(np.float64).mean())),
    }


def quantize_copy(source: str, dest: Path, ftype: int) -> None:
    """llama.cpp's own quantizer in a child process (it may abort on odd tensor shapes)."""
    code = (
        "import sys, llama_cpp; p = llama_cpp.llama_model_quantize_default_params(); "
        "p.ftype = int(sys.argv[3]); p.allow_requantize = True; "
        "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))"
    )
    subprocess.run([sys.executable, "-c", code, source, str(dest), str(ftype)], check=True, capture_output=True)


def alternatives(info, encodings: dict[str, ServedWeights], cache: Path, threads: int) -> dict:
    reference = next_token_logprobs(original_weights(info), threads)
    files = {name: w for name, w in encodings.items() if w.encoding != "original"}
    for name, ftype in ALTERNATIVES.items():
        path = cache / f"{name}.gguf"
        quantize_copy(info.path, path, ftype)
        files[name] = ServedWeights(str(path), "", name, info.sha256, path.stat().st_size)
    out = {name: fidelity(reference, w, threads) for name, w in files.items()}
    for name, w in files.items():
        out[name]["eight_sequences_tokens_per_s"] = bare(w, threads, 8)
    return out


def bare(weights: ServedWeights, threads: int, n_seq: int) -> float:
    return batched_ceiling(Path(weights.path), threads, n_seq=n_seq, adapter=weights.adapter_path)["tokens_per_s"]


async def greedy_answers(weights: ServedWeights, threads: int, kv: tuple[int, int] | None = None) -> list[list[str]]:
    with kv_types(kv):
        engine = LlamaEngine(
            weights.path,
            name="bench",
            slots=8,
            n_ctx_per_slot=1024,
            n_threads=threads,
            embeddings=False,
            weights=weights,
        )
    try:

        async def one(topic: str) -> list[str]:
            req = GenerationRequest(
                max_tokens=128,
                messages=[{"role": "user", "content": f"Write a long story about {topic}."}],
                sampling=SamplingParams(temperature=0),
            )
            return [e.text async for e in engine.generate(req) if isinstance(e, TokenEvent)]

        answers = [await one(topic) for topic in TOPICS]
    finally:
        await engine.close()
    return answers


def common_prefix(a: list[str], b: list[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--alternatives", action="store_true", help="also: other encodings' fidelity to the registered file, and speed"
    )
    args = parser.parse_args()

    info = inspect_model(args.model)
    with tempfile.TemporaryDirectory(prefix="appliance-weights-") as cache:
        files = {
            "q4_1_original": original_weights(info),
            "q8_0": serve_weights(info, Path(cache), mode="q8_0"),
            "q4_0_offsets_served": serve_weights(info, Path(cache)),
        }
        report: dict = {
            "model": args.model.name,
            "threads": args.threads,
            "files": {
                name: {"bytes": w.size_bytes, "sha256": w.sha256, "adapter_sha256": w.adapter_sha256}
                for name, w in files.items()
            },
        }
        f16 = (llama_cpp.GGML_TYPE_F16, llama_cpp.GGML_TYPE_F16)
        report["perplexity"] = {
            "q4_1_original_f16_kv": perplexity(files["q4_1_original"], args.threads, kv=f16),
            **{f"{name}_appliance_kv": perplexity(w, args.threads) for name, w in files.items()},
        }
        answers = {f"{name}_appliance_kv": asyncio.run(greedy_answers(w, args.threads)) for name, w in files.items()}
        answers["q4_1_original_f16_kv"] = asyncio.run(greedy_answers(files["q4_1_original"], args.threads, kv=f16))
        # The yardstick: how far the appliance's own KV cache types already move greedy answers.
        pairs = {
            "weights_q4_1_vs_q4_0_offsets_appliance_kv": (
                "q4_1_original_appliance_kv",
                "q4_0_offsets_served_appliance_kv",
            ),
            "weights_q4_1_vs_q8_0_appliance_kv": ("q4_1_original_appliance_kv", "q8_0_appliance_kv"),
            "kv_f16_vs_appliance_on_q4_1": ("q4_1_original_f16_kv", "q4_1_original_appliance_kv"),
        }
        report["greedy_answers"] = {"prompts": len(TOPICS), "max_tokens": 128}
        for label, (left, right) in pairs.items():
            a, b = answers[left], answers[right]
            differing = [common_prefix(x, y) for x, y in zip(a, b, strict=True) if x != y]
            report["greedy_answers"][label] = {
                "identical": len(a) - len(differing),
                "mean_common_prefix_tokens_where_different": statistics.fmean(differing) if differing else None,
            }
        rounds = []
        for _ in range(args.rounds):  # alternate, so drift lands on both
            rounds.append(
                {
                    name: {
                        "one_sequence_tokens_per_s": bare(w, args.threads, 1),
                        "eight_sequences_tokens_per_s": bare(w, args.threads, 8),
                    }
                    for name, w in files.items()
                }
            )
        report["bare_decode_rounds"] = rounds
        report["bare_decode_median"] = {
            name: {k: statistics.median(r[name][k] for r in rounds) for k in rounds[0][name]} for name in files
        }
        if args.alternatives:
            report["alternatives"] = alternatives(info, files, Path(cache), args.threads)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
