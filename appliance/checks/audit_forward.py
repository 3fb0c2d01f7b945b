"""Streams the audit log to a syslog receiver (a site's SIEM) as records are committed: one
RFC 5424 message per record, resuming after an outage from the last forwarded index.

Each record becomes

    <PRI>1 <ts> <host> appliance <pid> <kind> [audit@32473 idx="7" hash="..." prev_hash="..."
        key_id="..." team_id="..."] BOM<the record's canonical JSON body>

at facility local0 (severity notice for `security` records, info for the rest). Kept prompt
text (`audit_content`) is never sent; the body holds only its digest. With `idx`, `hash` and
`prev_hash` a receiver can check that nothing is missing and nothing was changed.

The cursor (the last forwarded idx) lives in the `settings` table under `state_key` and moves
only after a send succeeded, so delivery is at least once: a crash between a send and the
cursor's write repeats up to one batch, and a receiver can drop repeats by `idx`. Use TCP or a
unix stream socket, where a receiver that is down or hung up is seen: the record then stays
unsent and is retried with bounded exponential backoff. Over UDP or a unix datagram socket a
lost message cannot be seen (only a local ICMP refusal, and only on the next send), so records
sent while the receiver is down are lost to it. A receiver that vanishes without closing its
connection can still lose what the kernel had buffered; that needs RELP, which this is not.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from appliance.checks.channels import ChannelError
from appliance.checks.channels._base import DEFAULT_TIMEOUT, describe_error
from appliance.checks.channels.rfc5424 import FACILITIES, SEVERITIES, format_rfc5424
from appliance.checks.channels.syslog import SyslogTransport, parse_address
from appliance.store import Store

__all__ = ["AuditForwarder", "commit_waker"]

log = logging.getLogger(__name__)

SD_ID = "audit@32473"
_COLUMNS = "idx, ts, kind, key_id, team_id, body, prev_hash, hash"


def commit_waker(loop: asyncio.AbstractEventLoop, wake: asyncio.Event) -> Callable[[dict[str, Any]], None]:
    """A listener for `AuditLog.listeners` that wakes `AuditForwarder.run` as soon as a record
    is committed. It runs on the store's writer thread, so it only hands the wake-up over."""

    def listener(event: dict[str, Any]) -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(wake.set)

    return listener


class AuditForwarder:
    """Forwards audit records with idx above the stored cursor to `target` (a syslog address,
    as for the syslog channel: `tcp://host:port`, `unix-stream:///path`, `udp://...`,
    `unix:///dev/log`). `forward_once` does one batch; `run` loops; `status` reports."""

    def __init__(
        self,
        store: Store,
        target: str,
        *,
        app_name: str = "appliance",
        hostname: str | None = None,
        batch: int = 200,
        state_key: str = "audit_forward.idx",
        facility: str = "local0",
        timeout_seconds: float = DEFAULT_TIMEOUT,
        min_backoff: float = 1.0,
        max_backoff: float = 30.0,
    ) -> None:
        if batch < 1 or not 0 < min_backoff <= max_backoff:
            raise ValueError("batch must be positive and 0 < min_backoff <= max_backoff")
        if facility not in FACILITIES:
            raise ValueError(f"facility must be one of {sorted(FACILITIES)}, got {facility!r}")
        self.store = store
        self.address = parse_address(target, where="audit forwarding target")
        self.app_name = app_name
        self.hostname = hostname or socket.gethostname()
        self.batch = batch
        self.state_key = state_key
        self.facility = FACILITIES[facility]
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.cursor: int | None = None  # loaded from the settings table on first use
        self.failures = 0  # consecutive failed batches; 0 once one succeeds
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.forwarded = 0  # records sent by this instance
        self.last_forwarded_at: float | None = None
        self._transport = SyslogTransport(self.address, timeout_seconds=timeout_seconds)
        self._lock = threading.Lock()  # one batch at a time, and close() waits for it
        self._pid = os.getpid()

    # -- one batch --------------------------------------------------------------------------
    def forward_once(self) -> int:
        """Send the next batch; returns how many records were forwarded. Blocking: call it in
        a thread. Raises `ChannelError` when the receiver fails (after saving the progress made
        before the failure) and `StoreError` when the cursor cannot be saved."""
        with self._lock:
            try:
                sent = self._forward_batch()
            except ChannelError as exc:
                self._failed(exc.reason)
                raise
            except Exception as exc:
                self._failed(describe_error(exc))
                raise
            if self.failures:
                log.info("audit forwarding to %s resumed after %d failed attempts", self.address, self.failures)
            self.failures = 0
            return sent

    def _forward_batch(self) -> int:
        cursor = self._load_cursor()
        rows = self.store.query(
            f"SELECT {_COLUMNS} FROM audit WHERE idx > ? ORDER BY idx LIMIT ?", (cursor, self.batch)
        )
        last, sent, error = cursor, 0, None
        for row in rows:
            try:
                self._transport.send(self.message(row))
            except OSError as exc:
                error = exc
                break
            last, sent = int(row["idx"]), sent + 1
        if sent:
            self.forwarded += sent
            self.last_forwarded_at = time.time()
            self._save_cursor(last)
        if error is not None:
            raise ChannelError("audit-forward", "syslog", f"send to {self.address} failed: {describe_error(error)}")
        return sent

    def message(self, row: sqlite3.Row) -> bytes:
        params = {key: row[key] for key in ("idx", "hash", "prev_hash", "key_id", "team_id")}
        return format_rfc5424(
            facility=self.facility,
            severity=SEVERITIES["notice" if row["kind"] == "security" else "info"],
            msg=row["body"],
            timestamp=float(row["ts"]),
            hostname=self.hostname,
            app_name=self.app_name,
            procid=self._pid,
            msgid=row["kind"],
            structured_data=[(SD_ID, params)],
            max_bytes=self.address.max_bytes,
        )

    # -- the cursor -------------------------------------------------------------------------
    def _load_cursor(self) -> int:
        if self.cursor is None:
            row = self.store.query_one("SELECT value FROM settings WHERE key = ?", (self.state_key,))
            self.cursor = int(row["value"]) if row else 0
        return self.cursor

    def _save_cursor(self, idx: int) -> None:
        # In memory first: if the write fails, this process still does not send them again.
        self.cursor = idx
        key, value = self.state_key, str(idx)

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

        self.store.write_sync(write)

    # -- the loop ---------------------------------------------------------------------------
    async def run(self, wake: asyncio.Event | None = None, poll_seconds: float = 2.0) -> None:
        """Forward until cancelled: at once while a backlog remains, then whenever `wake` is
        set (see `commit_waker`) or `poll_seconds` pass. A failure waits out the backoff, never
        shortened by `wake`, so a receiver that is down is not retried on every commit.
        Call `close()` after cancelling it."""
        while True:
            if wake is not None:
                wake.clear()  # before reading, so a commit during the batch wakes the next one
            try:
                sent = await asyncio.to_thread(self.forward_once)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # recorded in status(); the loop must outlive any receiver
                delay = self.backoff()
                level = logging.WARNING if self.failures == 1 else logging.DEBUG
                log.log(level, "audit forwarding to %s failed (%s); retrying in %.1fs", self.address, exc, delay)
                await asyncio.sleep(delay)
                continue
            if sent >= self.batch:
                continue
            if wake is None:
                await asyncio.sleep(poll_seconds)
            else:
                try:
                    await asyncio.wait_for(wake.wait(), poll_seconds)
                except TimeoutError:
                    pass

    def backoff(self) -> float:
        """Seconds to wait after the current run of failures: doubling, at most max_backoff."""
        return min(self.max_backoff, self.min_backoff * 2 ** max(0, min(self.failures - 1, 30)))

    def close(self) -> None:
        with self._lock:
            self._transport.close()

    # -- reporting --------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        row = self.store.query_one("SELECT MAX(idx) AS top FROM audit")
        top = int(row["top"]) if row and row["top"] is not None else 0
        cursor = self.cursor if self.cursor is not None else self._load_cursor()
        return {
            "target": str(self.address),
            "cursor": cursor,
            "max_idx": top,
            "lag": max(0, top - cursor),
            "failures": self.failures,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "forwarded": self.forwarded,
            "last_forwarded_at": self.last_forwarded_at,
            "delivery_confirmed": self.address.stream,
        }

    def _failed(self, reason: str) -> None:
        self.failures += 1
        self.last_error = reason
        self.last_error_at = time.time()
