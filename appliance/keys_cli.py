"""`appliance keys create|list|update|rotate|revoke`. Changes go through the running server
when it runs (see `cli_support.apply_change`)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from appliance.audit.log import cli_actor
from appliance.auth.keys import UNSET, parse_expiry
from appliance.cli_support import apply_change, data_dir_option, emit, handled, json_option, offline, opened
from appliance.errors import InvalidRequest

__all__ = ["keys", "parse_duration"]

_POLICIES = ["none", "sha256", "redacted", "full", "default"]
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """`90`, `90s`, `15m`, `24h`, `7d`, `2w` -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise InvalidRequest(f"{text!r} is not a duration: use for example 30m, 24h or 7d", param="overlap")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


@click.group()
def keys() -> None:
    """Create, list, change, rotate and revoke API keys."""


@keys.command("create")
@click.option("--name", required=True, help="Who or what the key is for.")
@click.option("--role", default="user", show_default=True, help="admin, operator, auditor or user.")
@click.option("--expires", default=None, help="Expiry date or time (ISO 8601, UTC when no zone).")
@click.option("--model", "models_", multiple=True, help="Limit the key to this model (repeatable).")
@click.option("--team", default="default", show_default=True, help="Team the key belongs to.")
@click.option("--rpm", type=int, default=None, help="Requests per minute (default: unlimited).")
@click.option("--tpm", type=int, default=None, help="Tokens per minute (default: unlimited).")
@click.option(
    "--prompt-retention",
    type=click.Choice(["none", "sha256", "redacted", "full"]),
    default=None,
    help="How prompts are kept in the audit log (default: the team's, else sha256).",
)
@click.option(
    "--answer-retention",
    type=click.Choice(["none", "sha256", "redacted", "full"]),
    default=None,
    help="How answers are kept in the audit log (default: the team's, else none).",
)
@data_dir_option
@json_option
@handled
def keys_create(
    name: str,
    role: str,
    expires: str | None,
    models_: tuple[str, ...],
    team: str,
    rpm: int | None,
    tpm: int | None,
    prompt_retention: str | None,
    answer_retention: str | None,
    data_dir: Path | None,
    as_json: bool,
) -> None:
    """Create a key and print its secret once."""
    expires_at = parse_expiry(expires) if expires else None
    body = {
        "name": name,
        "role": role,
        "expires_at": _iso(expires_at) if expires_at else None,
        "models": list(models_) or None,
        "team": team,
        "rpm": rpm,
        "tpm": tpm,
        "prompt_retention": prompt_retention,
        "answer_retention": answer_retention,
    }

    def local(o: Any) -> dict[str, Any]:
        new = o.keys.create(
            name,
            role,
            actor=cli_actor(),
            expires_at=expires_at,
            models=list(models_) or None,
            team=team,
            rpm=rpm,
            tpm=tpm,
            prompt_retention=prompt_retention,
            answer_retention=answer_retention,
        )
        return new.record.to_dict() | {"key": new.secret}

    created = apply_change(data_dir, remote=("POST", "/admin/keys", body), local=local)
    if as_json:
        emit(created)
        return
    click.echo(f"created key {created['id']} ({created['role']}) for {created['name']}")
    click.echo("The secret is shown once and cannot be recovered; store it now:")
    click.echo(f"  {created['key']}")


@keys.command("list")
@click.option("--expiring", is_flag=True, help="Only active keys that expire within [auth] expiry_warning_days.")
@data_dir_option
@json_option
@handled
def keys_list(expiring: bool, data_dir: Path | None, as_json: bool) -> None:
    """List keys (never their secrets)."""
    with opened(data_dir) as (settings, store):
        records = offline(settings, store).keys.list(expiring_only=expiring)
    if as_json:
        emit([r.to_dict() for r in records])
        return
    for r in records:
        d = r.to_dict()
        status = "expiring" if r.expiring else r.status
        click.echo(f"{r.id}  {r.role.value:8} {status:8} {r.name:24} expires {d['expires_at'] or 'never'}")


def _none_or(value: str) -> str | None:
    return None if value.lower() in ("none", "never", "unlimited", "") else value


@keys.command("update")
@click.argument("key_id")
@click.option("--rpm", default=None, help="Requests per minute, or 'none' for unlimited.")
@click.option("--tpm", default=None, help="Tokens per minute, or 'none' for unlimited.")
@click.option("--model", "models_", multiple=True, help="Allow only these models (repeatable); --model all for every model.")
@click.option("--expires", default=None, help="New expiry (ISO 8601), or 'never'.")
@click.option("--team", default=None, help="Move the key to this team.")
@click.option("--prompt-retention", type=click.Choice(_POLICIES), default=None, help="'default': the team's policy.")
@click.option("--answer-retention", type=click.Choice(_POLICIES), default=None, help="'default': the team's policy.")
@data_dir_option
@json_option
@handled
def keys_update(
    key_id: str,
    rpm: str | None,
    tpm: str | None,
    models_: tuple[str, ...],
    expires: str | None,
    team: str | None,
    prompt_retention: str | None,
    answer_retention: str | None,
    data_dir: Path | None,
    as_json: bool,
) -> None:
    """Change a key's limits, models, expiry, team or retention; what is not given stays."""
    fields: dict[str, Any] = {}
    for name, value in (("rpm", rpm), ("tpm", tpm)):
        if value is not None:
            text = _none_or(value)
            try:
                fields[name] = int(text) if text is not None else None
            except ValueError:
                raise InvalidRequest(f"--{name} must be a whole number or 'none'", param=name) from None
    if models_:
        fields["models"] = None if list(models_) == ["all"] else list(models_)
    if expires is not None:
        when = _none_or(expires)
        fields["expires_at"] = parse_expiry(when) if when else None
    if team is not None:
        fields["team"] = team
    for name, policy in (("prompt_retention", prompt_retention), ("answer_retention", answer_retention)):
        if policy is not None:
            fields[name] = None if policy == "default" else policy
    if not fields:
        raise InvalidRequest(
            "nothing to update: give at least one of --rpm, --tpm, --model, --expires, --team, --prompt-retention,"
            " --answer-retention"
        )
    body = {k: (_iso(v) if k == "expires_at" and v is not None else v) for k, v in fields.items()}

    def local(o: Any) -> dict[str, Any]:
        names = ("rpm", "tpm", "models", "expires_at", "team", "prompt_retention", "answer_retention")
        given = {k: fields.get(k, UNSET) for k in names}
        return o.keys.update(key_id, actor=cli_actor(), **given).to_dict()

    record = apply_change(data_dir, remote=("PATCH", f"/admin/keys/{key_id}", body), local=local)
    if as_json:
        emit(record)
    else:
        click.echo(f"updated {record['id']} ({record['name']}): rpm {record['rpm']}, tpm {record['tpm']}, "
                   f"models {record['models'] or 'all'}, expires {record['expires_at'] or 'never'}, team {record['team']}, "
                   f"retention prompt {record['prompt_retention'] or 'team'} answer {record['answer_retention'] or 'team'}")


@keys.command("rotate")
@click.argument("key_id")
@click.option("--overlap", default="0", show_default=True, help="How long the old secret keeps working: 30m, 24h, 7d...")
@data_dir_option
@json_option
@handled
def keys_rotate(key_id: str, overlap: str, data_dir: Path | None, as_json: bool) -> None:
    """Give a key a new secret (printed once); the old one works for the overlap, then stops."""
    seconds = parse_duration(overlap)

    def local(o: Any) -> dict[str, Any]:
        new = o.keys.rotate(key_id, actor=cli_actor(), overlap_seconds=seconds)
        return new.record.to_dict() | {"key": new.secret}

    created = apply_change(data_dir, remote=("POST", f"/admin/keys/{key_id}/rotate", {"overlap_seconds": seconds}), local=local)
    if as_json:
        emit(created)
        return
    until = created["previous_secret_valid_until"]
    click.echo(f"rotated {created['id']} ({created['name']}); the old secret {'works until ' + until if until else 'stopped'}")
    click.echo("The new secret is shown once and cannot be recovered; store it now:")
    click.echo(f"  {created['key']}")


@keys.command("revoke")
@click.argument("key_id")
@data_dir_option
@handled
def keys_revoke(key_id: str, data_dir: Path | None) -> None:
    """Revoke a key at once."""
    record = apply_change(
        data_dir,
        remote=("DELETE", f"/admin/keys/{key_id}", None),
        local=lambda o: o.keys.revoke(key_id, actor=cli_actor()).to_dict(),
    )
    click.echo(f"revoked {record['id']} ({record['name']})")
