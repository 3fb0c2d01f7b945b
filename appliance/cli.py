"""The `appliance` command line. Output is for people, or JSON with `--json`; errors are one
clear line on stderr and a non-zero exit status."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from appliance.audit.cli import audit
from appliance.auth import KeyService, load_or_create_server_secret
from appliance.auth.keys import parse_expiry
from appliance.cli_support import audit_admin, data_dir_option, emit, handled, json_option, opened
from appliance.config import Settings, load_settings
from appliance.logs import configure_logging
from appliance.metering.cli import budgets, teams, usage
from appliance.model_registry import ModelRegistry, RegisteredModel
from appliance.store import Store
from runtime.cpu import CpuVariantError, choose_variant, detect, shipped_variants
from runtime.model_file import sha256_file
from runtime.weights import is_built, planned_encoding

DEFAULT_CONFIG = """\
# Appliance configuration. Environment variables APPLIANCE_<SECTION>_<KEY> override these
# values (for example APPLIANCE_SERVER_PORT=9000), and CLI flags override both.

[server]
host = "127.0.0.1"   # keep on loopback unless a proxy or firewall fronts it
port = 8080
# max_body_bytes = 4194304

[runtime]
# n_threads = 2        # default: every core
# slots = 8            # concurrent sequences per model
# ctx_per_slot = 1024  # context window of each sequence (KV memory grows with slots x this)
# weights = "auto"     # on CPUs, serve Q4_1/Q5_1 models re-encoded for batched kernels; "q8_0" for llama.cpp's Q8_0 only; "original" to keep the file
# draft_tokens = 3     # guessed tokens a decode step may carry per sequence, kept only if sampled anyway; 0 = off

# [[models]]
# name = "smollm2-135m-instruct"
# slots = 8
# n_gpu_layers = -1    # override the automatic GPU placement
"""


def _prepare_weights(settings: Settings, record: RegisteredModel) -> dict[str, Any] | None:
    """Build the model's CPU re-encoding now rather than at the first `serve` (see runtime/weights.py)."""
    from appliance.engine_pool import prepare_weights  # deferred: loads llama.cpp

    weights = prepare_weights(settings, record)
    if weights is not None and weights.note:
        click.echo(f"warning: {record.name} will be served as it is: {weights.note}", err=True)
    return weights.to_dict() if weights is not None else None


def _keys(settings: Settings, store: Store) -> KeyService:
    return KeyService(store, load_or_create_server_secret(settings.paths.server_secret))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """The appliance: a governed, private, OpenAI-compatible AI service on one box."""


@main.command()
@data_dir_option
@click.option(
    "--model",
    "model_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Register this GGUF model if it is not yet registered.",
)
@click.option("--model-name", default=None, help="Name for --model (default: from the file name).")
@json_option
@handled
def init(data_dir: Path | None, model_path: Path | None, model_name: str | None, as_json: bool) -> None:
    """Create the data directory and database; print the first admin key once.

    Safe to run again: it never creates a second admin key or overwrites data.
    """
    with opened(data_dir) as (settings, store):
        paths = settings.paths
        if not paths.config.exists():
            paths.config.write_text(DEFAULT_CONFIG, encoding="utf-8")
        keys = _keys(settings, store)
        result: dict[str, Any] = {"data_dir": str(paths.root), "admin_key": None, "model": None}
        if keys.count() == 0:
            new = keys.create("admin", "admin")
            audit_admin(settings, store, "keys.create", new.record.id, after=new.record.to_dict())
            result["admin_key"] = new.secret
            result["admin_key_id"] = new.record.id
        if model_path is not None:
            registry = ModelRegistry(store, paths.models)
            existing = registry.find_by_sha256(sha256_file(model_path)) if model_path.exists() else None
            if existing is None:
                existing = registry.add(model_path, model_name)
                audit_admin(settings, store, "models.add", existing.name, after=existing.to_dict())
            result["model"] = existing.name
            result["weights"] = _prepare_weights(settings, existing)
    if as_json:
        emit(result)
        return
    click.echo(f"data directory: {result['data_dir']}")
    if result["model"]:
        click.echo(f"default model: {result['model']}")
    if result["admin_key"]:
        click.echo("")
        click.echo("First admin key. It is shown once and cannot be recovered; store it now:")
        click.echo(f"  {result['admin_key']}")
    else:
        click.echo("already initialised: the admin key was shown when the data directory was created")


@main.command()
@data_dir_option
@click.option("--host", default=None, help="Address to bind (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port to listen on (default 8080).")
@handled
def serve(data_dir: Path | None, host: str | None, port: int | None) -> None:
    """Run the API server in the foreground (SIGTERM or Ctrl-C stops it cleanly)."""
    settings = load_settings(data_dir, overrides={"server": {"host": host, "port": port}})
    configure_logging(settings.server.log_level)
    from appliance.server import serve as run_server  # deferred: loads uvicorn and llama.cpp

    run_server(settings)


# -- models ---------------------------------------------------------------------------------
@main.group()
def models() -> None:
    """Register, list and remove GGUF models."""


@models.command("add")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", default=None, help="Public model name (default: from the file name).")
@data_dir_option
@json_option
@handled
def models_add(path: Path, name: str | None, data_dir: Path | None, as_json: bool) -> None:
    """Validate a GGUF file, copy it into the data directory and register it."""
    with opened(data_dir) as (settings, store):
        record = ModelRegistry(store, settings.paths.models).add(path, name)
        audit_admin(settings, store, "models.add", record.name, after=record.to_dict())
        weights = _prepare_weights(settings, record)
    if as_json:
        emit({**record.to_dict(), "weights": weights})
    else:
        click.echo(
            f"registered {record.name}: {record.architecture}, {record.parameter_count:,} parameters, "
            f"{record.quantization}, context {record.context_length}, sha256 {record.sha256[:16]}…"
        )
        if weights and weights["encoding"] != "original":
            click.echo(
                f"served on this CPU as {weights['encoding']} (re-encoded once, sha256 {weights['sha256'][:16]}…)"
            )


@models.command("list")
@data_dir_option
@json_option
@handled
def models_list(data_dir: Path | None, as_json: bool) -> None:
    """List registered models."""
    with opened(data_dir) as (settings, store):
        records = ModelRegistry(store, settings.paths.models).list()
    served = {r.name: weights_summary(settings, r) for r in records}
    if as_json:
        emit([{**r.to_dict(), "cpu_weights": served[r.name], "cpu_kernels": cpu_kernels(settings)} for r in records])
        return
    click.echo(f"CPU kernels: {cpu_kernels(settings)}")
    if not records:
        click.echo("no models registered; add one with: appliance models add PATH")
    for r in records:
        params = f"{r.parameter_count / 1e6:.0f}M" if r.parameter_count else "?"
        chat = "chat" if r.has_chat_template else "completion"
        click.echo(
            f"{r.name:32} {r.architecture or '?':10} {params:>6} {r.quantization or '?':8} "
            f"ctx {r.context_length or '?':>6}  {chat:10}  on CPU: {served[r.name]}"
        )


def cpu_kernels(settings: Settings) -> str:
    """The llama.cpp CPU variant `serve` loads on this machine, or why none would load."""
    try:
        return choose_variant(detect(), shipped_variants(), settings.runtime.cpu_variant).variant
    except CpuVariantError as exc:
        return f"none ({exc})"


def weights_summary(settings: Settings, model: RegisteredModel) -> str:
    """What `serve` runs this model as on a CPU, for `models list`: "file", or the encoding
    and whether it is built yet. (On a GPU the file is served; `serve` decides per placement.)"""
    mode = settings.weights_mode(model.name)
    encoding = planned_encoding(model.quantization, model.architecture, mode=mode, on_gpu=False)
    if encoding is None:
        return "file"
    built = is_built(model.sha256, settings.paths.encoded_models, encoding)
    return encoding if built else f"{encoding} (built at first serve)"


@models.command("remove")
@click.argument("name")
@data_dir_option
@handled
def models_remove(name: str, data_dir: Path | None) -> None:
    """Unregister a model and delete its copy in the data directory."""
    with opened(data_dir) as (settings, store):
        removed = ModelRegistry(store, settings.paths.models).remove(name)
        audit_admin(settings, store, "models.remove", name, before=removed.to_dict())
    click.echo(f"removed {name}")


# -- keys -----------------------------------------------------------------------------------
@main.group()
def keys() -> None:
    """Create, list and revoke API keys."""


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
    data_dir: Path | None,
    as_json: bool,
) -> None:
    """Create a key and print its secret once."""
    expires_at = parse_expiry(expires) if expires else None
    with opened(data_dir) as (settings, store):
        new = _keys(settings, store).create(
            name,
            role,
            expires_at=expires_at,
            models=list(models_) or None,
            team=team,
            rpm=rpm,
            tpm=tpm,
            prompt_retention=prompt_retention,
        )
        audit_admin(settings, store, "keys.create", new.record.id, after=new.record.to_dict())
    if as_json:
        emit(new.record.to_dict() | {"key": new.secret})
        return
    click.echo(f"created key {new.record.id} ({new.record.role}) for {new.record.name}")
    click.echo("The secret is shown once and cannot be recovered; store it now:")
    click.echo(f"  {new.secret}")


@keys.command("list")
@data_dir_option
@json_option
@handled
def keys_list(data_dir: Path | None, as_json: bool) -> None:
    """List keys (never their secrets)."""
    with opened(data_dir) as (settings, store):
        records = _keys(settings, store).list()
    if as_json:
        emit([r.to_dict() for r in records])
        return
    for r in records:
        d = r.to_dict()
        click.echo(f"{r.id}  {r.role.value:8} {r.status:8} {r.name:24} expires {d['expires_at'] or 'never'}")


@keys.command("revoke")
@click.argument("key_id")
@data_dir_option
@handled
def keys_revoke(key_id: str, data_dir: Path | None) -> None:
    """Revoke a key at once."""
    with opened(data_dir) as (settings, store):
        keys = _keys(settings, store)
        before = keys.get(key_id).to_dict()
        record = keys.revoke(key_id)
        audit_admin(settings, store, "keys.revoke", key_id, before=before, after=record.to_dict())
    click.echo(f"revoked {record.id} ({record.name})")


for group in (teams, budgets, usage, audit):
    main.add_command(group)
