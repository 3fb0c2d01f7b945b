"""The appliance's Ed25519 audit signing key.

`<keys>/audit_ed25519.pem` holds the private key (PKCS#8 PEM, created once, owner-only, with
O_EXCL so two processes never make two keys). `<keys>/audit_ed25519.pub` holds the raw public
key as 64 hex characters: the pinned key verifiers trust. A private key that no longer matches
the pinned public key is refused (the key was replaced). Keep a copy of the public key (or an
exported checkpoint, which carries it) off the box: an attacker who can rewrite the key
directory can also rewrite the pinned key.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance.audit.chain import checkpoint_message
from appliance.errors import AuditError

log = logging.getLogger(__name__)

KEY_FILE = "audit_ed25519.pem"
PUBLIC_KEY_FILE = "audit_ed25519.pub"


class Signer:
    """Signs checkpoints with one Ed25519 private key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key_hex = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()

    @classmethod
    def generate(cls) -> Signer:
        return cls(Ed25519PrivateKey.generate())

    def sign(self, message: bytes) -> str:
        """The hex Ed25519 signature of `message`."""
        return self._key.sign(message).hex()

    def sign_checkpoint(self, index: int, hash: str, time: float) -> str:
        return self.sign(checkpoint_message(index, hash, time))

    def private_pem(self) -> bytes:
        return self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def parse_public_key(public_key_hex: str) -> Ed25519PublicKey:
    """Raises `AuditError` unless `public_key_hex` is 64 hex characters."""
    try:
        raw = bytes.fromhex(public_key_hex.strip())
        if len(raw) != 32:
            raise ValueError
        return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, AttributeError):
        raise AuditError(f"not an Ed25519 public key (expected 64 hex characters): {str(public_key_hex)[:80]!r}") from None


def verify_signature(public_key_hex: str, message: bytes, signature_hex: str) -> bool:
    """Whether `signature_hex` is a valid signature of `message` by `public_key_hex`."""
    key = parse_public_key(public_key_hex)
    try:
        key.verify(bytes.fromhex(signature_hex), message)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def load_or_create_signing_key(keys_dir: Path) -> Signer:
    """The audit signer, created on first use. Raises `AuditError` if the key file is damaged or
    no longer matches the pinned public key."""
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = keys_dir / KEY_FILE
    if not path.exists():
        signer = Signer.generate()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            signer = _read_key(path, wait=True)  # another process won the race
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(signer.private_pem())
                fh.flush()
                os.fsync(fh.fileno())
            log.info("created the audit signing key %s", path)
    else:
        signer = _read_key(path)
    pinned = load_pinned_public_key(keys_dir)
    if pinned is None:
        _write_public_key(keys_dir / PUBLIC_KEY_FILE, signer.public_key_hex)
    elif pinned != signer.public_key_hex:
        raise AuditError(
            f"{path} does not match the pinned public key in {keys_dir / PUBLIC_KEY_FILE}: the audit "
            "signing key was replaced or damaged. Restore the original key file; checkpoints signed "
            "by another key will fail verification."
        )
    return signer


def load_pinned_public_key(keys_dir: Path) -> str | None:
    """The pinned public key (hex) from `<keys>/audit_ed25519.pub`, or None if there is none."""
    path = keys_dir / PUBLIC_KEY_FILE
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditError(f"{path}: cannot read the pinned audit public key: {exc}") from None
    parse_public_key(text)
    return text.lower()


def _read_key(path: Path, *, wait: bool = False) -> Signer:
    deadline = time.monotonic() + (2.0 if wait else 0.0)
    while True:
        try:
            data = path.read_bytes()
            key = serialization.load_pem_private_key(data, password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise AuditError(f"{path}: not an Ed25519 private key")
            if path.stat().st_mode & 0o077:
                log.warning("%s is readable by other users; it should be mode 0600", path)
            return Signer(key)
        except OSError as exc:
            raise AuditError(f"{path}: cannot read the audit signing key: {exc.strerror}") from None
        except (ValueError, TypeError):
            if time.monotonic() >= deadline:
                raise AuditError(f"{path}: the audit signing key is damaged (not a PEM private key)") from None
            time.sleep(0.05)


def _write_public_key(path: Path, public_key_hex: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="ascii") as fh:
        fh.write(public_key_hex + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
