"""Gateway overhead benchmark (issue 5). `EchoEngine` answers at once, so what is measured is
the appliance itself: auth, admission (rate limits and budget reservation), metering and the
durable, group-committed audit write, against the same app with them switched off
(`create_app(governed=False)`), both over real HTTP on 127.0.0.1, in one run.

Prints JSON: p50/p99 latency of sequential non-streaming chat requests for each app and the
difference, and the maximum non-streaming requests/s (wrk when installed, else httpx).

    .venv/bin/python bench/gateway.py [--requests 3000] [--seconds 10] [--connections 32]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--serve", choices=["governed", "bare"])
    parser.add_argument("--port", type=int, default=18200)
    parser.add_argument("--data-dir")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.data_dir)
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
    }, indent=2))


if __name__ == "__main__":
    main()
