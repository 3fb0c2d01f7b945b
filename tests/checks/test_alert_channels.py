"""The alert channels against real receivers started here: an HTTP server that verifies the
signature, aiosmtpd, UDP, TCP and unix datagram syslog listeners. No mocks."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from email import message_from_bytes, policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from appliance.checks.channels import (
    ChannelError,
    SmtpChannel,
    SyslogChannel,
    WebhookChannel,
    build_channel,
    verify_signature,
)
from appliance.checks.channels.rfc5424 import format_rfc5424
from appliance.checks.channels.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from appliance.errors import ConfigError
from tests.checks.syslog_receiver import TcpSyslogReceiver, parse_syslog
from tests.conftest import free_port

SECRET = "whsec-4f1e0c2b9a7d"
TOKEN_PATH = "/hooks/T0KEN-IN-PATH"


def make_alert(**changes: Any) -> dict[str, Any]:
    alert: dict[str, Any] = {
        "id": 12,
        "rule": "disk",
        "check": "host",
        "subject": "disk:/var/lib/appliance",
        "severity": "warn",
        "event": "open",
        "state": "open",
        "summary": "free disk 3% (< 10%)",
        "details": {"free_pct": 3.0, "path": "/var/lib/appliance", "note": "café ✓"},
        "opened_at": 1714564800.0,
        "ts": 1714564800.25,
        "sends": 1,
        "appliance": {"host": "box1", "version": "0.1.0"},
    }
    alert.update(changes)
    return alert


def secret_file(tmp_path: Path, name: str = "hook.secret", text: str = SECRET, mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


# -- webhook ----------------------------------------------------------------------------------
class Receiver(ThreadingHTTPServer):
    """Accepts a POST only with a valid, fresh, never-seen signature, as the docs tell a
    receiver to do. `status` forces an answer (500) to test failures."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ReceiverHandler)
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.refused: list[str] = []
        self.seen: set[str] = set()
        self.status: int | None = None
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{TOKEN_PATH}"


class ReceiverHandler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        ts, sig = self.headers.get(TIMESTAMP_HEADER, ""), self.headers.get(SIGNATURE_HEADER, "")
        with self.server.lock:
            if self.server.status is not None:
                status = self.server.status
            elif not verify_signature(SECRET, ts, body, sig, now=time.time()):
                status = 401
                self.server.refused.append("signature")
            elif sig in self.server.seen:
                status = 409
                self.server.refused.append("replay")
            else:
                status = 204
                self.server.seen.add(sig)
                self.server.received.append((dict(self.headers), body))
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def webhook(tmp_path: Path, url: str, **table: Any) -> WebhookChannel:
    secret_file(tmp_path)
    channel = build_channel(
        "ops-hook", {"type": "webhook", "url": url, "secret_file": "hook.secret", **table}, data_dir=tmp_path
    )
    assert isinstance(channel, WebhookChannel)
    return channel


def test_webhook_delivers_the_alert_signed(tmp_path: Path, receiver: Receiver) -> None:
    channel = webhook(tmp_path, receiver.url)
    alert = make_alert()
    channel.send(alert)
    [(headers, body)] = receiver.received
    assert json.loads(body) == alert
    assert headers["Content-Type"] == "application/json"
    assert abs(int(headers[TIMESTAMP_HEADER]) - time.time()) < 5
    assert headers[SIGNATURE_HEADER] == sign(SECRET, headers[TIMESTAMP_HEADER], body)
    # a re-send differs in its body (ts, sends), so it is signed afresh and not taken for a replay
    channel.send({**alert, "event": "repeat", "sends": 2, "ts": alert["ts"] + 3600})
    assert len(receiver.received) == 2 and not receiver.refused


def test_the_receiver_refuses_tampering_and_replays(tmp_path: Path, receiver: Receiver) -> None:
    webhook(tmp_path, receiver.url).send(make_alert())
    [(headers, body)] = receiver.received
    signed = {TIMESTAMP_HEADER: headers[TIMESTAMP_HEADER], SIGNATURE_HEADER: headers[SIGNATURE_HEADER]}
    with httpx.Client() as client:
        tampered = body.replace(b'"warn"', b'"fail"')
        assert client.post(receiver.url, content=tampered, headers=signed).status_code == 401
        assert client.post(receiver.url, content=body, headers=signed).status_code == 409  # exact replay
        old = str(int(time.time()) - 600)
        stale = {TIMESTAMP_HEADER: old, SIGNATURE_HEADER: sign(SECRET, old, body)}
        assert client.post(receiver.url, content=body, headers=stale).status_code == 401  # too old to trust
    assert receiver.refused == ["signature", "replay", "signature"]


def test_verify_signature() -> None:
    body, ts = b'{"a":1}', "1714564800"
    good = sign(SECRET, ts, body)
    assert verify_signature(SECRET, ts, body, good, now=1714564800 + 299)
    assert verify_signature(SECRET.encode(), int(ts), body, good, now=1714564800 - 299)  # a little clock skew
    assert not verify_signature(SECRET, ts, body, good, now=1714564800 + 301)
    assert not verify_signature(SECRET, ts, body, good, now=1714564800 - 301)
    assert not verify_signature("other-secret", ts, body, good, now=1714564800)
    assert not verify_signature(SECRET, ts, body + b" ", good, now=1714564800)
    assert not verify_signature(SECRET, ts, body, good.upper(), now=1714564800)
    assert not verify_signature(SECRET, ts, body, "sha256=zz\u00e9", now=1714564800)
    assert not verify_signature(SECRET, "1714564800.5", body, good, now=1714564800)
    assert not verify_signature(SECRET, "", body, good, now=1714564800)


def test_webhook_http_500_is_a_channel_error_without_secrets(tmp_path: Path, receiver: Receiver) -> None:
    receiver.status = 500
    channel = webhook(tmp_path, receiver.url)
    with pytest.raises(ChannelError) as err:
        channel.send(make_alert())
    message = str(err.value)
    assert "HTTP 500" in message and "ops-hook" in message
    assert SECRET not in message and "T0KEN" not in message
    assert err.value.channel == "ops-hook" and err.value.kind == "webhook"


def test_webhook_down_fails_fast(tmp_path: Path) -> None:
    channel = webhook(tmp_path, f"http://127.0.0.1:{free_port()}{TOKEN_PATH}")
    started = time.monotonic()
    with pytest.raises(ChannelError) as err:
        channel.send(make_alert())
    assert time.monotonic() - started < 2
    assert "refused" in str(err.value)
    assert SECRET not in str(err.value) and "T0KEN" not in str(err.value)


def test_webhook_that_never_answers_times_out(tmp_path: Path) -> None:
    with socket.socket() as silent:  # accepts into its backlog, never reads or answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        channel = webhook(tmp_path, f"http://127.0.0.1:{silent.getsockname()[1]}/", timeout_seconds=0.3)
        started = time.monotonic()
        with pytest.raises(ChannelError, match="timed out after 0.3s"):
            channel.send(make_alert())
        assert time.monotonic() - started < 3


def test_describe_and_repr_hold_no_secret(tmp_path: Path) -> None:
    channel = webhook(tmp_path, "https://hooks.example.org/services/T0KEN?key=T0KEN")
    shown = json.dumps(channel.describe()) + repr(channel)
    assert channel.describe()["target"] == "https://hooks.example.org:443"
    assert SECRET not in shown and "T0KEN" not in shown


# -- syslog -----------------------------------------------------------------------------------
@pytest.fixture
def udp_listener() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
        yield sock


def test_syslog_over_udp_is_rfc5424(tmp_path: Path, udp_listener: socket.socket) -> None:
    port = udp_listener.getsockname()[1]
    channel = build_channel("siem", {"type": "syslog", "address": f"udp://127.0.0.1:{port}"}, data_dir=tmp_path)
    alert = make_alert(subject='disk:/mnt/"odd\\name]', severity="fail")
    channel.send(alert)
    message = parse_syslog(udp_listener.recv(65535))
    assert (message.facility, message.severity) == (3, 3)  # daemon, err
    assert message.timestamp == "2024-05-01T12:00:00.250000Z"
    assert (message.hostname, message.app_name, message.procid) == ("box1", "appliance", str(os.getpid()))
    assert message.msgid == "alert.open"
    sd = message.sd["alert@32473"]
    assert sd["subject"] == 'disk:/mnt/"odd\\name]'  # escaped on the wire, read back whole
    assert sd["id"] == "12" and sd["rule"] == "disk" and sd["event"] == "open" and sd["version"] == "0.1.0"
    assert json.loads(sd["details"]) == alert["details"]
    assert message.msg == "FAIL disk: free disk 3% (< 10%)"


def test_syslog_severity_follows_the_alert(tmp_path: Path, udp_listener: socket.socket) -> None:
    port = udp_listener.getsockname()[1]
    channel = build_channel(
        "siem", {"type": "syslog", "address": f"udp://127.0.0.1:{port}", "facility": "local3"}, data_dir=tmp_path
    )
    cases = [
        ({"severity": "fail"}, 3),
        ({"severity": "warn"}, 4),
        ({"severity": "fail", "event": "resolve"}, 5),
        ({"severity": "ok"}, 6),
    ]
    for changes, severity in cases:
        channel.send(make_alert(**changes))
        message = parse_syslog(udp_listener.recv(65535))
        assert (message.facility, message.severity) == (19, severity)
    assert message.msgid == "alert.open"


def test_syslog_over_a_unix_datagram_socket(tmp_path: Path) -> None:
    path = tmp_path / "log.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        channel = build_channel(
            "local", {"type": "syslog", "address": f"unix://{path}", "app_name": "apl-box"}, data_dir=tmp_path
        )
        channel.send(make_alert(event="resolve", state="resolved"))
        message = parse_syslog(sock.recv(65535))
    assert message.app_name == "apl-box" and message.msgid == "alert.resolve" and message.severity == 5
    assert message.msg == "RESOLVED disk: free disk 3% (< 10%)"
    sock_path = tmp_path / "gone.sock"
    channel = build_channel("local", {"type": "syslog", "address": f"unix://{sock_path}"}, data_dir=tmp_path)
    with pytest.raises(ChannelError, match="local"):
        channel.send(make_alert())


def test_syslog_over_tcp_uses_octet_counting(tmp_path: Path) -> None:
    receiver = TcpSyslogReceiver().start()
    try:
        channel = build_channel(
            "siem", {"type": "syslog", "address": f"tcp://127.0.0.1:{receiver.port}"}, data_dir=tmp_path
        )
        for i in range(3):
            channel.send(make_alert(id=i, summary="line one\nline two ✓"))
        messages = [parse_syslog(raw) for raw in receiver.wait_for(3)]
    finally:
        receiver.stop()
    # A connection per alert: the receiver's reader threads may take them in any order.
    assert sorted(m.sd["alert@32473"]["id"] for m in messages) == ["0", "1", "2"]
    assert {m.msg for m in messages} == {"WARN disk: line one\nline two ✓"}  # each frame whole, newline kept


def test_syslog_down_fails_fast(tmp_path: Path) -> None:
    channel = build_channel("siem", {"type": "syslog", "address": f"tcp://127.0.0.1:{free_port()}"}, data_dir=tmp_path)
    started = time.monotonic()
    with pytest.raises(
        ChannelError, match=r"syslog channel 'siem': send to tcp://127\.0\.0\.1:\d+ failed: connection refused"
    ):
        channel.send(make_alert())
    assert time.monotonic() - started < 2


def test_format_rfc5424_fields() -> None:
    raw = format_rfc5424(
        facility=16,
        severity=6,
        msg=None,
        timestamp=None,
        hostname="bad host é",
        app_name="a" * 60,
        procid=None,
        msgid="",
        structured_data=[("x@32473", {"v": 'a"b\\c]d', "skipped": None})],
    )
    assert raw == b"<134>1 - badhost " + b"a" * 48 + b' - - [x@32473 v="a\\"b\\\\c\\]d"]'
    parsed = parse_syslog(raw)
    assert parsed.sd == {"x@32473": {"v": 'a"b\\c]d'}} and parsed.msg is None
    assert format_rfc5424(facility=1, severity=5, msg="m", timestamp=0.0, hostname="h", app_name="a").endswith(
        b" - \xef\xbb\xbfm"
    )
    # a size limit cuts MSG, never in the middle of a character
    cut = format_rfc5424(facility=1, severity=5, msg="é" * 100, timestamp=0.0, hostname="h", app_name="a", max_bytes=60)
    assert len(cut) <= 60 and parse_syslog(cut).msg == "é" * ((60 - cut.index(b"\xef\xbb\xbf") - 3) // 2)
    with pytest.raises(ValueError):
        format_rfc5424(facility=24, severity=0, msg="m", timestamp=0.0, hostname="h", app_name="a")


# -- smtp -------------------------------------------------------------------------------------
class Inbox:
    def __init__(self) -> None:
        self.mails: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.mails.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


def _authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
    ok = isinstance(data, LoginPassword) and data.login == b"alerts" and data.password == b"relay-pw-77"
    return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd answers 535 itself


@pytest.fixture
def relay() -> Iterator[tuple[Inbox, int]]:
    inbox, port = Inbox(), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port, authenticator=_authenticate, auth_require_tls=False)
    controller.start()
    yield inbox, port
    controller.stop()


def test_smtp_delivers_a_readable_mail(tmp_path: Path, relay: tuple[Inbox, int]) -> None:
    inbox, port = relay
    table = {
        "type": "smtp",
        "port": port,
        "sender": "appliance@example.org",
        "to": ["ops@example.org", "it@example.org"],
    }
    channel = build_channel("mail", table, data_dir=tmp_path)
    channel.send(make_alert(severity="fail"))
    channel.send(make_alert(severity="fail", event="resolve", state="resolved"))
    (sender, rcpts, content), (_, _, resolved) = inbox.mails
    assert sender == "appliance@example.org" and rcpts == ["ops@example.org", "it@example.org"]
    mail = message_from_bytes(content, policy=policy.default)
    assert mail["Subject"] == "[appliance] FAIL disk: free disk 3% (< 10%)"
    assert mail["Auto-Submitted"] == "auto-generated"
    body = mail.get_content().replace("\r\n", "\n")  # CRLF on the wire
    assert "Subject:   disk:/var/lib/appliance" in body and "Appliance: box1 (version 0.1.0)" in body
    assert json.loads(body.split("Details:\n", 1)[1]) == make_alert()["details"]
    follow_up = message_from_bytes(resolved, policy=policy.default)
    assert follow_up["Subject"].startswith("[appliance] RESOLVED disk:")
    assert follow_up["In-Reply-To"] == mail["Message-ID"]  # one thread per alert


def test_smtp_login_and_its_failure(tmp_path: Path, relay: tuple[Inbox, int]) -> None:
    inbox, port = relay
    table = {"type": "smtp", "port": port, "sender": "a@example.org", "to": ["b@example.org"], "username": "alerts"}
    secret_file(tmp_path, "smtp.pw", "relay-pw-77")
    build_channel("mail", {**table, "password_file": "smtp.pw"}, data_dir=tmp_path).send(make_alert())
    assert len(inbox.mails) == 1
    secret_file(tmp_path, "wrong.pw", "not-the-pw-99")
    channel = build_channel("mail", {**table, "password_file": "wrong.pw"}, data_dir=tmp_path)
    with pytest.raises(ChannelError, match="refused the login for 'alerts'") as err:
        channel.send(make_alert())
    assert "not-the-pw-99" not in str(err.value) and "not-the-pw-99" not in json.dumps(channel.describe())


def test_smtp_down_fails_fast(tmp_path: Path) -> None:
    channel = build_channel(
        "mail",
        {"type": "smtp", "port": free_port(), "sender": "a@example.org", "to": ["b@example.org"]},
        data_dir=tmp_path,
    )
    assert isinstance(channel, SmtpChannel)
    started = time.monotonic()
    with pytest.raises(
        ChannelError, match=r"smtp channel 'mail': sending through smtp://127\.0\.0\.1:\d+ failed: connection refused"
    ):
        channel.send(make_alert())
    assert time.monotonic() - started < 2


# -- configuration ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("table", "error"),
    [
        ({}, r"alerts\.channels\.c\.type: expected one of"),
        ({"type": "pager"}, r"\.type: expected one of \['smtp', 'syslog', 'webhook'\], got 'pager'"),
        ({"type": "webhook", "secret_file": "hook.secret"}, r"alerts\.channels\.c: object missing required field url"),
        (
            {"type": "webhook", "url": "ftp://x/", "secret_file": "hook.secret"},
            r"\.url: expected an http:// or https:// URL",
        ),
        ({"type": "webhook", "url": "https://u:p@x/", "secret_file": "hook.secret"}, r"\.url: credentials in the URL"),
        ({"type": "webhook", "url": "https://x/", "secret_file": "missing"}, r"\.secret_file: cannot read .*missing"),
        (
            {"type": "webhook", "url": "https://x/", "secret_file": "open.secret"},
            r"readable by other users; run chmod 600",
        ),
        ({"type": "webhook", "url": "https://x/", "secret_file": "empty.secret"}, r"empty\.secret is empty"),
        (
            {"type": "webhook", "url": "https://x/", "secret_file": "hook.secret", "timeout_seconds": 0},
            r"\.timeout_seconds: expected float >= 0|\.timeout_seconds: expected float > 0",
        ),
        (
            {"type": "webhook", "url": "https://x/", "secret_file": "hook.secret", "retries": 3},
            r"object contains unknown field retries",
        ),
        ({"type": "syslog", "address": "http://x:1"}, r"\.address: expected udp://host:port"),
        ({"type": "syslog", "address": "udp://x:99999"}, r"\.address: 'udp://x:99999' is not a syslog address"),
        ({"type": "syslog", "address": "unix://dev/log"}, r"\.address: a unix socket address is unix:///absolute/path"),
        ({"type": "syslog", "address": "udp://x", "facility": "local9"}, r"\.facility: expected one of"),
        ({"type": "syslog", "address": "udp://x", "app_name": "my app"}, r"\.app_name: expected 1-48 printable"),
        ({"type": "syslog", "address": "udp://x", "timeout_seconds": 120}, r"\.timeout_seconds: expected float <= 60"),
        ({"type": "smtp", "sender": "a@x.org", "to": []}, r"\.to: name at least one recipient"),
        (
            {"type": "smtp", "sender": "not an address", "to": ["b@x.org"]},
            r"\.sender: 'not an address' is not a mail address",
        ),
        ({"type": "smtp", "sender": "a@x.org", "to": "b@x.org"}, r"\.to: expected array, got str"),
        (
            {"type": "smtp", "sender": "a@x.org", "to": ["b@x.org"], "username": "u"},
            r"set username and password_file together",
        ),
        (
            {
                "type": "smtp",
                "host": "relay.example.org",
                "sender": "a@x.org",
                "to": ["b@x.org"],
                "username": "u",
                "password_file": "hook.secret",
            },
            r"a login to a relay on another host needs starttls = true",
        ),
    ],
)
def test_bad_tables_are_config_errors(tmp_path: Path, table: dict[str, Any], error: str) -> None:
    secret_file(tmp_path)
    secret_file(tmp_path, "open.secret", mode=0o644)
    secret_file(tmp_path, "empty.secret", text="")
    with pytest.raises(ConfigError, match=error) as err:
        build_channel("c", table, data_dir=tmp_path)
    assert SECRET not in str(err.value)


def test_channel_names_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="a channel name is 1-64 letters"):
        build_channel("bad name", {"type": "syslog", "address": "udp://x"}, data_dir=tmp_path)


def test_a_group_readable_secret_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = secret_file(tmp_path, mode=0o640)
    with caplog.at_level(logging.WARNING):
        channel = build_channel(
            "c", {"type": "webhook", "url": "https://x/", "secret_file": str(path)}, data_dir=tmp_path / "elsewhere"
        )
    assert "readable by its group" in caplog.text and SECRET not in caplog.text
    assert channel.describe() == {
        "name": "c",
        "kind": "webhook",
        "target": "https://x:443",
        "timeout_seconds": 5.0,
        "signed": True,
        "ca_file": None,
    }


def test_describe_each_kind(tmp_path: Path) -> None:
    syslog = build_channel("s", {"type": "syslog", "address": "tcp://[::1]"}, data_dir=tmp_path)
    assert isinstance(syslog, SyslogChannel)
    assert syslog.describe()["target"] == "tcp://[::1]:601"
    assert (
        build_channel("u", {"type": "syslog", "address": "udp://siem.example.org"}, data_dir=tmp_path).describe()[
            "target"
        ]
        == "udp://siem.example.org:514"
    )
    smtp = build_channel("m", {"type": "smtp", "sender": "a@x.org", "to": ["b@x.org"]}, data_dir=tmp_path).describe()
    assert smtp["target"] == "smtp://127.0.0.1:25" and smtp["to"] == ["b@x.org"] and smtp["login"] is False
