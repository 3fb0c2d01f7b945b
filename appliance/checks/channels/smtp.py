"""The SMTP channel: each alert as a plain-text mail through a relay (normally the host's own
MTA on 127.0.0.1:25, which queues and retries on its own).

    [alerts.channels.mail]
    type = "smtp"
    sender = "appliance@example.org"
    to = ["it-ops@example.org"]
    host = "127.0.0.1"                  # the relay
    port = 25
    starttls = false                    # upgrade with STARTTLS (the certificate is verified)
    username = ""                       # optional login; needs password_file
    password_file = ""                  # relative to the data directory; mode 0600
    timeout_seconds = 5                 # per SMTP step; at most 60

A login is refused without STARTTLS unless the relay is on this host, so a password never
crosses the network in clear. Mails about one alert form a thread: the first (`open`) sets a
Message-ID the later ones (`repeat`, `resolve`) answer with In-Reply-To and References.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import ipaddress
import re
import smtplib
import socket
import ssl
from collections.abc import Mapping
from email.headerregistry import Address
from email.message import EmailMessage
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from appliance.checks.channels._base import (
    DEFAULT_TIMEOUT,
    ChannelError,
    describe_error,
    parse_table,
    read_secret_file,
    resolve,
    to_json,
)
from appliance.checks.channels.syslog import alert_line
from appliance.errors import ConfigError

__all__ = ["SmtpChannel"]

_DOMAIN = re.compile(r"[^A-Za-z0-9.-]")


class SmtpTable(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    sender: str
    to: list[str]
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=1, le=65535)] = 25
    starttls: bool = False
    username: str = ""
    password_file: str = ""
    timeout_seconds: Annotated[float, Meta(gt=0, le=60)] = DEFAULT_TIMEOUT


def _address(where: str, value: str) -> str:
    try:
        return Address(addr_spec=value).addr_spec
    except (ValueError, TypeError):  # the parser's defects are ValueErrors too
        raise ConfigError(f"{where}: {value!r} is not a mail address (write only user@domain)") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _iso(ts: Any) -> str:
    try:
        return dt.datetime.fromtimestamp(float(ts), tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError, OverflowError, OSError):
        return "-"


class SmtpChannel:
    """Sends each alert as one mail to every address in `to`; see the module docstring."""

    kind = "smtp"

    def __init__(
        self,
        name: str,
        *,
        sender: str,
        to: list[str],
        host: str = "127.0.0.1",
        port: int = 25,
        starttls: bool = False,
        username: str = "",
        password: str = "",
        timeout_seconds: float = DEFAULT_TIMEOUT,
    ) -> None:
        where = f"alerts.channels.{name}"
        if not to:
            raise ConfigError(f"{where}.to: name at least one recipient")
        if bool(username) != bool(password):
            raise ConfigError(f"{where}: set username and password_file together, or neither")
        if username and not starttls and not _is_loopback(host):
            raise ConfigError(f"{where}: a login to a relay on another host needs starttls = true")
        self.name = name
        self.sender = _address(f"{where}.sender", sender)
        self.to = [_address(f"{where}.to", addr) for addr in to]
        self.host = host
        self.port = port
        self.starttls = starttls
        self.username = username
        self.timeout_seconds = float(timeout_seconds)
        self._password = password

    @classmethod
    def from_table(cls, name: str, table: Mapping[str, Any], *, data_dir: Path) -> SmtpChannel:
        spec = parse_table(name, table, SmtpTable)
        password = ""
        if spec.password_file:
            where = f"alerts.channels.{name}.password_file"
            try:
                password = read_secret_file(where, resolve(spec.password_file, data_dir)).decode("utf-8")
            except UnicodeDecodeError:
                raise ConfigError(f"{where}: the password is not UTF-8 text") from None
        return cls(
            name,
            sender=spec.sender,
            to=spec.to,
            host=spec.host,
            port=spec.port,
            starttls=spec.starttls,
            username=spec.username,
            password=password,
            timeout_seconds=spec.timeout_seconds,
        )

    @property
    def target(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"smtp://{host}:{self.port}"

    def message(self, alert: Mapping[str, Any]) -> EmailMessage:
        appliance = alert.get("appliance") or {}
        domain = _DOMAIN.sub("", str(appliance.get("host") or "")) or "appliance.invalid"
        msg = EmailMessage()
        msg["Subject"] = " ".join(f"[appliance] {alert_line(alert)}".split())[
            :200
        ]  # one line, never a header injection
        msg["From"] = self.sender
        msg["To"] = ", ".join(self.to)
        msg["Date"] = email.utils.formatdate(float(alert.get("ts") or 0) or None, usegmt=True)
        msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies
        thread = f"<alert-{alert.get('id')}.{int(float(alert.get('opened_at') or 0))}@{domain}>"
        if alert.get("event", "open") == "open":
            msg["Message-ID"] = thread
        else:
            msg["Message-ID"] = email.utils.make_msgid("alert", domain=domain)
            msg["In-Reply-To"] = thread
            msg["References"] = thread
        msg.set_content(self._body(alert, appliance), cte="quoted-printable")  # readable in any mail client
        return msg

    def _body(self, alert: Mapping[str, Any], appliance: Mapping[str, Any]) -> str:
        details = alert.get("details") or {}
        lines = [
            alert_line(alert),
            "",
            f"Alert:     {alert.get('id')} ({alert.get('event')}, sent {alert.get('sends')} time(s))",
            f"Rule:      {alert.get('rule')}",
            f"Check:     {alert.get('check')}",
            f"Subject:   {alert.get('subject')}",
            f"Severity:  {alert.get('severity')}",
            f"State:     {alert.get('state')}",
            f"Opened:    {_iso(alert.get('opened_at'))}",
            f"This mail: {_iso(alert.get('ts'))}",
            f"Appliance: {appliance.get('host')} (version {appliance.get('version')})",
            "",
            "Details:",
            msgspec.json.format(to_json(details), indent=2).decode("utf-8"),
        ]
        return "\n".join(lines) + "\n"

    def send(self, alert: Mapping[str, Any]) -> None:
        msg = self.message(alert)
        # An explicit EHLO name: smtplib's default, socket.getfqdn(), can wait on DNS unbounded.
        local_hostname = (
            _DOMAIN.sub("", str((alert.get("appliance") or {}).get("host") or socket.gethostname())) or "localhost"
        )
        try:
            with smtplib.SMTP(
                self.host, self.port, local_hostname=local_hostname, timeout=self.timeout_seconds
            ) as smtp:
                if self.starttls:
                    smtp.starttls(context=ssl.create_default_context())
                if self.username:
                    smtp.login(self.username, self._password)
                smtp.send_message(msg)
        except smtplib.SMTPAuthenticationError as exc:  # the relay's text is left out: it may quote the login
            raise ChannelError(
                self.name, self.kind, f"{self.target} refused the login for {self.username!r} ({exc.smtp_code})"
            ) from None
        except smtplib.SMTPRecipientsRefused as exc:
            raise ChannelError(
                self.name, self.kind, f"{self.target} refused every recipient: {', '.join(exc.recipients)}"
            ) from None
        except smtplib.SMTPResponseException as exc:
            reply = (
                exc.smtp_error.decode("utf-8", "replace") if isinstance(exc.smtp_error, bytes) else str(exc.smtp_error)
            )
            raise ChannelError(self.name, self.kind, f"{self.target} answered {exc.smtp_code} {reply}") from None
        except (smtplib.SMTPException, OSError) as exc:
            raise ChannelError(
                self.name, self.kind, f"sending through {self.target} failed: {describe_error(exc)}"
            ) from None

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "target": self.target,
            "sender": self.sender,
            "to": list(self.to),
            "starttls": self.starttls,
            "login": bool(self.username),
            "timeout_seconds": self.timeout_seconds,
        }

    def __repr__(self) -> str:
        return f"SmtpChannel({self.name!r}, {self.target!r})"
