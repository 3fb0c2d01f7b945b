"""systemd's notify protocol against a real datagram socket: readiness once the port is bound,
watchdog pings while the loop runs, STOPPING at shutdown; and the shipped unit file."""

from __future__ import annotations

import configparser
import os
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from appliance.sd_notify import Notifier
from tests.conftest import REPO, init_data_dir, start_server, stop_server


@pytest.fixture
def receiver(tmp_path: Path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    yield sock, str(path)
    sock.close()


def _messages(sock: socket.socket, until: float) -> list[str]:
    got = []
    while time.monotonic() < until:
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
    return got


def test_outside_systemd_nothing_is_sent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled and not notifier.notify("READY=1") and notifier.watchdog_seconds is None


def test_watchdog_interval_is_for_this_process_only() -> None:
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_seconds == 30.0
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_seconds == 30.0
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).watchdog_seconds is None
    assert Notifier({"WATCHDOG_USEC": "soon"}).watchdog_seconds is None


def test_a_message_reaches_the_socket(receiver) -> None:
    sock, path = receiver
    assert Notifier({"NOTIFY_SOCKET": path}).notify("STATUS=hello")
    assert sock.recv(100) == b"STATUS=hello"


def test_a_missing_socket_is_logged_not_raised(tmp_path: Path) -> None:
    assert not Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}).notify("READY=1")


def test_abstract_socket_names_are_supported() -> None:
    name = f"appliance-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).notify("READY=1")
        assert sock.recv(100) == b"READY=1"


def test_the_server_reports_ready_pings_the_watchdog_and_says_stopping(receiver, tmp_path: Path, model_path: Path) -> None:
    sock, path = receiver
    data = tmp_path / "data"
    init_data_dir(data, model_path)
    proc, url, log = start_server(data, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}, wait=False)
    try:
        deadline = time.monotonic() + 90
        ready_at = None
        while time.monotonic() < deadline and ready_at is None:
            assert proc.poll() is None, log.read_text()
            try:
                message = sock.recv(4096).decode()
            except TimeoutError:
                continue
            if message.startswith("READY=1"):
                ready_at = time.monotonic()
        assert ready_at is not None, "no READY=1"
        # READY means serving: the port is bound and the model loaded.
        assert httpx.get(url + "/readyz", timeout=5).status_code == 200
        pings = [m for m in _messages(sock, time.monotonic() + 1.5) if m == "WATCHDOG=1"]
        assert len(pings) >= 4  # every 0.2 s
        proc.send_signal(signal.SIGTERM)
        tail = _messages(sock, time.monotonic() + 3)
        assert any(m.startswith("STOPPING=1") for m in tail)
    finally:
        stop_server(proc)
    # uvicorn re-raises the SIGTERM it handled once shut down; systemd counts that as clean.
    assert proc.returncode in (0, -signal.SIGTERM)


def test_the_unit_restarts_on_failure_and_expects_notify() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(REPO / "packaging" / "systemd" / "appliance.service")
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["Restart"] == "on-failure"
    assert float(service["WatchdogSec"]) > 0
    assert service["ExecStart"].endswith("appliance serve")
