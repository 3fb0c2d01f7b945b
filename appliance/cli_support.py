"""Conventions shared by every `appliance` CLI group: `--data-dir`, `--json`, opening the
store, turning `ApplianceError` into one line on stderr with exit status 1, and making a
change through the running server when there is one.

A verb that changes what the live server holds (a key, a team, a budget) goes through the
server's local admin socket while it runs, so the change takes effect there at once and is
audited as the local admin's; with no server running it is made on the database directly,
audited as the CLI's. Either way the change and its audit record are one transaction.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from appliance.admin_client import LocalAdmin
from appliance.audit.log import AuditLog
from appliance.auth import KeyService, load_or_create_server_secret
from appliance.config import Settings, load_settings
from appliance.errors import ApplianceError
from appliance.metering.budgets import BudgetService
from appliance.model_registry import ModelRegistry
from appliance.store import Store
from appliance.teams import TeamService

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["Offline", "apply_change", "data_dir_option", "emit", "handled", "json_option", "opened", "offline"]


def data_dir_option(fn: F) -> F:
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Data directory (default: $APPLIANCE_DATA_DIR, else the per-user data directory).",
    )(fn)


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(fn)


def emit(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


@contextmanager
def opened(data_dir: Path | None) -> Iterator[tuple[Settings, Store]]:
    """Load and validate the settings, then open (and migrate) the store."""
    settings = load_settings(data_dir)
    settings.paths.ensure()
    store = Store(settings.paths.database, backups_dir=settings.paths.backups).open()
    try:
        yield settings, store
    finally:
        store.close()


def handled(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ApplianceError as exc:
            click.echo(f"error: {exc.message}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class Offline:
    """The services a CLI verb works with on the database, when no server runs."""

    settings: Settings
    store: Store
    audit: AuditLog
    keys: KeyService
    teams: TeamService
    budgets: BudgetService
    models: ModelRegistry


def offline(settings: Settings, store: Store) -> Offline:
    audit = AuditLog.from_settings(store, settings)
    keys = KeyService(
        store,
        load_or_create_server_secret(settings.paths.server_secret),
        audit,
        expiry_warning_days=settings.auth.expiry_warning_days,
    )
    return Offline(
        settings,
        store,
        audit,
        keys,
        TeamService(store, audit),
        BudgetService(store, audit, currency=settings.costs.currency),
        ModelRegistry(store, settings.paths.models, audit),
    )


def apply_change(
    data_dir: Path | None, *, remote: tuple[str, str, Any], local: Callable[[Offline], Any]
) -> Any:
    """`remote` = (method, path, JSON body) on the running server's admin API, else `local`
    on the database. Both return the same JSON-ready result."""
    settings = load_settings(data_dir)
    live = LocalAdmin.connect(settings.paths.admin_socket)
    if live is not None:
        method, path, body = remote
        with live:
            return live.request(method, path, json=body)
    with opened(data_dir) as (settings, store):
        return local(offline(settings, store))
