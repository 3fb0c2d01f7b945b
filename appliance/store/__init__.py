"""SQLite persistence: one writer thread doing group commits, migrations, backups."""

from appliance.store.db import Store, open_connection
from appliance.store.migrations import MIGRATIONS, latest_version, schema_version

__all__ = ["Store", "open_connection", "MIGRATIONS", "latest_version", "schema_version"]
