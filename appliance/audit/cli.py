"""`appliance audit verify|export|checkpoint`. Verify and export open the database read-only;
checkpoint writes one signed checkpoint through the store."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import click

from appliance.audit.content import ErasureSelector, erase_fn
from appliance.audit.export import export_checkpoint, export_records, load_checkpoint
from appliance.audit.log import AuditLog, cli_actor
from appliance.audit.signing import load_pinned_public_key
from appliance.audit.verify import verify
from appliance.cli_support import apply_change, data_dir_option, emit, handled, json_option
from appliance.config import load_settings
from appliance.errors import AuditError
from appliance.store import Store, open_connection


class _DateType(click.ParamType):
    """A date (`2024-05-01`, midnight UTC), a date and time (`2024-05-01T12:00:00`, UTC unless
    an offset is given) or seconds since the epoch."""

    name = "DATE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        text = str(value).strip()
        try:
            return float(text)
        except ValueError:
            pass
        try:
            when = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            self.fail(f"{value!r} is not a date: use YYYY-MM-DD, YYYY-MM-DDTHH:MM[:SS][+HH:MM] or epoch seconds", param, ctx)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return when.timestamp()


@contextmanager
def _read_only(data_dir: Path | None) -> Iterator[Any]:
    settings = load_settings(data_dir)
    path = settings.paths.database
    if not path.exists():
        raise AuditError(f"{path}: no database here (run `appliance init` first, or pass --data-dir)")
    conn = open_connection(path, readonly=True)
    try:
        yield settings, conn
    finally:
        conn.close()


@contextmanager
def _output(path: Path | None) -> Iterator[IO[str]]:
    if path is None:
        yield sys.stdout
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        raise AuditError(f"{path}: cannot write: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
        yield fh


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def audit() -> None:
    """Verify, export and checkpoint the tamper-evident audit log."""


@audit.command("verify")
@click.option("--checkpoint", "checkpoint_file", type=click.Path(dir_okay=False, path_type=Path), help="An exported checkpoint file (detects a truncated or rewritten log).")
@click.option("--public-key", default=None, help="Trusted Ed25519 public key, hex (default: the pinned key in <data>/keys/audit_ed25519.pub).")
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@handled
def verify_command(checkpoint_file: Path | None, public_key: str | None, data_dir: Path | None, as_json: bool) -> None:
    """Check every record and checkpoint; exit 0 if intact, 1 if tampered with."""
    checkpoint = load_checkpoint(checkpoint_file) if checkpoint_file else None
    with _read_only(data_dir) as (settings, conn):
        trusted = public_key or load_pinned_public_key(settings.paths.keys)
        report = verify(conn, public_key=trusted, checkpoint=checkpoint)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(report.summary())
    sys.exit(0 if report.ok else 1)


@audit.command("export")
@click.option("--since", type=_DateType(), default=None, help="First time included (UTC unless an offset is given).")
@click.option("--until", type=_DateType(), default=None, help="First time excluded.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write here (mode 0600) instead of stdout.")
@data_dir_option
@handled
def export_command(since: float | None, until: float | None, fmt: str, output: Path | None, data_dir: Path | None) -> None:
    """Export records as JSON lines or CSV, with the hashes needed to re-verify them."""
    with _read_only(data_dir) as (_, conn), _output(output) as out:
        count = 0
        for line in export_records(conn, since=since, until=until, fmt=fmt):  # type: ignore[arg-type]
            out.write(line)
            count += 1
    if output is not None:
        records = count - 1 if fmt == "csv" else count
        click.echo(f"exported {records} records to {output}", err=True)


@audit.command("checkpoint")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the checkpoint here instead of stdout.")
@data_dir_option
@handled
def checkpoint_command(output: Path | None, data_dir: Path | None) -> None:
    """Sign the current end of the log now and print the checkpoint, for off-box storage."""
    settings = load_settings(data_dir)
    settings.paths.ensure()
    store = Store(settings.paths.database, backups_dir=settings.paths.backups).open()
    try:
        checkpoint = AuditLog.from_settings(store, settings).checkpoint_sync()
    finally:
        store.close()
    if checkpoint is None:
        raise AuditError("the audit log is empty: there is nothing to checkpoint yet")
    with _output(output) as out:
        out.write(export_checkpoint(checkpoint))
    if output is not None:
        click.echo(f"checkpoint of record {checkpoint.index} written to {output}", err=True)


@audit.command("erase")
@click.option("--key", "key_id", default=None, help="Erase the kept prompts of this key's requests.")
@click.option("--team", default=None, help="Erase the kept prompts of this team's requests (id or name).")
@click.option("--before", type=_DateType(), default=None, help="Erase the kept prompts of everything before this time.")
@data_dir_option
@json_option
@handled
def erase_command(key_id: str | None, team: str | None, before: float | None, data_dir: Path | None, as_json: bool) -> None:
    """Remove kept prompt text (redacted or full retention) for the right to erasure.

    The records, their digests and the chain stay intact (`audit verify` still passes), and
    the erasure is itself an audit record."""
    ErasureSelector(key_id=key_id, team_id=team, before=before)  # refuses unless exactly one is given
    if key_id is not None:
        body: dict[str, Any] = {"by": "key", "key_id": key_id}
    elif team is not None:
        body = {"by": "team", "team": team}
    else:
        body = {"by": "before", "before": datetime.fromtimestamp(before or 0.0, UTC).isoformat()}

    def local(o: Any) -> dict[str, Any]:
        chosen = ErasureSelector(key_id=key_id, team_id=o.teams.get(team).id if team else None, before=before)
        result: dict[str, Any] = o.store.write_sync(erase_fn(o.audit, cli_actor(), chosen))
        return result

    result = apply_change(data_dir, remote=("POST", "/admin/audit/erase", body), local=local)
    if as_json:
        emit(result)
    else:
        what = f"key {key_id}" if key_id else f"team {team}" if team else f"before {body.get('before')}"
        click.echo(f"erased the kept prompts of {result['erased']} records ({what}); recorded as audit record {result['record']}")
