"""Cost of a Prometheus scrape (issue 17): what one `/metrics` takes in wall time and CPU, idle
and under load, and whether a scraper slows serving. One run, one server with the default
model and 8 slots:

1. idle: back-to-back scrapes, through the API port (with a key: authentication and one audit
   record each) and through the separate bind (`[metrics] listen`, no key); wall time per
   scrape from the client, CPU-seconds per scrape from the server process (psutil) and from
   the appliance's own `appliance_metrics_render_*` counters;
2. load: chat streams at concurrency 8, alternately without a scraper and with one hitting
   `/metrics` every second (`--rounds` pairs, in alternating order, so drift in the machine's
   speed hits both);
   aggregate tokens/s of each phase, and the scrape latencies seen under load.

    .venv/bin/python bench/metrics_scrape.py [--requests 48] [--max-tokens 64] [--rounds 6] [--scrapes 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx
import psutil
from _common import DEFAULT_MODEL, MODEL_NAME, percentile, start_appliance, stream_chat, summary
from prometheus_client.parser import text_string_to_metric_families

CONCURRENCY = 8


def counter(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                return s.value
    return 0.0


def idle_scrapes(url: str, headers: dict[str, str], n: int, pid: int) -> dict:
    proc = psutil.Process(pid)
    walls, size = [], 0
    with httpx.Client(headers=headers, timeout=30) as client:
        client.get(url)  # warm: connection, first render
        cpu0 = sum(proc.cpu_times()[:2])
        for _ in range(n):
            t0 = time.perf_counter()
            r = client.get(url)
            walls.append(time.perf_counter() - t0)
            r.raise_for_status()
            size = len(r.content)
        cpu = sum(proc.cpu_times()[:2]) - cpu0
    return {
        "scrapes": n,
        "ms_per_scrape": {k: v * 1000 for k, v in summary(walls).items() if v is not None},
        "server_cpu_seconds_per_scrape": cpu / n,
        "bytes": size,
    }


async def scraper(url: str, headers: dict[str, str], stop: asyncio.Event, walls: list[float]) -> None:
    async with httpx.AsyncClient(headers=headers, timeout=30) as client:
        while not stop.is_set():
            t0 = time.perf_counter()
            (await client.get(url)).raise_for_status()
            walls.append(time.perf_counter() - t0)
            try:
                await asyncio.wait_for(stop.wait(), timeout=max(0.0, 1.0 - (time.perf_counter() - t0)))
            except TimeoutError:
                pass


async def serve_load(
    api: str,
    key: str,
    requests: int,
    max_tokens: int,
    round_no: int,
    scrape_url: str | None,
    scrape_headers: dict[str, str],
) -> dict:
    bodies = [
        {
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": f"Tell a story about lighthouse {round_no}-{i}."}],
            "max_tokens": max_tokens,
            "temperature": 0.7,
            "seed": i,
        }
        for i in range(requests)
    ]
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    results = []
    walls: list[float] = []
    stop = asyncio.Event()

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            results.append(await stream_chat(client, api + "/v1/chat/completions", key, queue.get_nowait()))

    scraping = asyncio.create_task(scraper(scrape_url, scrape_headers, stop, walls)) if scrape_url else None
    t0 = time.perf_counter()
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=CONCURRENCY + 4)) as client:
        await asyncio.gather(*(worker(client) for _ in range(CONCURRENCY)))
    wall = time.perf_counter() - t0
    stop.set()
    if scraping is not None:
        await scraping
    ok = [r for r in results if not r.error]
    return {
        "scraping": scrape_url is not None,
        "errors": len(results) - len(ok),
        "completion_tokens": sum(r.tokens for r in ok),
        "tokens_per_s": sum(r.tokens for r in ok) / wall,
        "ttft_p95_s": percentile([r.ttft for r in ok if r.ttft is not None], 0.95),
        "wall_s": wall,
        "scrapes": len(walls),
        "scrape_ms": {k: v * 1000 for k, v in summary(walls).items() if v is not None} if walls else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--scrapes", type=int, default=50)
    parser.add_argument("--port", type=int, default=18391)
    args = parser.parse_args()
    listen = f"127.0.0.1:{args.port + 1}"
    config = f'[runtime]\nslots = {CONCURRENCY}\nctx_per_slot = 512\n\n[metrics]\nlisten = "{listen}"\n'
    app = start_appliance(DEFAULT_MODEL, port=args.port, config=config)
    auth = {"Authorization": f"Bearer {app.key}"}
    api_metrics, bind_metrics = app.url + "/metrics", f"http://{listen}/metrics"
    try:
        result: dict = {"model": MODEL_NAME, "concurrency": CONCURRENCY, "cpus": psutil.cpu_count()}
        result["idle_api_port"] = idle_scrapes(api_metrics, auth, args.scrapes, app.process.pid)
        result["idle_separate_bind"] = idle_scrapes(bind_metrics, {}, args.scrapes, app.process.pid)
        rounds = []
        for round_no in range(args.rounds):
            order = (None, api_metrics) if round_no % 2 == 0 else (api_metrics, None)  # cancels a trend
            for scrape_url in order:
                rounds.append(
                    asyncio.run(
                        serve_load(
                            app.url,
                            app.key,
                            args.requests,
                            args.max_tokens,
                            round_no,
                            scrape_url,
                            auth,
                        )
                    )
                )
        result["load"] = rounds
        without = [r["tokens_per_s"] for r in rounds if not r["scraping"]]
        with_scraper = [r["tokens_per_s"] for r in rounds if r["scraping"]]
        result["tokens_per_s_without_scraper"] = summary(without)
        result["tokens_per_s_with_scraper"] = summary(with_scraper)
        # Each pair ran back to back: its ratio is the least exposed to the machine's other work.
        result["with_over_without_per_round"] = [w / wo for w, wo in zip(with_scraper, without, strict=True)]
        result["with_over_without_median"] = statistics.median(result["with_over_without_per_round"])
        final = httpx.get(bind_metrics, timeout=30).text
        scrapes = counter(final, "appliance_metrics_scrapes_total")
        result["render_totals"] = {
            "scrapes": scrapes,
            "wall_ms_per_render": 1000 * counter(final, "appliance_metrics_render_seconds_total") / max(1, scrapes),
            "cpu_ms_per_render": 1000 * counter(final, "appliance_metrics_render_cpu_seconds_total") / max(1, scrapes),
        }
        print(json.dumps(result, indent=2))
    finally:
        app.stop()


if __name__ == "__main__":
    main()
