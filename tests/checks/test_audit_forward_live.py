"""Audit forwarding in a live server: with `[audit] forward_syslog` set, each committed
record reaches a real TCP syslog receiver as RFC 5424, in chain order, and records committed
while the receiver is down arrive once it is back."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from tests.checks.syslog_receiver import TcpSyslogReceiver, parse_syslog
from tests.conftest import MODEL_NAME, init_data_dir, start_server, stop_server


def _indexes(receiver: TcpSyslogReceiver) -> list[int]:
    return [int(parse_syslog(m).sd["audit@32473"]["idx"]) for m in list(receiver.messages)]


def _wait_for(receiver: TcpSyslogReceiver, count: int, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(set(_indexes(receiver))) < count:
        time.sleep(0.2)
    return _indexes(receiver)


def test_committed_records_stream_to_syslog_and_survive_an_outage(tmp_path: Path, model_path: Path) -> None:
    receiver = TcpSyslogReceiver()
    receiver.start()
    admin_key = init_data_dir(tmp_path, model_path)
    (tmp_path / "appliance.toml").write_text(
        f'[runtime]\nslots = 2\n[audit]\nforward_syslog = "tcp://127.0.0.1:{receiver.port}"\n'
    )
    proc, url, _ = start_server(tmp_path)
    headers = {"Authorization": f"Bearer {admin_key}"}

    def chat(text: str) -> None:
        r = httpx.post(url + "/v1/chat/completions", headers=headers, timeout=120,
                       json={"model": MODEL_NAME, "messages": [{"role": "user", "content": text}], "max_tokens": 2})
        assert r.status_code == 200

    try:
        chat("first")
        total = len(httpx.get(url + "/admin/audit?limit=1000", headers=headers).json()["data"])
        seen = _wait_for(receiver, total)
        assert seen[: len(set(seen))] == sorted(set(seen))  # chain order
        receiver.stop()
        chat("while the receiver is down")
        chat("still down")
        receiver.start()
        chat("back")
        records = httpx.get(url + "/admin/audit?limit=1000", headers=headers).json()["data"]
        expected = sorted(r["idx"] for r in records)
        seen = _wait_for(receiver, len(expected))
        assert set(expected) <= set(seen)  # nothing committed during the outage is missing
        assert sorted(set(seen)) == list(range(1, max(seen) + 1))  # and nothing in between
        request = next(parse_syslog(m) for m in receiver.messages if parse_syslog(m).msgid == "request")
        body = json.loads(request.msg or "{}")
        assert body["model"] == MODEL_NAME and set(body["prompt"]) == {"sha256"}  # the digest, never kept text
        assert admin_key not in b"".join(receiver.messages).decode("utf-8", "replace")
    finally:
        stop_server(proc)
        receiver.stop()
