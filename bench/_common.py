"""Helpers shared by the benchmarks: a throwaway data directory with a running appliance,
streaming clients, percentiles."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(values: list[float]) -> dict[str, float | None]:
    return {
        "p50": percentile(values, 0.5),
        "p95": percentile(values, 0.95),
        "mean": statistics.fmean(values) if values else None,
    }


@dataclass
class Appliance:
    url: str
    key: str
    process: subprocess.Popen[bytes]
    data_dir: Path
    cold_start_s: float

    def rss_mb(self) -> float:
        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_appliance(model: Path, *, port: int, config: str = "", env: dict[str, str] | None = None) -> Appliance:
    data_dir = Path(tempfile.mkdtemp(prefix="appliance-bench-"))
    (data_dir / "appliance.toml").write_text(config)
    cli = [sys.executable, "-m", "appliance"]
    out = subprocess.run(
        [*cli, "init", "--data-dir", str(data_dir), "--model", str(model), "--model-name", MODEL_NAME, "--json"],
        check=True, capture_output=True, text=True,
    )
    key = json.loads(out.stdout)["admin_key"]
    started = time.perf_counter()
    proc = subprocess.Popen(
        [*cli, "serve", "--data-dir", str(data_dir), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ | (env or {}),
    )
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise RuntimeError("appliance exited during start-up")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    return Appliance(url, key, proc, data_dir, time.perf_counter() - started)


@dataclass
class StreamResult:
    ttft: float | None
    latency: float
    tokens: int
    error: str | None = None


async def stream_chat(client: httpx.AsyncClient, url: str, key: str, body: dict) -> StreamResult:
    """One streaming chat request; counts content chunks as tokens when usage is absent."""
    t0 = time.perf_counter()
    ttft: float | None = None
    tokens = 0
    usage_tokens: int | None = None
    try:
        async with client.stream(
            "POST", url, json=body | {"stream": True, "stream_options": {"include_usage": True}},
            headers={"Authorization": f"Bearer {key}"}, timeout=600,
        ) as r:
            if r.status_code != 200:
                await r.aread()
                return StreamResult(None, time.perf_counter() - t0, 0, f"http {r.status_code}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        if ttft is None:
                            ttft = time.perf_counter() - t0
                        tokens += 1
    except httpx.HTTPError as exc:
        return StreamResult(ttft, time.perf_counter() - t0, tokens, type(exc).__name__)
    return StreamResult(ttft, time.perf_counter() - t0, usage_tokens if usage_tokens is not None else tokens)
