"""Where the appliance keeps its data."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def default_data_dir(env: dict[str, str] | None = None) -> Path:
    """`APPLIANCE_DATA_DIR`, else the per-user data directory (XDG on Linux)."""
    env = dict(os.environ) if env is None else env
    if env.get("APPLIANCE_DATA_DIR"):
        return Path(env["APPLIANCE_DATA_DIR"]).expanduser()
    base = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "appliance"


@dataclass(frozen=True, slots=True)
class DataPaths:
    """The layout of one data directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "appliance.toml"

    @property
    def database(self) -> Path:
        return self.root / "appliance.db"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def encoded_models(self) -> Path:
        """Re-encodings of registered models, derived from them and rebuilt when missing."""
        return self.models / "encoded"

    @property
    def golden(self) -> Path:
        """Golden sets, one YAML or JSON file each (appliance/checks/golden.py)."""
        return self.root / "golden"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def backups(self) -> Path:
        return self.root / "backups"

    @property
    def server_secret(self) -> Path:
        return self.keys / "server_secret"

    @property
    def upstream_secret_key(self) -> Path:
        """The Fernet key that encrypts remote upstreams' API keys in the database."""
        return self.keys / "upstreams.fernet"

    @property
    def admin_socket(self) -> Path:
        """The running server's local admin socket (peer-credential authentication)."""
        return self.root / "admin.sock"

    @property
    def tls(self) -> Path:
        """The self-signed certificate and key `appliance init --tls` makes."""
        return self.keys / "tls"

    def ensure(self) -> None:
        """Create the directories, owner-only where secrets live."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.models.mkdir(exist_ok=True)
        for private in (self.keys, self.backups):  # backups are whole copies of the database
            private.mkdir(mode=0o700, exist_ok=True)
            os.chmod(private, 0o700)
