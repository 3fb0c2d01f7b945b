"""Audit forwarding to a real syslog receiver: every record arrives once and in order across
an outage, and the cursor survives a new forwarder and a reopened database."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.audit import AuditLog
from appliance.checks.audit_forward import AuditForwarder, commit_waker
from appliance.checks.channels import ChannelError
from appliance.errors import ConfigError
from appliance.store import Store
from tests.audit import fill, open_log
from tests.checks.syslog_receiver import Syslog, TcpSyslogReceiver, parse_syslog
from tests.conftest import free_port


@pytest.fixture
def receiver() -> Iterator[TcpSyslogReceiver]:
    server = TcpSyslogReceiver().start()
    yield server
    server.stop()


def check_against_log(store: Store, raw: list[bytes]) -> list[Syslog]:
    """Each message carries its record exactly: idx, hashes, kind, ts and the body as stored."""
    messages = [parse_syslog(m) for m in raw]
    for message in messages:
        sd = message.sd["audit@32473"]
        row = store.query_one("SELECT * FROM audit WHERE idx = ?", (int(sd["idx"]),))
        assert row is not None
        assert (sd["hash"], sd["prev_hash"], message.msgid, message.msg) == (
            row["hash"],
            row["prev_hash"],
            row["kind"],
            row["body"],
        )
        assert sd.get("key_id") == row["key_id"] and sd.get("team_id") == row["team_id"]
        assert message.timestamp.endswith("Z") and len(message.timestamp) == 27  # UTC, microseconds
        assert abs(dt.datetime.fromisoformat(message.timestamp).timestamp() - row["ts"]) < 1e-6
        assert (message.facility, message.app_name, message.hostname) == (16, "appliance", "box1")
    return messages


def indexes(messages: list[Syslog]) -> list[int]:
    return [int(m.sd["audit@32473"]["idx"]) for m in messages]


def test_records_around_an_outage_arrive_once_and_in_order(tmp_path: Path, receiver: TcpSyslogReceiver) -> None:
    store, audit = open_log(tmp_path)
    with store:
        fill(audit, 3)
        forwarder = AuditForwarder(store, f"tcp://127.0.0.1:{receiver.port}", hostname="box1", timeout_seconds=1)
        commits = store.commits
        assert forwarder.forward_once() == 3
        assert store.commits == commits + 1  # the cursor went through the store's writer, once per batch
        receiver.wait_for(3)

        receiver.stop()  # the SIEM goes down; records keep coming
        fill(audit, 2)
        for attempt in (1, 2):
            started = time.monotonic()
            with pytest.raises(ChannelError, match=r"send to tcp://127\.0\.0\.1:\d+ failed: connection refused"):
                forwarder.forward_once()
            assert time.monotonic() - started < 2
            assert forwarder.failures == attempt
        status = forwarder.status()
        assert (status["cursor"], status["max_idx"], status["lag"]) == (3, 5, 2)
        assert "connection refused" in status["last_error"] and status["delivery_confirmed"] is True

        receiver.start()  # back, on the same port
        fill(audit, 1)
        assert forwarder.forward_once() == 3
        messages = check_against_log(store, receiver.wait_for(6))
        assert indexes(messages) == [1, 2, 3, 4, 5, 6]
        status = forwarder.status()
        assert (status["cursor"], status["lag"], status["failures"], status["forwarded"]) == (6, 0, 0, 6)
        assert forwarder.forward_once() == 0
        forwarder.close()
    assert receiver.connections == 2


def test_the_cursor_survives_a_new_forwarder_and_a_reopened_database(
    tmp_path: Path, receiver: TcpSyslogReceiver
) -> None:
    target = f"tcp://127.0.0.1:{receiver.port}"
    store, audit = open_log(tmp_path)
    with store:
        fill(audit, 4)
        first = AuditForwarder(store, target, hostname="box1", batch=3)
        assert first.forward_once() == 3  # one batch at a time
        assert first.forward_once() == 1
        first.close()
    with Store(tmp_path / "appliance.db") as reopened:
        second = AuditForwarder(reopened, target, hostname="box1")
        assert second.status()["cursor"] == 4 and second.status()["lag"] == 0
        assert second.forward_once() == 0
        AuditLog(reopened, audit.signer).append_sync("admin", {"action": "keys.create"}, key_id=None, team_id=None)
        assert second.forward_once() == 1
        second.close()
        row = reopened.query_one("SELECT value FROM settings WHERE key = 'audit_forward.idx'")
        assert row is not None and row["value"] == "5"
        # another target keeps a cursor of its own
        assert AuditForwarder(reopened, target, state_key="audit_forward.siem2").status()["cursor"] == 0
        messages = check_against_log(reopened, receiver.wait_for(5))
    assert indexes(messages) == [1, 2, 3, 4, 5]
    assert messages[-1].msgid == "admin" and messages[-1].sd["audit@32473"].get("key_id") is None


async def test_the_loop_rides_out_an_outage_and_wakes_on_commit(tmp_path: Path) -> None:
    receiver = TcpSyslogReceiver()
    receiver.port = free_port()  # not listening yet: the receiver starts out down
    store, audit = open_log(tmp_path)
    with store:
        wake = asyncio.Event()
        audit.listeners.append(commit_waker(asyncio.get_running_loop(), wake))
        forwarder = AuditForwarder(
            store, f"tcp://127.0.0.1:{receiver.port}", hostname="box1", batch=2, min_backoff=0.05, max_backoff=0.2
        )
        task = asyncio.create_task(forwarder.run(wake, poll_seconds=60))
        try:
            await asyncio.to_thread(fill, audit, 3)
            while forwarder.failures < 3:  # retried with backoff, nothing lost
                await asyncio.sleep(0.02)
            assert forwarder.status()["cursor"] == 0 and forwarder.backoff() <= 0.2
            receiver.start()
            await asyncio.to_thread(receiver.wait_for, 3)
            # idle now (polling only every 60 s): a commit wakes it at once
            await asyncio.to_thread(
                audit.append_sync, "security", {"event": "auth.failures"}, key_id=None, team_id=None
            )
            raw = await asyncio.to_thread(receiver.wait_for, 4)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            forwarder.close()
            receiver.stop()
        messages = check_against_log(store, raw)
        assert indexes(messages) == [1, 2, 3, 4]
        assert messages[-1].severity == 5 and messages[0].severity == 6  # security records are notices
        assert forwarder.failures == 0 and forwarder.status()["lag"] == 0


def test_forwarding_over_a_datagram_socket(tmp_path: Path) -> None:
    path = tmp_path / "siem.sock"
    store, audit = open_log(tmp_path)
    with store, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        fill(audit, 2)
        forwarder = AuditForwarder(store, f"unix://{path}", hostname="box1")
        assert forwarder.forward_once() == 2
        messages = check_against_log(store, [sock.recv(65535), sock.recv(65535)])
        assert indexes(messages) == [1, 2]
        assert forwarder.status()["delivery_confirmed"] is False
        forwarder.close()


def test_bad_forwarder_settings(tmp_path: Path) -> None:
    store = Store(tmp_path / "appliance.db")
    with pytest.raises(ConfigError, match="audit forwarding target: expected udp://host:port"):
        AuditForwarder(store, "https://siem.example.org")
    with pytest.raises(ValueError, match="batch must be positive"):
        AuditForwarder(store, "tcp://127.0.0.1:6514", batch=0)
    with pytest.raises(ValueError, match="facility must be one of"):
        AuditForwarder(store, "tcp://127.0.0.1:6514", facility="local8")
