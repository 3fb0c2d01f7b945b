"""Throughput benchmark (issue 4). In one run, with the same model and thread count:

  (a) raw `llama_cpp.Llama.create_chat_completion` in process, single stream;
  (b) the appliance over HTTP, streaming, at each concurrency level;
  (c) llama-cpp-python's own server (`python -m llama_cpp.server`, from .bench-venv; run
      bench/setup_peer.sh first) with `--interrupt_requests False`, at the same levels;
  (d) the newest llama.cpp `llama-server` (.bench-peers/llama-server, also built by
      bench/setup_peer.sh, without AMX) with `-np 8 -c 8192`, at the same levels;

plus two workloads at concurrency 8 on (b) and (c): 16 requests sharing one ~780-token system
prompt, and 16 requests whose answers copy from their prompts (correct or retitle a memo:
where drafting by prompt lookup, runtime/_drafts.py, has the most to guess right). For each: aggregate completion tokens/s, time to first token
p50/p95, latency p95, errors and the server's peak RSS. Prints JSON.

The appliance runs with its defaults, so on a CPU it serves the Q4_1 default model split into
Q4_0 codes and a block-offset adapter (runtime/weights.py); (a) and (c) load the registered
file, or with `--peer-weights served` the appliance's re-encoding and its adapter, so that all
three run the same bytes. `bare_batched_decode` is the appliance's weights in a bare loop.

Both servers stay up for the whole run and each workload runs on one, then at once on the
other, so the drift of a shared machine's speed lands on both sides of every ratio. The
whole sequence repeats `--rounds` times; `median_targets` holds the median of each ratio.

`--drafts-ab` adds a second appliance with `draft_tokens = 0`, run on every workload too, to
show what drafting gives in the same minutes.

    .venv/bin/python bench/throughput.py [--levels 1,4,8,16] [--requests 16] [--max-tokens 128] [--rounds 2] [--drafts-ab]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
from _common import DEFAULT_MODEL, MODEL_NAME, REPO, start_appliance, stream_chat, summary

TOPICS = [
    "dragons",
    "the sea",
    "a lighthouse",
    "winter",
    "a robot",
    "bread",
    "a library",
    "the moon",
    "a garden",
    "trains",
    "a violin",
    "mountains",
    "a cat",
    "rain",
    "a market",
    "stars",
]
SYSTEM = "You are the help desk assistant of Example Ltd. Follow the policy below.\n" + "\n".join(
    f"Rule {i}: answer politely, cite the handbook section {i}, never share passwords, "
    f"escalate payroll questions to HR and security incidents to IT on extension {100 + i}."
    for i in range(1, 21)
)


MEMOS = [
    "The quarterly report shows that revenue grew by twelve percent, driven mostly by the new subscription "
    "plan. Costs rose by four percent because of hiring in the support team. The board approved the budget "
    "for next year and asked for a review of the pricing in March.",
    "Our office will be closed on Friday for maintenance of the heating system. Staff who need access to the "
    "building should contact the facilities team before Thursday noon. The car park remains open, and "
    "deliveries will be held at the front desk until Monday morning.",
    "The new laptop policy requires every device to use full disk encryption and a password of at least "
    "twelve characters. Lost devices must be reported to the IT desk within one hour. Personal software may "
    "not be installed without approval from a team lead.",
    "Patients should arrive fifteen minutes before their appointment and bring a list of current medicines. "
    "If you cannot attend, please call the clinic at least one day in advance. Parking is free for the first "
    "two hours in the visitor area behind the main building.",
]
EDITS = [
    "Fix the grammar and repeat this text exactly otherwise: ",
    "Rewrite this text in the same words, adding a title on top: ",
]


def copying_body(i: int, max_tokens: int, model: str = MODEL_NAME) -> dict:
    content = EDITS[i % len(EDITS)] + MEMOS[i % len(MEMOS)]
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


def chat_body(i: int, max_tokens: int, *, system: str | bool = False, model: str = MODEL_NAME) -> dict:
    messages = [{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]}."}]
    if system:
        messages.insert(0, {"role": "system", "content": SYSTEM if system is True else system})
    return {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}


class PeakRss:
    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def load(url: str, key: str, bodies: list[dict], concurrency: int) -> dict:
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    results = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            results.append(await stream_chat(client, url, key, body))

    t0 = time.perf_counter()
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if not r.error]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "empty_responses": sum(1 for r in ok if r.tokens == 0),
        "completion_tokens": sum(r.tokens for r in ok),
        "aggregate_tokens_per_s": sum(r.tokens for r in ok) / wall,
        "ttft_s": summary([r.ttft for r in ok if r.ttft is not None]),
        "latency_p95_s": summary([r.latency for r in ok])["p95"],
        "wall_s": wall,
    }


def load_raw(model: Path, threads: int, adapter: str = ""):
    import llama_cpp

    sys.path.insert(0, str(REPO))
    from runtime.backend import ensure_backend

    ensure_backend()  # the appliance's build loads its CPU kernels at run time
    return llama_cpp.Llama(
        str(model), lora_path=adapter or None, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False
    )


def raw_single_stream(llm, max_tokens: int, runs: int = 3) -> dict:
    rates = []
    for i in range(runs + 1):
        t0 = time.perf_counter()
        n = 0
        for chunk in llm.create_chat_completion(
            chat_body(i, max_tokens)["messages"], max_tokens=max_tokens, temperature=0, stream=True
        ):
            n += bool(chunk["choices"][0]["delta"].get("content"))
        if i:
            rates.append(n / (time.perf_counter() - t0))
    return {"tokens_per_s": statistics.fmean(rates), "runs": runs}


def _wait_up(proc: subprocess.Popen[bytes], url: str, name: str) -> None:
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{name} did not start")


def start_llama_server(model: Path, threads: int, port: int, adapter: str = "") -> tuple[subprocess.Popen[bytes], str]:
    """The newest llama.cpp server, with 8 slots sharing an 8192-token context."""
    binary = REPO / ".bench-peers" / "llama-server"
    if not binary.exists():
        raise SystemExit("run bench/setup_peer.sh first (builds .bench-peers/llama-server)")
    proc = subprocess.Popen(
        [str(binary), "-m", str(model), "-np", "8", "-c", "8192", "-t", str(threads), "--port", str(port),
         "--alias", MODEL_NAME, *(["--lora", adapter] if adapter else [])],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    _wait_up(proc, url, "llama-server")
    return proc, url


def start_peer(model: Path, threads: int, port: int, adapter: str = "") -> tuple[subprocess.Popen[bytes], str]:
    python = REPO / ".bench-venv" / "bin" / "python"
    if not python.exists():
        raise SystemExit("run bench/setup_peer.sh first (installs llama-cpp-python[server] into .bench-venv)")
    proc = subprocess.Popen(
        [
            str(python),
            "-m",
            "llama_cpp.server",
            "--model",
            str(model),
            "--n_threads",
            str(threads),
            "--n_ctx",
            "4096",
            "--port",
            str(port),
            "--interrupt_requests",
            "False",
            "--model_alias",
            MODEL_NAME,
            *(["--lora_path", adapter] if adapter else []),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    _wait_up(proc, url, "llama_cpp.server")
    return proc, url


@dataclass
class Server:
    name: str
    url: str
    key: str
    pid: int


def workloads(levels: list[int], requests: int, max_tokens: int, round_no: int) -> dict[str, tuple[list[dict], int]]:
    """Name -> (request bodies, concurrency). The shared system prompt differs per round, so
    every round starts with it cold on both servers."""
    out = {str(level): ([chat_body(i, max_tokens) for i in range(max(requests, level))], level) for level in levels}
    system = f"Round {round_no}. " + SYSTEM
    out["shared_system_prompt_c8"] = ([chat_body(i, max_tokens, system=system) for i in range(16)], 8)
    out["copying_c8"] = ([copying_body(i, max_tokens) for i in range(16)], 8)
    return out


def engine_extra(url: str, key: str) -> dict:
    models = httpx.get(url + "/admin/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    return models.json()["data"][0]["stats"]["extra"]


def served_weights(url: str, key: str) -> dict:
    """What the appliance loaded for the model (runtime/weights.py): encoding, path, sha256."""
    return engine_extra(url, key)["weights"]


def engine_counters(server: Server) -> dict | None:
    """The appliance's own `llama_decode` counters (None for the peer, which has none)."""
    if not server.name.startswith("appliance"):
        return None
    extra = engine_extra(server.url, server.key)
    drafts = extra["drafts"]
    return {
        "calls": extra["decode_steps"],
        "busy_s": extra["decode_busy_seconds"],
        "drafted": drafts["drafted"],
        "kept": drafts["kept"],
    }


def run_workload(server: Server, bodies: list[dict], concurrency: int) -> dict:
    before = engine_counters(server)
    with PeakRss(server.pid) as rss:
        result = asyncio.run(load(server.url + "/v1/chat/completions", server.key, bodies, concurrency))
    result["peak_rss_mb"] = rss.peak / 2**20
    after = engine_counters(server)
    if before and after:  # how much of the wall time llama.cpp itself was computing
        busy = after["busy_s"] - before["busy_s"]
        result["llama_decode"] = {
            "calls": after["calls"] - before["calls"],
            "busy_s": busy,
            "share_of_wall": busy / result["wall_s"],
        }
        result["draft_tokens"] = {
            "decoded": after["drafted"] - before["drafted"],
            "kept": after["kept"] - before["kept"],
        }
    return result


def batched_ceiling(model: Path, threads: int, n_seq: int = 8, steps: int = 64, adapter: str = "") -> dict:
    """A bare low-level loop decoding `n_seq` sequences in one context, with the appliance's
    context settings: what llama.cpp itself manages on this machine in this minute."""
    import llama_cpp

    sys.path.insert(0, str(REPO))
    from runtime._native import Model, new_context

    m = Model(str(model), adapter_path=adapter)
    ctx = new_context(m, n_ctx=n_seq * 1024, n_batch=512, n_seq_max=n_seq, n_threads=threads)
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    prompt = m.tokenize("<|im_start|>user\nWrite a long story.<|im_end|>\n<|im_start|>assistant\n")
    try:
        for s in range(n_seq):
            for i, tok in enumerate(prompt):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0] = tok, i, 1, s
                batch.logits[i] = i == len(prompt) - 1
            batch.n_tokens = len(prompt)
            llama_cpp.llama_decode(ctx, batch)
        t0 = time.perf_counter()
        for step in range(steps):
            for s in range(n_seq):
                batch.token[s], batch.pos[s], batch.n_seq_id[s], batch.seq_id[s][0] = (
                    1000 + step,
                    len(prompt) + step,
                    1,
                    s,
                )
                batch.logits[s] = 1
            batch.n_tokens = n_seq
            llama_cpp.llama_decode(ctx, batch)
        elapsed = time.perf_counter() - t0
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        m.free()
    return {"sequences": n_seq, "tokens_per_s": n_seq * steps / elapsed, "ms_per_step": 1000 * elapsed / steps}


def run_round(
    servers: list[Server], llm, args: argparse.Namespace, levels: list[int], round_no: int, served: dict
) -> dict:
    """Each workload runs on every server back to back, so the machine's drift (large on a shared
    2-core box) hits both sides of a comparison alike."""
    out: dict = {
        "raw_llama_single_stream": raw_single_stream(llm, args.max_tokens),
        # the appliance's own weights, decoded by a bare loop
        "bare_batched_decode": batched_ceiling(
            Path(served["path"]), args.threads, adapter=served.get("adapter_path", "")
        ),
    }
    for name, (bodies, concurrency) in workloads(levels, args.requests, args.max_tokens, round_no).items():
        for server in servers:
            out.setdefault(server.name, {})[name] = run_workload(server, bodies, concurrency)
    return out


def ratios(result: dict) -> dict:
    app = result["appliance"]
    out = {
        "c1_vs_raw": app["1"]["aggregate_tokens_per_s"] / result["raw_llama_single_stream"]["tokens_per_s"]
        if "1" in app
        else None,
        "c8_ttft_p95_s": app.get("8", {}).get("ttft_s", {}).get("p95"),
        "c8_errors": app.get("8", {}).get("errors"),
        "c8_vs_bare_batched": app["8"]["aggregate_tokens_per_s"] / result["bare_batched_decode"]["tokens_per_s"]
        if "8" in app
        else None,
    }
    for other, suffix in (("llama_cpp_server", "peer"), ("llama_server", "llama_server"), ("appliance_no_drafts", "no_drafts")):
        if other in result:
            for name in app:
                out[f"{name}_vs_{suffix}"] = app[name]["aggregate_tokens_per_s"] / max(
                    result[other][name]["aggregate_tokens_per_s"], 1e-9
                )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--levels", default="1,4,8,16")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--skip-peer", action="store_true", help="run no peer server")
    parser.add_argument("--peers", default="llama_cpp_server,llama_server", help="which peers to run, comma-separated")
    parser.add_argument("--rounds", type=int, default=2, help="repeat every workload on every server; medians reported")
    parser.add_argument(
        "--peer-weights",
        choices=["original", "served"],
        default="original",
        help="file for raw llama_cpp and the peer: the registered one, or the appliance's re-encoding of it",
    )
    parser.add_argument("--drafts-ab", action="store_true", help="also run an appliance with draft_tokens = 0")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    sys.path.insert(0, str(REPO))
    from runtime.cpu import detect

    cpu = detect()
    report: dict = {
        "model": args.model.name,
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "cpu": cpu.model,
        "cpu_has_amx": cpu.amx != "no",
        "rounds": [],
    }
    config = f"[runtime]\nn_threads = {args.threads}\nslots = {args.slots}\n"  # default ctx_per_slot
    app = start_appliance(args.model, port=18300, config=config)
    peer_procs: list[subprocess.Popen[bytes]] = []
    plain = None
    try:
        report["appliance_idle_rss_mb"] = app.rss_mb()
        weights = served_weights(app.url, app.key)
        report["appliance_weights"] = weights
        # (a) and (c) run the registered file unless told to run the appliance's re-encoding too.
        served = args.peer_weights == "served"
        other_model = Path(weights["path"]) if served else args.model
        other_adapter = weights.get("adapter_path", "") if served else ""
        report["peer_and_raw_model_file"] = str(other_model)
        llm = load_raw(other_model, args.threads, other_adapter)
        servers = [Server("appliance", app.url, app.key, app.process.pid)]
        if args.drafts_ab:
            plain = start_appliance(args.model, port=18302, config=config + "draft_tokens = 0\n")
            servers.append(Server("appliance_no_drafts", plain.url, plain.key, plain.process.pid))
        peers = [] if args.skip_peer else args.peers.split(",")
        if "llama_cpp_server" in peers:
            peer_proc, peer_url = start_peer(other_model, args.threads, 18301, other_adapter)
            peer_procs.append(peer_proc)
            servers.append(Server("llama_cpp_server", peer_url, "none", peer_proc.pid))
        if "llama_server" in peers:
            peer_proc, peer_url = start_llama_server(other_model, args.threads, 18303, other_adapter)
            peer_procs.append(peer_proc)
            servers.append(Server("llama_server", peer_url, "none", peer_proc.pid))
        report["appliance_cpu_backend"] = httpx.get(
            app.url + "/admin/models", headers={"Authorization": f"Bearer {app.key}"}, timeout=10
        ).json()["backend"]
        for server in servers:  # warm-up: first request pays lazy initialisation
            run_workload(server, [chat_body(0, 8)], 1)
        for round_no in range(args.rounds):
            result = run_round(servers, llm, args, levels, round_no, weights)
            result["targets"] = ratios(result)
            report["rounds"].append(result)
        report["appliance_drafts"] = engine_extra(app.url, app.key)["drafts"]
    finally:
        app.stop()
        if plain is not None:
            plain.stop()
        for peer_proc in peer_procs:
            peer_proc.terminate()
            peer_proc.wait(30)
    keys = report["rounds"][0]["targets"].keys()
    report["median_targets"] = {
        k: statistics.median(v)
        if (v := [r["targets"][k] for r in report["rounds"] if r["targets"][k] is not None])
        else None
        for k in keys
    }
    report["median_targets"]["idle_rss_mb"] = report["appliance_idle_rss_mb"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
