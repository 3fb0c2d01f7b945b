"""A real TCP syslog receiver (RFC 6587 octet counting) for the alert and audit-forwarding
tests, and a strict RFC 5424 parser written from the RFC's ABNF, independent of the code under
test."""

from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass

# HEADER SP STRUCTURED-DATA [SP MSG], RFC 5424 section 6.
_PRINT = rb"[!-~]"
SYSLOG_RE = re.compile(
    rb"<(?P<pri>[0-9]{1,3})>1 "
    rb"(?P<ts>-|[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?(?:Z|[+-][0-9]{2}:[0-9]{2})) "
    rb"(?P<host>" + _PRINT + rb"{1,255}) (?P<app>" + _PRINT + rb"{1,48}) "
    rb"(?P<procid>" + _PRINT + rb"{1,128}) (?P<msgid>" + _PRINT + rb"{1,32}) "
    rb"(?P<sd>-|(?:\[[^\] \"=]{1,32}(?: [^\] \"=]{1,32}=\"(?:[^\"\\\]]|\\.)*\")*\])+)"
    rb"(?: (?P<msg>.*))?\Z",
    re.S,
)
_ELEMENT_RE = re.compile(rb"\[(?P<id>[^\] \"=]+)(?P<params>(?: [^\] \"=]+=\"(?:[^\"\\\]]|\\.)*\")*)\]")
_PARAM_RE = re.compile(rb" (?P<name>[^\] \"=]+)=\"(?P<value>(?:[^\"\\\]]|\\.)*)\"")
BOM = b"\xef\xbb\xbf"


@dataclass
class Syslog:
    facility: int
    severity: int
    timestamp: str
    hostname: str
    app_name: str
    procid: str
    msgid: str
    sd: dict[str, dict[str, str]]
    msg: str | None


def parse_syslog(raw: bytes) -> Syslog:
    """Parse one message, failing the test if it is not RFC 5424 (a UTF-8 MSG needs its BOM)."""
    match = SYSLOG_RE.fullmatch(raw)
    assert match, f"not an RFC 5424 message: {raw[:300]!r}"
    pri = int(match["pri"])
    assert 0 <= pri <= 191
    sd: dict[str, dict[str, str]] = {}
    if match["sd"] != b"-":
        for element in _ELEMENT_RE.finditer(match["sd"]):
            params = {
                p["name"].decode("ascii"): re.sub(rb"\\(.)", rb"\1", p["value"]).decode("utf-8")
                for p in _PARAM_RE.finditer(element["params"])
            }
            sd[element["id"].decode("ascii")] = params
    msg = None
    if match["msg"] is not None:
        assert match["msg"].startswith(BOM), "a UTF-8 MSG starts with a BOM"
        msg = match["msg"][len(BOM) :].decode("utf-8")
    return Syslog(
        facility=pri // 8,
        severity=pri % 8,
        timestamp=match["ts"].decode("ascii"),
        hostname=match["host"].decode("ascii"),
        app_name=match["app"].decode("ascii"),
        procid=match["procid"].decode("ascii"),
        msgid=match["msgid"].decode("ascii"),
        sd=sd,
        msg=msg,
    )


class TcpSyslogReceiver:
    """Listens on 127.0.0.1 and splits octet-counted frames (`<len> <msg>`) into `messages`.
    `stop()` takes it down (listener and every connection closed); `start()` brings it back on
    the same port."""

    def __init__(self) -> None:
        self.port = 0
        self.messages: list[bytes] = []
        self.connections = 0
        self.errors: list[str] = []  # framing faults seen by reader threads, checked by wait_for
        self._cond = threading.Condition()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._running = False

    def start(self) -> TcpSyslogReceiver:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        listener.settimeout(0.05)  # accept() polls the running flag; closing does not wake it
        self.port = listener.getsockname()[1]
        self._listener, self._running = listener, True
        self._spawn(self._accept_loop, listener)
        return self

    def stop(self) -> None:
        self._running = False
        for thread in self._threads:
            if thread.name == "accept":
                thread.join(5)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # sends FIN now and wakes the reader thread
            except OSError:
                pass
            conn.close()
        for thread in self._threads:
            thread.join(5)
        self._conns.clear()
        self._threads.clear()

    def wait_for(self, count: int, timeout: float = 5.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.messages) < count:
                left = deadline - time.monotonic()
                assert left > 0, f"expected {count} messages, got {len(self.messages)}"
                self._cond.wait(left)
            assert not self.errors, self.errors
            return list(self.messages)

    def _spawn(self, target: object, *args: object, name: str = "accept") -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while self._running:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            self._conns.append(conn)
            self.connections += 1
            self._spawn(self._read_loop, conn, name="reader")

    def _read_loop(self, conn: socket.socket) -> None:
        buf = b""
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                if buf:
                    self.errors.append(f"a partial frame was left when the sender hung up: {buf[:80]!r}")
                return
            buf += data
            while b" " in buf:
                length, _, rest = buf.partition(b" ")
                if not length.isdigit():
                    self.errors.append(f"not octet-counted framing: {buf[:80]!r}")
                    return
                if len(rest) < int(length):
                    break
                with self._cond:
                    self.messages.append(rest[: int(length)])
                    self._cond.notify_all()
                buf = rest[int(length) :]
