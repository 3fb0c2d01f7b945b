"""Gateway overhead benchmark (issue 5). `EchoEngine` answers at once, so what is measured is
the appliance itself: auth, admission (rate limits and budget reservation), metering and the
durable, group-committed audit write, against the same app with them switched off
(`create_app(governed=False)`), both over real HTTP on 127.0.0.1, in one run.

Prints JSON: p50/p99 latency of sequential non-streaming chat requests for each app and the
difference, and the maximum non-streaming requests/s (wrk when installed, else httpx).

The plugin hook layer (issue 15) is measured on its own, in process, per request: building
the request's view, `prepare_request` and `check_response` through the plugin manager (its
per-plugin threads, time limits and copies) with the built-ins loaded from their entry
points, on a chat request of about 4k tokens (counted with the default model's tokenizer
when it is installed). Three configurations: no plugin (`APPLIANCE_PLUGINS=none`), the
default configuration, and `pii_redact` redacting prompts and answers.

    .venv/bin/python bench/gateway.py [--requests 3000] [--seconds 10] [--connections 32] [--only hooks|gateway]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _common import percentile

BODY = {"model": "echo", "messages": [{"role": "user", "content": "one two three four five"}], "max_tokens": 8}


def serve(mode: str, port: int, data_dir: str) -> None:
    """Child process: the app with an EchoEngine, under uvicorn."""
    import uvicorn

    from appliance.api.app import create_app
    from appliance.config import load_settings
    from appliance.engine_pool import EnginePool
    from runtime.stand_ins import EchoEngine

    settings = load_settings(data_dir, env={})
    app = create_app(settings, pool=EnginePool([EchoEngine("echo")]), governed=(mode == "governed"))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def start(mode: str, port: int) -> tuple[subprocess.Popen[bytes], str, str]:
    data_dir = tempfile.mkdtemp(prefix=f"gateway-{mode}-")
    key = ""
    if mode == "governed":
        out = subprocess.run([sys.executable, "-m", "appliance", "init", "--data-dir", data_dir, "--json"],
                             check=True, capture_output=True, text=True)
        key = json.loads(out.stdout)["admin_key"]
    proc = subprocess.Popen([sys.executable, __file__, "--serve", mode, "--port", str(port), "--data-dir", data_dir])
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url, key
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError(f"{mode} server did not start")


def latency(url: str, key: str, n: int) -> dict[str, float | None]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    times = []
    with httpx.Client(headers=headers) as client:
        for i in range(n + 200):
            t0 = time.perf_counter()
            r = client.post(url + "/v1/chat/completions", json=BODY)
            elapsed = time.perf_counter() - t0
            assert r.status_code == 200, r.text
            if i >= 200:  # warm-up
                times.append(elapsed * 1000)
    return {"p50_ms": percentile(times, 0.5), "p99_ms": percentile(times, 0.99), "mean_ms": sum(times) / len(times)}


def throughput(url: str, key: str, seconds: int, connections: int) -> dict[str, float | str | int]:
    if shutil.which("wrk"):
        script = Path(tempfile.mkdtemp()) / "post.lua"
        auth = f'wrk.headers["Authorization"] = "Bearer {key}"\n' if key else ""
        script.write_text(
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n' + auth + f"wrk.body = '{json.dumps(BODY)}'\n"
        )
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url + "/v1/chat/completions"],
            capture_output=True, text=True, check=True,
        ).stdout
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        return {"tool": "wrk", "requests_per_s": rps, "non_2xx": int(errors.group(1)) if errors else 0, "connections": connections}
    import asyncio

    async def run() -> tuple[int, int]:
        done = errors = 0
        stop = time.perf_counter() + seconds
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with httpx.AsyncClient(headers=headers, limits=httpx.Limits(max_connections=connections)) as client:
            async def worker() -> None:
                nonlocal done, errors
                while time.perf_counter() < stop:
                    r = await client.post(url + "/v1/chat/completions", json=BODY)
                    done += 1
                    errors += r.status_code != 200
            await asyncio.gather(*(worker() for _ in range(connections)))
        return done, errors

    done, errors = asyncio.run(run())
    return {"tool": "httpx", "requests_per_s": done / seconds, "non_2xx": errors, "connections": connections}


def _long_prompt() -> tuple[str, int | None]:
    """About 4k tokens of ordinary text with some personal data in it, and its token count."""
    words = ("the quarterly report shows revenue growth across regions while costs remained stable "
             "and the team plans to expand support hours next month ").split()
    pieces = []
    for i in range(3800):
        pieces.append(words[i % len(words)])
        if i % 400 == 7:
            pieces.append(f"(contact jane.roe{i}@corp.example or +44 20 7946 {i % 10000:04d})")
    text = " ".join(pieces)
    try:
        import llama_cpp
        from _common import DEFAULT_MODEL

        vocab = llama_cpp.Llama(str(DEFAULT_MODEL), vocab_only=True, verbose=False)
        return text, len(vocab.tokenize(text.encode()))
    except Exception:  # noqa: BLE001 - the count is a label only
        return text, None


def hook_layer(n: int) -> dict[str, object]:
    """Microseconds the hook layer adds to one chat request, per configuration."""
    import asyncio

    from appliance.auth import Principal, Role
    from appliance.governance import RequestContext
    from appliance.guardrails import gate_for
    from appliance.plugin_manager import PluginManager

    text, tokens = _long_prompt()
    principal = Principal("k1", "bench", Role.USER)
    # Built-in plugins are objects shared by every manager in a process: one manager at a time.
    configs: dict[str, tuple[dict[str, dict[str, object]], list[str] | None]] = {
        "no_plugins": ({}, []),
        "default_configuration": ({}, None),
        "pii_redact_prompts_and_answers": ({"pii_redact": {"prompts": True, "responses": True}}, None),
    }

    async def one(manager: PluginManager) -> float:
        ctx = RequestContext(request_id="r", route="POST /v1/chat/completions", client="127.0.0.1")
        started = time.perf_counter()
        gate = gate_for(manager, ctx, principal, "chat", "m", messages=[{"role": "user", "content": text}], max_tokens=64)
        if gate is not None:
            await gate.prepare(ctx)
            await gate.check(ctx, text[:2000], streaming=False, finish_reason="stop")  # an answer of about 500 tokens
        return (time.perf_counter() - started) * 1e6

    async def run(manager: PluginManager) -> dict[str, object]:
        for _ in range(200):
            await one(manager)
        times = [await one(manager) for _ in range(n)]
        active = sorted(p["name"] for p in manager.states() if p["status"] == "active" and
                        ({"prepare_request", "check_response"} & set(p["hooks"])))
        return {"p50_us": percentile(times, 0.5), "p99_us": percentile(times, 0.99), "max_us": max(times),
                "plugins_judging": active}

    out: dict[str, object] = {"prompt_chars": len(text), "prompt_tokens": tokens, "requests": n}
    for name, (config, only) in configs.items():
        manager = PluginManager(config, only=only).load()
        out[name] = asyncio.run(run(manager))
        manager.close()
    out["pii_redact_on_1mb_of_hostile_input_ms"] = _hostile()
    out["targets"] = {"no_plugins_p99_us_max": 50, "pii_redact_p99_us_max": 1000, "hostile_1mb_ms_max": 1000}
    return out


def _hostile() -> dict[str, float]:
    """Milliseconds `pii_redact` takes on 1 MB inputs built to make backtracking patterns blow up."""
    from appliance.hookspecs import PrincipalView, RequestView
    from plugins.pii_redact import PiiRedact

    mb = 1 << 20
    shapes = {
        "email_like_run": ("a" * 40 + ".") * (mb // 41) + "@",
        "dotted_digits": "1." * (mb // 2),
        "digit_groups": "1234 " * (mb // 5),
        "colons": "a:" * (mb // 2),
        "at_signs": "a@" * (mb // 2),
    }
    plugin = PiiRedact()
    plugin.configure({"prompts": True, "national_ids": {"ssn": r"\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b"}})
    who = PrincipalView("k", "bench", "user", "default")
    out = {}
    for name, text in shapes.items():
        request = RequestView(kind="completion", model="m", prompt=[text])
        started = time.perf_counter()
        plugin.prepare_request(request, who)
        out[name] = round((time.perf_counter() - started) * 1000, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--serve", choices=["governed", "bare"])
    parser.add_argument("--port", type=int, default=18200)
    parser.add_argument("--data-dir")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--only", choices=["hooks", "gateway"])
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.data_dir)
        return
    hooks = hook_layer(args.requests) if args.only != "gateway" else None
    if args.only == "hooks":
        print(json.dumps({"cpus": os.cpu_count(), "hook_layer": hooks}, indent=2))
        return
    results: dict[str, dict] = {}
    for offset, mode in enumerate(("bare", "governed")):
        proc, url, key = start(mode, args.port + offset)
        try:
            results[mode] = {"latency": latency(url, key, args.requests), "throughput": throughput(url, key, args.seconds, args.connections)}
            if mode == "governed":
                db = Path(proc.args[-1]) / "appliance.db"  # type: ignore[index]
                import sqlite3

                results[mode]["audit_records"] = sqlite3.connect(db).execute("SELECT COUNT(*) FROM audit").fetchone()[0]
        finally:
            proc.terminate()
            proc.wait(30)
    bare, gov = results["bare"]["latency"], results["governed"]["latency"]
    print(json.dumps({
        "cpus": os.cpu_count(),
        "bare": results["bare"],
        "governed": results["governed"],
        "overhead_p50_ms": gov["p50_ms"] - bare["p50_ms"],
        "overhead_p99_ms": gov["p99_ms"] - bare["p99_ms"],
        "hook_layer": hooks,
    }, indent=2))


if __name__ == "__main__":
    main()
