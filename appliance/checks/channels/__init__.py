"""Alert channels: where the alert engine sends what it finds. Each `[alerts.channels.<name>]`
table has a `type` ("webhook", "syslog" or "smtp") and that type's keys, documented in
`webhook.py`, `syslog.py` and `smtp.py`.

Every send blocks for at most about the channel's timeout (run it in a thread) and raises
`ChannelError` naming the channel and what failed, never a secret.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from appliance.checks.channels._base import Channel, ChannelError
from appliance.checks.channels.smtp import SmtpChannel
from appliance.checks.channels.syslog import SyslogChannel
from appliance.checks.channels.webhook import WebhookChannel, verify_signature
from appliance.errors import ConfigError

__all__ = [
    "KINDS",
    "Channel",
    "ChannelError",
    "SmtpChannel",
    "SyslogChannel",
    "WebhookChannel",
    "build_channel",
    "verify_signature",
]

KINDS: dict[str, type[WebhookChannel] | type[SyslogChannel] | type[SmtpChannel]] = {
    "webhook": WebhookChannel,
    "syslog": SyslogChannel,
    "smtp": SmtpChannel,
}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def build_channel(name: str, table: Mapping[str, Any], *, data_dir: Path) -> Channel:
    """The channel a config table describes; `ConfigError` naming the key if it is wrong.
    Secret files are read here, once: a changed secret needs the channels built again."""
    if not _NAME.fullmatch(name):
        raise ConfigError(f"alerts.channels.{name}: a channel name is 1-64 letters, digits, '_', '.' or '-'")
    if not isinstance(table, Mapping):
        raise ConfigError(f"alerts.channels.{name}: expected a table")
    settings = dict(table)
    kind = settings.pop("type", None)
    if kind not in KINDS:
        raise ConfigError(f"alerts.channels.{name}.type: expected one of {sorted(KINDS)}, got {kind!r}")
    return KINDS[kind].from_table(name, settings, data_dir=data_dir)
