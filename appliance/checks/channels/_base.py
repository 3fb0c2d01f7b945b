"""What every alert channel shares: the protocol, its error, and reading a config table or a
secret file into checked values."""

from __future__ import annotations

import logging
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

import msgspec

from appliance.errors import ApplianceError, ConfigError

log = logging.getLogger(__name__)
S = TypeVar("S", bound=msgspec.Struct)

DEFAULT_TIMEOUT = 5.0


class ChannelError(ApplianceError):
    """A channel could not deliver: the message names the channel and what failed, never a
    secret (no webhook secret, SMTP password or URL path)."""

    status = 502
    code = "alert_channel_failed"

    def __init__(self, channel: str, kind: str, reason: str) -> None:
        super().__init__(f"{kind} channel {channel!r}: {reason}")
        self.channel = channel
        self.kind = kind
        self.reason = reason


class Channel(Protocol):
    """Where alerts go. `send` blocks (run it in a thread) for at most about the channel's
    timeout and raises `ChannelError`; `describe` is safe to show an admin."""

    name: str
    kind: str

    def send(self, alert: Mapping[str, Any]) -> None: ...

    def describe(self) -> dict[str, Any]: ...


def parse_table(name: str, table: Mapping[str, Any], spec: type[S]) -> S:
    """Check a `[alerts.channels.<name>]` table (without its `type`) against `spec`."""
    where = f"alerts.channels.{name}"
    try:
        return msgspec.convert(dict(table), spec)
    except msgspec.ValidationError as exc:
        # msgspec says "Expected `int`, got `str` - at `$.port`"; name the key as config.py does.
        message, sep, at = str(exc).rpartition(" - at `")
        if not sep:
            message, at = str(exc), "$"
        key = at.rstrip("`").removeprefix("$").lstrip(".")
        message = message.replace("`", "")
        raise ConfigError(f"{where}{'.' + key if key else ''}: {message[:1].lower()}{message[1:]}") from None


def resolve(path: str, data_dir: Path) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else data_dir / candidate


def read_secret_file(where: str, path: Path) -> bytes:
    """A secret from a file of its own, stripped of surrounding whitespace. Refused when other
    users may read it; a warning when the file's group may."""
    try:
        mode = path.stat().st_mode
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{where}: {path} is not a regular file")
    if mode & 0o007:
        raise ConfigError(f"{where}: {path} is readable by other users; run chmod 600 {path}")
    if mode & 0o070:
        log.warning("%s: %s is readable by its group; it should be mode 0600", where, path)
    if not secret:
        raise ConfigError(f"{where}: {path} is empty")
    return secret


def to_json(value: Any) -> bytes:
    """Compact JSON with sorted keys for an alert or its details. Never fails on odd values: NaN
    and infinities become null, other types their text (a check's details are free-form)."""
    try:
        return msgspec.json.encode(value, enc_hook=str, order="sorted")
    except TypeError:  # a dict with non-string keys cannot be sorted
        return msgspec.json.encode(value, enc_hook=str)


def describe_error(exc: BaseException) -> str:
    """An OS or library error in a few words, for a `ChannelError`."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
