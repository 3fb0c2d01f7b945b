"""`appliance feedback list|export` and `appliance drift promote`: users' feedback on answers,
through the running server's admin socket when it runs, else on the database."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import click
import httpx

from appliance.admin_client import LocalAdmin
from appliance.audit.log import cli_actor
from appliance.cli_support import apply_change, data_dir_option, emit, handled, json_option, offline, opened
from appliance.config import load_settings
from appliance.errors import InvalidRequest, ServiceUnavailable
from appliance.feedback import RATINGS, FeedbackService, export_lines
from appliance.keys_cli import parse_duration

__all__ = ["feedback", "promote"]


def _since(text: str | None) -> str | None:
    """`--since` as RFC 3339: a time as given (UTC without an offset), or `24h`, `7d`... ago."""
    if text is None:
        return None
    try:
        when = datetime.now(UTC).timestamp() - parse_duration(text)
    except InvalidRequest:
        try:
            parsed = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            raise InvalidRequest(f"--since {text!r} is neither a time (ISO 8601) nor a duration (24h, 7d)") from None
        when = (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds")


def _epoch(iso: str | None) -> float | None:
    return datetime.fromisoformat(iso).timestamp() if iso else None


@click.group()
def feedback() -> None:
    """Users' ratings and corrections of answers (POST /v1/feedback)."""


@feedback.command("list")
@click.option("--model", default=None, help="Only feedback on this model's answers.")
@click.option("--rating", type=click.Choice(RATINGS), default=None, help="Only this rating.")
@click.option("--since", default=None, help="A time (ISO 8601, UTC without an offset) or a duration ago: 24h, 7d.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@data_dir_option
@json_option
@handled
def feedback_list(
    model: str | None, rating: str | None, since: str | None, limit: int, data_dir: Path | None, as_json: bool
) -> None:
    """Feedback, newest first, with what the audit log kept of each text."""
    start = _since(since)
    params = {
        k: v for k, v in {"model": model, "rating": rating, "since": start, "limit": limit}.items() if v is not None
    }
    settings = load_settings(data_dir)
    live = LocalAdmin.connect(settings.paths.admin_socket)
    if live is not None:
        with live:
            found = live.request("GET", "/admin/feedback", params=params)["data"]
    else:
        with opened(data_dir) as (settings, store):
            o = offline(settings, store)
            views = FeedbackService(store, o.audit, settings).list(
                model=model, rating=rating, since=_epoch(start), limit=limit
            )
            found = [v.to_dict() for v in views]
    if as_json:
        emit(found)
        return
    if not found:
        click.echo("no feedback")
    for f in found:
        kept = f["kept"]
        texts = " ".join(f"{name}:{kept[name]}" for name in ("prompt", "answer", "correction"))
        mark = "" if f["current"] else " (superseded)"
        promoted = f" -> {f['promoted_to']}" if f["promoted_to"] else ""
        click.echo(f"{f['id']}  {str(f['rating']):4} {f['model'] or '-':24} {f['created_at']}  {texts}{promoted}{mark}")


@feedback.command("export")
@click.option("--format", "fmt", type=click.Choice(["jsonl"]), default="jsonl", show_default=True)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    help="File to write (default: stdout).",
)
@click.option("--model", default=None, help="Only feedback on this model's answers.")
@click.option("--since", default=None, help="A time (ISO 8601) or a duration ago: 24h, 7d.")
@data_dir_option
@handled
def feedback_export(fmt: str, out: Path | None, model: str | None, since: str | None, data_dir: Path | None) -> None:
    """Write prompt, answer and correction triples as JSON lines (a fine-tuning dataset);
    say on stderr how many, and what was missing where a text was not kept."""
    start = _since(since)
    params = {k: v for k, v in {"format": fmt, "model": model, "since": start}.items() if v is not None}
    settings = load_settings(data_dir)
    sink: IO[str] = open(out, "w", encoding="utf-8") if out else sys.stdout
    try:
        if LocalAdmin.connect(settings.paths.admin_socket) is not None:
            summary = _write(_remote_lines(settings.paths.admin_socket, params), sink)
        else:
            with opened(data_dir) as (settings, store), store.snapshot() as conn:
                summary = _write(export_lines(conn, model=model, since=_epoch(start)), sink)
    finally:
        if out:
            sink.close()
    click.echo(_describe(summary), err=True)


def _remote_lines(socket: Path, params: dict[str, Any]) -> Iterator[str]:
    transport = httpx.HTTPTransport(uds=str(socket))
    try:
        with (
            httpx.Client(transport=transport, base_url="http://localhost", timeout=60) as client,
            client.stream("GET", "/admin/feedback/export", params=params) as response,
        ):
            if response.status_code >= 400:
                response.read()
                raise InvalidRequest(response.json().get("error", {}).get("message", f"HTTP {response.status_code}"))
            yield from response.iter_lines()
    except httpx.HTTPError as exc:
        raise ServiceUnavailable(f"the running server did not answer on {socket}: {exc}") from None


def _write(lines: Iterator[str], sink: IO[str]) -> dict[str, Any]:
    """Copy the triples to `sink`; return the closing summary line's content."""
    summary: dict[str, Any] = {}
    for line in lines:
        if not line.strip():
            continue
        if line.startswith('{"summary":'):
            summary = json.loads(line)["summary"]
            continue
        sink.write(line.rstrip("\n") + "\n")
    return summary


def _describe(summary: dict[str, Any]) -> str:
    lines, complete = summary.get("lines", 0), summary.get("complete", 0)
    text = f"exported {lines} rated response{'s' if lines != 1 else ''}, {complete} with prompt, answer and correction"
    missing = summary.get("missing") or {}
    if missing:
        parts = []
        for name, why in missing.items():
            reasons = ", ".join(f"{state} {n}" for state, n in sorted(why.items()))
            parts.append(f"{name} {sum(why.values())} ({reasons})")
        text += "; missing: " + "; ".join(parts)
        text += ". Kept text needs a key's or team's retention redacted or full (appliance keys update --prompt-retention/--answer-retention)."
    return text


@click.command("promote")
@click.argument("feedback_id")
@click.option("--set", "set_name", required=True, help="Golden set to add the case to (<data>/golden/NAME.yaml).")
@click.option("--case-id", default=None, help="The case's id (default: the feedback's).")
@data_dir_option
@json_option
@handled
def promote(feedback_id: str, set_name: str, case_id: str | None, data_dir: Path | None, as_json: bool) -> None:
    """Turn a feedback correction into a golden-set case (refused when its prompt was not kept)."""
    done = apply_change(
        data_dir,
        remote=(
            "POST",
            f"/admin/feedback/{quote(feedback_id, safe='')}/promote",
            {"set": set_name, "case_id": case_id},
        ),
        local=lambda o: FeedbackService(o.store, o.audit, o.settings).promote(
            feedback_id, set_name, case_id, actor=cli_actor()
        ),
    )
    if as_json:
        emit(done)
    else:
        click.echo(f"added case {done['case_id']} to golden set {done['set']} ({done['path']})")
