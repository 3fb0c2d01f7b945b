"""Encrypts remote upstreams' API keys at rest, so that a copy of the database alone does not
give them away: Fernet, with its key in a file of its own beside the server secret."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from appliance.errors import ConfigError

__all__ = ["SecretBox"]


class SecretBox:
    """`encrypt` and `decrypt` short strings with the Fernet key in `key_path`.

    The key file is created on first use, owner-only (mode 0600 from the start, never widened
    and then narrowed). A damaged key file or token raises `ConfigError`; no message ever
    holds the key or the secret. Safe to share between threads.
    """

    def __init__(self, key_path: Path) -> None:
        self.key_path = key_path
        self._fernet: Fernet | None = None
        self._lock = threading.Lock()

    def encrypt(self, plaintext: str) -> str:
        return self._box().encrypt(plaintext.encode("utf-8")).decode("ascii")

    def decrypt(self, token: str) -> str:
        try:
            return self._box().decrypt(token.encode("ascii")).decode("utf-8")
        except (InvalidToken, UnicodeError):
            raise ConfigError(
                f"a stored upstream API key cannot be decrypted: it is damaged, or {self.key_path} is not the key "
                "it was encrypted with (set the upstream's key again)"
            ) from None

    def _box(self) -> Fernet:
        with self._lock:
            if self._fernet is None:
                self._fernet = Fernet(_load_or_create(self.key_path))
            return self._fernet


def _load_or_create(path: Path) -> bytes:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = Fernet.generate_key()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_key(path)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key + b"\n")
        fh.flush()
        os.fsync(fh.fileno())
    return key


def _read_key(path: Path) -> bytes:
    try:
        key = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the upstream key file: {exc.strerror}") from None
    try:
        Fernet(key)
    except ValueError:
        raise ConfigError(
            f"{path} is damaged: it does not hold a Fernet key; restore it from a backup "
            "(upstream API keys stored with it cannot be read without it)"
        ) from None
    return key
