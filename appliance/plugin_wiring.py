"""Connecting the plugin manager to the rest of the control plane: its events become system
audit records, and committed audit and usage records go to the observers."""

from __future__ import annotations

import concurrent.futures
import logging
from typing import Any

from appliance import __version__
from appliance.audit import AuditLog
from appliance.config import Settings
from appliance.governance import Governance
from appliance.hookspecs import HOOKSPEC_VERSION
from appliance.plugin_manager import PluginManager
from appliance.store import Store

log = logging.getLogger(__name__)


def connect_plugins(plugins: PluginManager, store: Store, audit: AuditLog, governance: Governance) -> None:
    def record(event: str, details: dict[str, Any]) -> None:
        # From any thread (a plugin's pool included); not waited on: the writer commits it.
        future = store.submit(audit.append_fn("system", {"event": event, **details}, key_id=None, team_id=None))
        future.add_done_callback(_log_failure)

    plugins.attach(record)
    if plugins.loaded_with("on_audit_event"):
        audit.listeners.append(lambda event: plugins.observe("on_audit_event", event))
    if plugins.loaded_with("on_usage"):
        governance.usage_listeners.append(lambda usage: plugins.observe("on_usage", usage))


def plugin_app_info(settings: Settings) -> dict[str, Any]:
    """What `startup(app)` and `shutdown(app)` are handed."""
    return {"data_dir": str(settings.paths.root), "version": __version__, "hookspec": HOOKSPEC_VERSION}


def _log_failure(future: concurrent.futures.Future[Any]) -> None:
    if future.exception() is not None:
        log.error("a plugin event could not be audited: %s", future.exception())
