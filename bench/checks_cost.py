"""What each health job costs on this machine, with the default model loaded: wall time and
process CPU seconds (every thread: the canary's decode thread and the loop included) of its
first run and of later runs, over a database holding `--records` audit records.

    .venv/bin/python bench/checks_cost.py [--records 20000] [--runs 5]

Prints JSON. The first run is the cold one: `audit_chain` walks the whole chain and
`model_files` hashes every file; later runs are incremental. An upstream is registered
against `bench/mock_upstream.py` (started here) so `upstreams` makes its real call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.api.app import build_services  # noqa: E402
from appliance.audit import cli_actor  # noqa: E402
from appliance.checks.health import health_checks  # noqa: E402
from appliance.checks.registry import CheckContext, CheckState  # noqa: E402
from appliance.config import load_settings  # noqa: E402
from bench._common import DEFAULT_MODEL, MODEL_NAME  # noqa: E402

KEY = "sk-bench-upstream-key-0123456789"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(job: Any) -> dict[str, Any]:
    wall, cpu, process = time.perf_counter(), cpu_seconds(), time.process_time()
    findings = await asyncio.to_thread(job.run)
    return {
        "wall_ms": round((time.perf_counter() - wall) * 1000, 2),
        "cpu_s": round(cpu_seconds() - cpu, 4),
        "process_time_s": round(time.process_time() - process, 4),
        "statuses": sorted({f.status for f in findings}),
    }


def seed_audit(services: Any, n: int) -> None:
    futures = [
        services.store.submit(services.audit.append_fn("system", {"event": "bench", "n": i}, key_id=None, team_id=None))
        for i in range(n)
    ]
    for future in futures:
        future.result()


def start_mock_upstream(port: int) -> subprocess.Popen[bytes]:
    script = Path(__file__).with_name("mock_upstream.py")
    proc = subprocess.Popen([sys.executable, str(script), "--port", str(port), "--key", KEY])
    for _ in range(200):
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError("mock upstream did not start")


async def main(records: int, runs: int, port: int) -> dict[str, Any]:
    data = Path(tempfile.mkdtemp(prefix="appliance-checks-cost-"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "appliance",
            "init",
            "--data-dir",
            str(data),
            "--model",
            str(DEFAULT_MODEL),
            "--model-name",
            MODEL_NAME,
            "--json",
        ],
        check=True,
        capture_output=True,
    )
    upstream = start_mock_upstream(port)
    services = build_services(load_settings(data, env={}))
    try:
        await services.pool.start()
        services.upstreams.set(
            "mock", base_url=f"http://127.0.0.1:{port}/v1", models=["echo"], api_key=KEY, actor=cli_actor()
        )
        seed_audit(services, records)
        ctx = CheckContext(services, asyncio.get_running_loop(), CheckState(services.store), {})
        out: dict[str, Any] = {}
        for job in health_checks(ctx):
            first = await measure(job)
            later = [await measure(job) for _ in range(runs)]
            out[job.name] = {
                "first": first,
                "later_median_wall_ms": statistics.median(r["wall_ms"] for r in later),
                "later_median_cpu_s": statistics.median(r["cpu_s"] for r in later),
                "later_statuses": sorted({s for r in later for s in r["statuses"]}),
            }
        db = services.store.path
        return {
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "cores": len(os.sched_getaffinity(0)),
            "audit_records": records,
            "database_mb": round(db.stat().st_size / 2**20, 2),
            "runs_after_first": runs,
            "jobs": out,
        }
    finally:
        await services.pool.close()
        await services.remote.client.aclose()
        services.store.close()
        upstream.terminate()
        upstream.wait()
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--port", type=int, default=18471)
    opts = parser.parse_args()
    print(json.dumps(asyncio.run(main(opts.records, opts.runs, opts.port)), indent=2))
