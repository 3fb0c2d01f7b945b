"""RFC 5424 syslog messages, formatted by hand: the standard library's `SysLogHandler` writes
the older BSD (RFC 3164) form, which SIEMs parse less reliably.

    SYSLOG-MSG = <PRI>1 SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID SP SD [SP BOM MSG]

Header fields hold printable US-ASCII only (33-126) and are cut to the RFC's lengths
(hostname 255, app-name 48, procid 128, msgid 32); an empty field is the NILVALUE `-`. The
timestamp is UTC with microseconds (`2024-05-01T12:00:00.123456Z`). SD-PARAM values escape
`"`, `\\` and `]` with a backslash. MSG is UTF-8 behind a byte-order mark, as section 6.4 asks.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["FACILITIES", "SEVERITIES", "StructuredData", "escape_param_value", "format_rfc5424", "header_field"]

FACILITIES: dict[str, int] = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7,
    "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12, "audit": 13, "alert": 14, "clock": 15,
    **{f"local{i}": 16 + i for i in range(8)},
}  # fmt: skip
SEVERITIES: dict[str, int] = {
    "emerg": 0, "alert": 1, "crit": 2, "err": 3, "warning": 4, "notice": 5, "info": 6, "debug": 7,
}  # fmt: skip

NILVALUE = "-"
BOM = b"\xef\xbb\xbf"
_MAX = {"hostname": 255, "app_name": 48, "procid": 128, "msgid": 32, "sd_name": 32}

# One SD-ELEMENT: its SD-ID (`name@<enterprise number>` for ones of our own) and its params.
# A param whose value is None is left out.
StructuredData = Sequence[tuple[str, Mapping[str, Any]]]


def header_field(value: object, limit: int) -> str:
    """A header field: printable US-ASCII only (others dropped), at most `limit` characters."""
    text = "" if value is None else str(value)
    text = "".join(ch for ch in text if 33 <= ord(ch) <= 126)[:limit]
    return text or NILVALUE


def _sd_name(value: str) -> str:
    # SD-NAME: printable US-ASCII except '=', space, ']' and '"'.
    name = "".join(ch for ch in value if 33 <= ord(ch) <= 126 and ch not in '= ]"')[: _MAX["sd_name"]]
    if not name:
        raise ValueError(f"{value!r} is not a usable SD-ID or PARAM-NAME")
    return name


def escape_param_value(value: object) -> str:
    """PARAM-VALUE escaping (section 6.3.3): a backslash before `"`, `\\` and `]`."""
    text = str(value)
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def format_timestamp(ts: float) -> str:
    moment = dt.datetime.fromtimestamp(ts, tz=dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _structured_data(elements: StructuredData) -> str:
    parts = []
    for sd_id, params in elements:
        fields = "".join(f' {_sd_name(k)}="{escape_param_value(v)}"' for k, v in params.items() if v is not None)
        parts.append(f"[{_sd_name(sd_id)}{fields}]")
    return "".join(parts) or NILVALUE


def format_rfc5424(
    *,
    facility: int,
    severity: int,
    msg: str | None,
    timestamp: float | None,
    hostname: str | None,
    app_name: str | None,
    procid: str | int | None = None,
    msgid: str | None = None,
    structured_data: StructuredData = (),
    max_bytes: int | None = None,
) -> bytes:
    """One RFC 5424 message as bytes, without transport framing.

    `timestamp` is Unix seconds (None writes the NILVALUE). With `max_bytes`, MSG is cut (at a
    character boundary) so the whole message fits, as RFC 5426 allows for UDP; the header and
    structured data are never cut.
    """
    if not (0 <= facility <= 23 and 0 <= severity <= 7):
        raise ValueError(f"facility must be 0-23 and severity 0-7, got {facility} and {severity}")
    header = " ".join(
        (
            f"<{facility * 8 + severity}>1",
            NILVALUE if timestamp is None else format_timestamp(timestamp),
            header_field(hostname, _MAX["hostname"]),
            header_field(app_name, _MAX["app_name"]),
            header_field(procid, _MAX["procid"]),
            header_field(msgid, _MAX["msgid"]),
            _structured_data(structured_data),
        )
    )
    head = header.encode("utf-8", "replace")  # SD values may hold any UTF-8
    if msg is None:
        return head
    body = msg.encode("utf-8", "replace")  # "replace": a lone surrogate must not lose the message
    if max_bytes is not None:
        room = max(0, max_bytes - len(head) - 1 - len(BOM))
        body = body[:room].decode("utf-8", "ignore").encode("utf-8")  # drop a cut multi-byte character
    return head + b" " + BOM + body
