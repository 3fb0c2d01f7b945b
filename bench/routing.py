"""Routing benchmark (issue 16), in one run:

1. Gateway overhead through a remote-upstream route. `bench/mock_upstream.py` answers at
   once; it is called directly (the baseline), through `appliance serve` (an upstream
   registered with its API key, a route `remote` with that one candidate, a user key; auth,
   metering and the durable audit on, as by default) and through LiteLLM's proxy (its own
   venv `.bench-litellm/`, a master key, no database, one worker, callbacks off). All three
   stay up for the whole run and each measure is taken in rounds, on the three back to back
   in each round: p50/p99 of sequential non-streaming chat requests (httpx, pooled over the
   rounds), and requests/s at 1 and at 16 connections (wrk, median of the rounds), with the
   CPU time each server spent per request.
2. The routing decision's own cost, in process: `Router.plan` built as `appliance.api.app`
   builds it (`build_services` on a temporary data directory) for a plain model name, an
   `ordered` route of 3 candidates and an `auto` route scoring a 2k-character prompt.
3. Failover when the primary dies with requests queued: the primary is a remote appliance
   (`tests.fault_server`) whose `FaultyEngine` holds every request before its first token;
   once N streaming requests wait on it, it is killed (SIGKILL), and each request's first
   token from the route's second candidate (the mock upstream, or the local default model
   when installed) is timed from the kill.

Prints JSON.

    .venv/bin/python bench/routing.py [--only gateway|decision|failover] [--requests 2000] [--seconds 5] [--rounds 3]
        [--connections 16] [--iterations 20000] [--queued 8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
from _common import DEFAULT_MODEL, MODEL_NAME, percentile

REPO = Path(__file__).resolve().parent.parent
LITELLM_VENV = REPO / ".bench-litellm"
MOCK_KEY = "sk-mock-upstream-0123456789"
LITELLM_KEY = "sk-bench-litellm-master-key"
MESSAGES = [{"role": "user", "content": "one two three four five"}]
WARMUP = 200


# -- processes ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment without APPLIANCE_* settings of whoever runs this (as the tests do)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")} | (extra or {})


class Processes:
    """Every server this run starts, stopped (SIGTERM, then SIGKILL) however the run ends."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env or child_env(), cwd=cwd,
                                    start_new_session=True)
        self.running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):  # a worker it left behind
            os.killpg(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for proc in reversed(self.running):
            self.stop(proc)


def wait_for(url: str, proc: subprocess.Popen[bytes], log: Path, *, timeout: float = 180, headers: dict[str, str] | None = None) -> float:
    """Poll `url` until it answers 200; returns the seconds it took."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited ({proc.returncode}):\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(url, timeout=2, headers=headers).status_code == 200:
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout:g}s:\n{log.read_text(errors='replace')[-3000:]}")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process and its children."""
    try:
        process = psutil.Process(pid)
        total = 0.0
        for p in [process, *process.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = p.cpu_times()
                total += times.user + times.system
        return total
    except psutil.NoSuchProcess:
        return 0.0


def appliance_cli(*args: str, data_dir: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "appliance", *args, "--data-dir", str(data_dir), "--json"],
                         check=True, capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=600)
    return json.loads(out.stdout)


@dataclass
class Target:
    """Something that answers `POST {url}/chat/completions`."""

    name: str
    url: str  # ends in /v1
    key: str
    model: str
    pid: int

    def body(self, **extra: Any) -> dict[str, Any]:
        return {"model": self.model, "messages": MESSAGES, "max_tokens": 8} | extra


class Appliance:
    """`appliance serve` on a fresh data directory, driven through its admin API."""

    def __init__(self, procs: Processes, *, model: Path | None = None) -> None:
        self.data_dir = Path(tempfile.mkdtemp(prefix="routing-bench-"))
        init = ["init", *(["--model", str(model), "--model-name", MODEL_NAME] if model else [])]
        self.admin_key = appliance_cli(*init, data_dir=self.data_dir)["admin_key"]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.data_dir / "serve.log"
        self.proc = procs.start([sys.executable, "-m", "appliance", "serve", "--data-dir", str(self.data_dir),
                                 "--port", str(self.port)], self.log)
        # Without a local model /readyz stays 503 (no engine of its own), yet routes to upstreams serve.
        self.start_seconds = wait_for(self.url + ("/readyz" if model else "/healthz"), self.proc, self.log)

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        r = httpx.request(method, self.url + path, json=body, headers={"Authorization": f"Bearer {self.admin_key}"}, timeout=60)
        if r.status_code >= 300:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text}")
        return r.json()

    def upstream(self, name: str, base_url: str, models: list[str], key: str, **settings: Any) -> None:
        self.admin("PUT", f"/admin/upstreams/{name}", {"base_url": base_url, "models": models, "api_key": key, **settings})

    def route(self, name: str, candidates: list[str], **spec: Any) -> None:
        self.admin("PUT", f"/admin/routes/{name}", {"strategy": "ordered", "candidates": [{"model": c} for c in candidates]} | spec)

    def user_key(self) -> str:
        return str(self.admin("POST", "/admin/keys", {"name": f"bench-{time.time_ns()}", "role": "user"})["key"])

    def audit_records(self) -> int:
        with contextlib.closing(sqlite3.connect(self.data_dir / "appliance.db")) as db:
            return int(db.execute("SELECT COUNT(*) FROM audit").fetchone()[0])


def start_mock(procs: Processes, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    log = workdir / "mock.log"
    proc = procs.start([sys.executable, str(REPO / "bench" / "mock_upstream.py"), "--port", str(port), "--key", MOCK_KEY], log)
    url = f"http://127.0.0.1:{port}/v1"
    wait_for(url + "/models", proc, log, headers={"Authorization": f"Bearer {MOCK_KEY}"})
    return proc, url


def litellm_version() -> str | None:
    python = LITELLM_VENV / "bin" / "python"
    if not python.exists():
        return None
    out = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                         capture_output=True, text=True)
    return out.stdout.strip() or None


LITELLM_ENV = {
    "LITELLM_LOG": "ERROR",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the price list at start
    "LITELLM_TELEMETRY_DISABLED": "true",
}


def litellm_config(mock_url: str) -> str:
    return f"""\
model_list:
  - model_name: echo
    litellm_params:
      model: openai/echo
      api_base: {mock_url}
      api_key: {MOCK_KEY}
litellm_settings:
  set_verbose: false
  callbacks: []
  success_callback: []
  failure_callback: []
general_settings:
  master_key: {LITELLM_KEY}
"""


def start_litellm(procs: Processes, workdir: Path, mock_url: str) -> tuple[subprocess.Popen[bytes], str, float]:
    binary = LITELLM_VENV / "bin" / "litellm"
    if not binary.exists():
        raise RuntimeError(f"{binary} is missing: python3 -m venv .bench-litellm && .bench-litellm/bin/pip install 'litellm[proxy]'")
    config = workdir / "litellm.yaml"
    config.write_text(litellm_config(mock_url))
    port = free_port()
    log = workdir / "litellm.log"
    env = {k: v for k, v in child_env(LITELLM_ENV).items() if k != "DATABASE_URL"}
    proc = procs.start([str(binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
                       log, env=env, cwd=workdir)
    url = f"http://127.0.0.1:{port}"
    seconds = wait_for(url + "/health/liveliness", proc, log, timeout=240)
    return proc, url + "/v1", seconds


# -- load -----------------------------------------------------------------------------------------
def check(target: Target, answer: str | None = "Hello from the mock upstream.") -> dict[str, str]:
    """One request, which must succeed (with `answer`, when given); returns the routing headers."""
    r = httpx.post(target.url + "/chat/completions", json=target.body(), headers={"Authorization": f"Bearer {target.key}"},
                   timeout=120)
    if r.status_code != 200 or (answer is not None and r.json()["choices"][0]["message"]["content"] != answer):
        raise RuntimeError(f"{target.name}: {r.status_code} {r.text}")
    return {k: v for k, v in r.headers.items() if k.startswith("x-appliance-route")}


def latency(target: Target, n: int, warmup: int) -> list[float]:
    """Milliseconds of `n` sequential non-streaming chat requests over one kept-alive connection."""
    body = target.body()
    times = []
    with httpx.Client(headers={"Authorization": f"Bearer {target.key}"}, timeout=30) as client:
        for i in range(n + warmup):
            t0 = time.perf_counter()
            r = client.post(target.url + "/chat/completions", json=body)
            elapsed = time.perf_counter() - t0
            if r.status_code != 200:
                raise RuntimeError(f"{target.name}: {r.status_code} {r.text}")
            if i >= warmup:
                times.append(elapsed * 1000)
    return times


def _wrk_ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def throughput(target: Target, connections: int, seconds: int, watch: dict[str, int], workdir: Path) -> dict[str, Any]:
    """wrk's requests/s, its latency percentiles, and the CPU time per request of the servers in `watch`."""
    script = workdir / f"post-{target.name}.lua"
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {target.key}"\nwrk.body = \'{json.dumps(target.body())}\'\n'
    )
    before = {name: cpu_seconds(pid) for name, pid in watch.items()}
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), target.url + "/chat/completions"],
        capture_output=True, text=True, check=True,
    ).stdout
    spent = {name: cpu_seconds(pid) - before[name] for name, pid in watch.items()}
    done = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    pct = {f"p{q}_ms": _wrk_ms(m.group(1)) for q in (50, 99) if (m := re.search(rf"^\s+{q}%\s+(\S+)", out, re.M))}
    return {
        "connections": connections,
        "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "requests": done,
        "non_2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else None,
        **pct,
        "cpu_ms_per_request": {name: round(s * 1000 / max(done, 1), 3) for name, s in spent.items()},
        "cpu_share": {name: round(s / seconds, 2) for name, s in spent.items()},  # cores busy, on average
    }


def gateway(args: argparse.Namespace) -> dict[str, Any]:
    procs = Processes()
    workdir = Path(tempfile.mkdtemp(prefix="routing-gateway-"))
    try:
        mock, mock_url = start_mock(procs, workdir)
        appliance = Appliance(procs)
        appliance.upstream("mock", mock_url, ["echo"], MOCK_KEY)
        appliance.route("remote", ["mock/echo"])
        litellm, litellm_url, litellm_start = start_litellm(procs, workdir, mock_url)
        targets = [
            Target("direct", mock_url, MOCK_KEY, "echo", mock.pid),
            Target("appliance", appliance.url + "/v1", appliance.user_key(), "remote", appliance.proc.pid),
            Target("litellm", litellm_url, LITELLM_KEY, "echo", litellm.pid),
        ]
        trail = check(targets[1])
        for target in targets:
            check(target)
        # The machine drifts within minutes: every measure is taken in rounds, the three targets
        # back to back in each (their order rotating), and the rounds are pooled.
        per_round = args.requests // args.rounds
        times: dict[str, list[float]] = {t.name: [] for t in targets}
        round_p50: dict[str, list[float]] = {t.name: [] for t in targets}
        runs: dict[str, dict[int, list[dict[str, Any]]]] = {t.name: {1: [], args.connections: []} for t in targets}
        for r in range(args.rounds):
            for target in targets[r % 3:] + targets[: r % 3]:
                measured = latency(target, per_round, WARMUP if r == 0 else 50)
                times[target.name] += measured
                round_p50[target.name].append(percentile(measured, 0.5))
        for connections in (1, args.connections):
            for r in range(args.rounds):
                for target in targets[r % 3:] + targets[: r % 3]:
                    watch = {"server": target.pid} | ({"mock": mock.pid} if target.pid != mock.pid else {})
                    runs[target.name][connections].append(throughput(target, connections, args.seconds, watch, workdir))
        procs.stop(appliance.proc)
        audit_records = appliance.audit_records()
    finally:
        procs.stop_all()
    results: dict[str, dict[str, Any]] = {}
    for name in times:
        results[name] = {"latency_c1": {"p50_ms": percentile(times[name], 0.5), "p99_ms": percentile(times[name], 0.99),
                                        "mean_ms": statistics.fmean(times[name]), "requests": len(times[name])}}
        for c, rounds in runs[name].items():
            results[name][f"wrk_c{c}"] = {
                "requests_per_s": statistics.median(x["requests_per_s"] for x in rounds),
                "cpu_ms_per_request": statistics.median(x["cpu_ms_per_request"]["server"] for x in rounds),
                "non_2xx": sum(x["non_2xx"] for x in rounds),
                "rounds": rounds,
            }
    direct = results["direct"]["latency_c1"]
    rps = {n: {c: results[n][f"wrk_c{c}"]["requests_per_s"] for c in (1, args.connections)} for n in results}
    added = {
        name: {"p50_ms": results[name]["latency_c1"]["p50_ms"] - direct["p50_ms"],
               "p99_ms": results[name]["latency_c1"]["p99_ms"] - direct["p99_ms"]}
        for name in ("appliance", "litellm")
    }
    per_round_ratio = {
        f"c{c}": [a["requests_per_s"] / b["requests_per_s"] for a, b in zip(runs["appliance"][c], runs["litellm"][c], strict=True)]
        for c in (1, args.connections)
    }
    ratio = {c: statistics.median(values) for c, values in per_round_ratio.items()}
    added_per_round = {name: [a - d for a, d in zip(round_p50[name], round_p50["direct"], strict=True)]
                       for name in ("appliance", "litellm")}
    return {
        "method": "non-streaming chat, 5 words in, 5 tokens out; latency: httpx, sequential, one connection, "
                  f"{args.rounds} rounds of {per_round} per target after {WARMUP} (then 50) warm-up requests, pooled; "
                  f"throughput: wrk -t1, {args.rounds} rounds of {args.seconds}s per target and concurrency, median; "
                  "each round runs the targets back to back, in rotating order",
        "appliance": {"route": "remote (ordered, one candidate: mock/echo)", "decision_trail": trail.get("x-appliance-route"),
                      "audit_records_after_run": audit_records, "start_seconds": round(appliance.start_seconds, 2)},
        "litellm": {"version": litellm_version(), "num_workers": 1, "database": None, "env": LITELLM_ENV,
                    "config": litellm_config("<mock>/v1"), "start_seconds": round(litellm_start, 2)},
        "results": results,
        "added_latency_ms": added,
        "added_p50_ms_per_round": added_per_round,
        "requests_per_s": rps,
        "rps_ratio_appliance_over_litellm": ratio,
        "rps_ratio_per_round": per_round_ratio,
        "targets": {
            "appliance_p50_overhead_ms_max": 1.0, "appliance_p50_overhead_met": added["appliance"]["p50_ms"] <= 1.0,
            "rps_ratio_min": 4.0, "rps_ratio_met": ratio[f"c{args.connections}"] >= 4.0,
        },
    }


# -- the routing decision ---------------------------------------------------------------------------
def _prompt_2k() -> str:
    text = (
        "Our support team exported last quarter's tickets. Each row has an id, the customer's country, the product, "
        "the time to first answer in minutes and whether the customer reopened the ticket. "
    )
    code = "def first_answer(rows):\n    return sorted(r['minutes'] for r in rows)[len(rows) // 2]\n"
    ask = ("Compare the median time to first answer across countries, explain which factors could cause the "
           "differences, and suggest two changes to the rota with their trade-offs.")
    body = ""
    while len(body) + len(text) < 2000 - len(code) - len(ask):
        body += text
    return body + code + ask


def decision(args: argparse.Namespace) -> dict[str, Any]:
    from appliance.api.app import build_services
    from appliance.audit.log import cli_actor
    from appliance.auth import Principal, Role
    from appliance.config import load_settings
    from appliance.engine_pool import EnginePool
    from appliance.routing.router import Need
    from runtime.stand_ins import EchoEngine

    data_dir = tempfile.mkdtemp(prefix="routing-decision-")
    settings = load_settings(data_dir, env={})
    local = MODEL_NAME
    services = build_services(settings, EnginePool([EchoEngine(local)]))
    registered = False
    if DEFAULT_MODEL.exists():  # a registered, resident local model, as on a real site
        services.models.add(DEFAULT_MODEL, local, actor=cli_actor())
        registered = True
    actor = cli_actor()
    services.upstreams.set("gpu-box", base_url="http://10.0.0.5:8000/v1", models=["llama-8b", "qwen-32b"],
                           api_key="sk-not-used", prompt_price_per_1k=0.0005, completion_price_per_1k=0.0015, actor=actor)
    services.upstreams.set("cloud", base_url="https://api.example.com/v1", models=["big"],
                           api_key="sk-not-used", prompt_price_per_1k=0.003, completion_price_per_1k=0.015, actor=actor)
    routes = services.router.routes
    routes.set("chain", {"strategy": "ordered", "candidates": [
        {"model": "gpu-box/llama-8b"}, {"model": "cloud/big"}, {"model": local}]}, actor=actor)
    routes.set("auto", {"strategy": "auto", "candidates": [
        {"model": local, "max_difficulty": 0.4}, {"model": "gpu-box/qwen-32b", "max_difficulty": 0.8},
        {"model": "cloud/big"}]}, actor=actor)
    router = services.router
    principal = Principal("k1", "bench", Role.USER)
    short = "\n".join(m["content"] for m in MESSAGES)
    prompt = _prompt_2k()
    cases: dict[str, tuple[str, Need]] = {
        "plain_model_name": (local, Need(kind="chat", text=short, max_tokens=8, prompt_tokens_estimate=len(short) // 4)),
        "ordered_route_3_candidates": ("chain", Need(kind="chat", text=short, max_tokens=8, prompt_tokens_estimate=len(short) // 4)),
        "auto_route_2k_char_prompt": ("auto", Need(kind="chat", text=prompt, max_tokens=256, prompt_tokens_estimate=len(prompt) // 4)),
    }
    started = time.perf_counter()
    first = router.plan(principal, "auto", cases["auto_route_2k_char_prompt"][1])  # builds the classifier
    classifier_load_ms = (time.perf_counter() - started) * 1000
    out: dict[str, Any] = {"iterations": args.iterations, "local_model_registered": registered, "prompt_chars": len(prompt),
                           "classifier_first_use_ms": round(classifier_load_ms, 1)}
    for name, (model, need) in cases.items():
        for _ in range(1000):
            router.plan(principal, model, need)
        times = []
        for _ in range(args.iterations):
            t0 = time.perf_counter()
            plan = router.plan(principal, model, need)
            times.append((time.perf_counter() - t0) * 1e6)
        out[name] = {"p50_us": round(percentile(times, 0.5), 2), "p99_us": round(percentile(times, 0.99), 2),  # type: ignore[arg-type]
                     "max_us": round(max(times), 1), "candidates": plan.names, "trail": plan.trail}
    out["auto_route_2k_char_prompt"]["score"] = round(first.score or 0.0, 3)
    out["parts_us"] = _decision_parts(services, principal, local, cases["ordered_route_3_candidates"][1], prompt, args.iterations)
    services.plugins.close()
    return out


def _decision_parts(services: Any, principal: Any, local: str, need: Any, prompt: str, n: int) -> dict[str, float]:
    """Median microseconds of the pieces a decision calls, to say where its time goes."""
    catalog = services.catalog
    scorer = services.router._scorer  # noqa: SLF001 - built by the auto case above

    def median(fn: Callable[[], object]) -> float:
        for _ in range(200):
            fn()
        times = []
        for _ in range(n // 4):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
        return round(percentile(times, 0.5), 2)  # type: ignore[arg-type]

    return {
        "routes_find": median(lambda: services.router.routes.find("chain")),
        "catalog_known_local": median(lambda: catalog.known(local)),
        "catalog_is_remote": median(lambda: catalog.is_remote("gpu-box/llama-8b")),
        "catalog_capabilities_local (a models-table query)": median(lambda: catalog.capabilities(local)),
        "catalog_capabilities_remote": median(lambda: catalog.capabilities("cloud/big")),
        "classifier_score_2k_chars": median(lambda: scorer.score(prompt, max_tokens=256)),
        "cost_estimate": median(lambda: services.router._cost(services.router.routes.find("auto").spec.candidates[1], need)),  # noqa: SLF001
    }


# -- failover -------------------------------------------------------------------------------------
class Primary:
    """`tests.fault_server` as a remote appliance whose engine `primary` holds each request
    before its first token (`first_token_delay_s`), until it is killed."""

    def __init__(self, procs: Processes) -> None:
        self.procs = procs
        self.data_dir = Path(tempfile.mkdtemp(prefix="routing-primary-"))
        self.key = appliance_cli("init", data_dir=self.data_dir)["admin_key"]
        (self.data_dir / "faults").mkdir()
        (self.data_dir / "faults" / "primary.json").write_text(json.dumps({"first_token_delay_s": 600}))
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> str:
        (self.data_dir / "faults" / "primary.calls").unlink(missing_ok=True)
        self.port = free_port()
        log = self.data_dir / f"fault-server-{self.port}.log"
        self.proc = self.procs.start([sys.executable, "-m", "tests.fault_server", "--data-dir", str(self.data_dir),
                                      "--port", str(self.port), "--faulty", "primary"], log)
        wait_for(f"http://127.0.0.1:{self.port}/readyz", self.proc, log)
        return f"http://127.0.0.1:{self.port}/v1"

    def calls(self) -> int:
        path = self.data_dir / "faults" / "primary.calls"
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int(path.read_text())
        return 0

    def kill(self) -> float:
        assert self.proc is not None
        at = time.perf_counter()
        self.proc.send_signal(signal.SIGKILL)
        return at


async def _queued(url: str, key: str, model: str, n: int, primary: Primary) -> tuple[float, list[dict[str, Any]]]:
    """`n` streaming requests queued on the primary, then the kill; each one's first token time."""
    results: list[dict[str, Any]] = [{} for _ in range(n)]

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {"model": model, "messages": MESSAGES, "max_tokens": 8, "stream": True}
        async with client.stream("POST", url + "/chat/completions", json=body, timeout=120) as r:
            results[i]["status"] = r.status_code
            results[i]["trail"] = r.headers.get("x-appliance-route")
            results[i]["served_by"] = r.headers.get("x-appliance-model")
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    if any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                        results[i].setdefault("first_token_at", time.perf_counter())
                    if "error" in chunk:
                        results[i]["error"] = chunk["error"].get("message")

    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, limits=limits) as client:
        tasks = [asyncio.create_task(one(client, i)) for i in range(n)]
        deadline = time.perf_counter() + 60
        while primary.calls() < n:
            if time.perf_counter() > deadline or any(t.done() for t in tasks):
                raise RuntimeError(f"only {primary.calls()} of {n} requests reached the primary")
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)  # all of them waiting on the primary
        killed_at = primary.kill()
        await asyncio.gather(*tasks, return_exceptions=False)
    return killed_at, results


def failover(args: argparse.Namespace) -> dict[str, Any]:
    procs = Processes()
    workdir = Path(tempfile.mkdtemp(prefix="routing-failover-"))
    out: dict[str, Any] = {"queued_requests": args.queued, "how": (
        "route [dying/primary, fallback]; the primary is a remote appliance (tests.fault_server) whose FaultyEngine "
        "sleeps before its first token; once every request waits on it, it gets SIGKILL; time from the kill to each "
        "request's first content token on the client")}
    try:
        _, mock_url = start_mock(procs, workdir)
        local = DEFAULT_MODEL.exists()
        appliance = Appliance(procs, model=DEFAULT_MODEL if local else None)
        appliance.upstream("mock", mock_url, ["echo"], MOCK_KEY)
        key = appliance.user_key()
        appliance.route("warm", ["mock/echo"])
        for model in ["warm", *([MODEL_NAME] if local else [])]:  # the fallbacks warm, as on a site in use
            for _ in range(3):
                check(Target("fallback", appliance.url + "/v1", key, model, appliance.proc.pid), answer=None)
        primary = Primary(procs)
        scenarios = [("mock_upstream_fallback_default_retries", "mock/echo", 2),
                     ("mock_upstream_fallback_no_retries", "mock/echo", 0)]
        if local:
            scenarios += [("local_model_fallback_default_retries", MODEL_NAME, 2), ("local_model_fallback_no_retries", MODEL_NAME, 0)]
        for index, (name, fallback, retries) in enumerate(scenarios):
            upstream, route = f"dying-{index}", f"failover-{index}"  # fresh names: a breaker of its own
            appliance.upstream(upstream, primary.start(), ["primary"], primary.key, max_retries=retries)
            appliance.route(route, [f"{upstream}/primary", fallback])
            killed_at, results = asyncio.run(_queued(appliance.url + "/v1", key, route, args.queued, primary))
            primary.proc.wait(10)  # type: ignore[union-attr]
            waits = [(r["first_token_at"] - killed_at) * 1000 for r in results if "first_token_at" in r]
            out[name] = {
                "fallback": fallback,
                "upstream_max_retries": retries,
                "ms_from_kill_to_first_token": {"p50": percentile(waits, 0.5), "max": max(waits) if waits else None,
                                                "min": min(waits) if waits else None,
                                                "each": sorted(round(w, 1) for w in waits)},
                "served": len(waits),
                "errors": [r.get("error") or r.get("status") for r in results if "first_token_at" not in r],
                "trails": sorted({r.get("trail") or "" for r in results}),
            }
    finally:
        procs.stop_all()
    return out


# -- main -----------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                  if line.startswith("Model name")), platform.processor())
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    return {"cpu_model": model, "cpus": os.cpu_count(), "python": platform.python_version(),
            "wrk": (wrk.stdout + wrk.stderr).split("[")[0].strip() or None,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["gateway", "decision", "failover"])
    parser.add_argument("--requests", type=int, default=2000, help="sequential requests per target, after warm-up")
    parser.add_argument("--seconds", type=int, default=5, help="length of each wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every gateway measure")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=20000, help="routing decisions timed per case")
    parser.add_argument("--queued", type=int, default=8, help="requests waiting on the primary when it dies")
    args = parser.parse_args()
    out: dict[str, Any] = {"machine": machine(), "command": " ".join(["bench/routing.py", *sys.argv[1:]])}
    if args.only in (None, "decision"):
        out["decision"] = decision(args)
    if args.only in (None, "gateway"):
        out["gateway"] = gateway(args)
    if args.only in (None, "failover"):
        out["failover"] = failover(args)
    out["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
