"""Conventions shared by every `appliance` CLI group: `--data-dir`, `--json`, opening the
store, and turning `ApplianceError` into one line on stderr with exit status 1."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click

from appliance.audit.log import AuditLog, admin_body, cli_actor
from appliance.config import Settings, load_settings
from appliance.errors import ApplianceError
from appliance.store import Store

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["audit_admin", "data_dir_option", "emit", "handled", "json_option", "opened"]


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


def audit_admin(
    settings: Settings, store: Store, action: str, target: str | None, *, before: Any = None, after: Any = None
) -> None:
    """Record a change made from the command line as an admin audit record."""
    log = AuditLog.from_settings(store, settings)
    log.append_sync("admin", admin_body(cli_actor(), action, target, before=before, after=after), key_id=None, team_id=None)
