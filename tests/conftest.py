"""Shared fixtures: the real default model, a real data directory and a real server process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

# The suite runs two workers on two cores, and each llama.cpp process's OpenMP threads spin
# between graph computations by default: two of them starved each other, 2 s tests took 18 s
# and one that times turns between decode steps failed. Set before any llama.cpp loads, and
# inherited by every server a test starts. Production keeps the default: one process alone runs
# 2-5x slower passive (docs/performance.md, "OpenMP's wait policy").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
APPLIANCE = [sys.executable, "-m", "appliance"]
MODEL_NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def model_path() -> Path:
    path = Path(os.environ.get("APPLIANCE_TEST_MODEL", DEFAULT_MODEL))
    if not path.exists():
        pytest.fail(f"default model missing at {path}: run ./install.sh first")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cli(*args: str, data_dir: Path, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")} | (env or {})
    proc = subprocess.run(
        [*APPLIANCE, *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"appliance {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


@dataclass
class Server:
    url: str
    data_dir: Path
    admin_key: str
    user_key: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(data_dir: Path, *, port: int | None = None, env: dict[str, str] | None = None, wait: bool = True) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = port or free_port()
    log_path = data_dir / f"server-{port}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")} | (env or {})
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*APPLIANCE, "serve", "--data-dir", str(data_dir), "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
        )
    url = f"http://127.0.0.1:{port}"
    if wait:
        wait_ready(url, proc, log_path)
    return proc, url, log_path


def wait_ready(url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited ({proc.returncode}):\n{log_path.read_text(errors='replace')}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"server not ready in {timeout}s:\n{log_path.read_text(errors='replace')}")


def wait_alive(url: str, timeout: float = 60) -> None:
    """Wait for liveness only (for servers that are expected not to become ready)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError(f"server at {url} not alive in {timeout}s")


def stop_server(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def init_data_dir(data_dir: Path, model: Path) -> str:
    out = run_cli("init", "--model", str(model), "--model-name", MODEL_NAME, "--json", data_dir=data_dir)
    return str(json.loads(out.stdout)["admin_key"])


@contextlib.contextmanager
def own_server(data_dir: Path, model: Path, config: str) -> Iterator[Server]:
    """A server of a test module's own, on a fresh data directory with `config`, stopped after."""
    (data_dir / "appliance.toml").write_text(config)
    admin_key = init_data_dir(data_dir, model)
    proc, url, log_path = start_server(data_dir)
    server = Server(url, data_dir, admin_key, "", proc, log_path)
    try:
        yield server
    finally:
        stop_server(server.process)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Server]:
    """One real `appliance serve` process with the default model, shared by the API tests."""
    data_dir = tmp_path_factory.mktemp("appliance-data")
    # Many tests send bad keys on purpose: this server does not throttle them (tests/test_security.py does).
    # Its checks run only on demand, so no scheduled run writes to the store a test is counting.
    (data_dir / "appliance.toml").write_text(
        '[runtime]\nslots = 4\nctx_per_slot = 1024\n\n[auth]\nfailure_limit = 1000000\n\n[checks]\nenabled = false\n'
    )
    admin_key = init_data_dir(data_dir, model_path)
    user = json.loads(run_cli("keys", "create", "--name", "staff-app", "--role", "user", "--json", data_dir=data_dir).stdout)
    proc, url, log_path = start_server(data_dir)
    shared = Server(url, data_dir, admin_key, user["key"], proc, log_path)
    yield shared
    stop_server(shared.process)  # a test may have restarted it: stop the one running now


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The machine the run took place on, last, where a CI log's tail still shows it: the CPU
    model and which llama.cpp variant it gets explain most differences in durations."""
    from runtime.cpu import choose_variant, detect, shipped_variants

    cpu = detect()
    try:
        variant = choose_variant(cpu, shipped_variants()).variant
    except Exception as exc:  # noqa: BLE001 - a report line, never a failure of the run
        variant = f"none ({exc})"
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    terminalreporter.write_line(
        f"machine: {cpu.model or 'unknown CPU'}; {os.cpu_count()} cores; llama.cpp CPU variant {variant}; "
        f"AMX {cpu.amx}; load average {load}"
    )
