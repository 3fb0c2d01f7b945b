"""`appliance models add|list|remove`: the registry of GGUF models, on the database."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from appliance.admin_client import LocalAdmin
from appliance.audit.log import cli_actor
from appliance.cli_support import data_dir_option, emit, handled, json_option, offline, opened
from appliance.config import Settings
from appliance.model_registry import RegisteredModel
from runtime.cpu import CpuVariantError, choose_variant, detect, shipped_variants
from runtime.encodings import is_built, planned_encoding

__all__ = ["models", "prepare_weights_now"]


def prepare_weights_now(settings: Settings, record: RegisteredModel) -> dict[str, Any] | None:
    """Build the model's CPU re-encoding now rather than at the first `serve` (see runtime/weights.py)."""
    from appliance.engine_pool import prepare_weights  # deferred: loads llama.cpp, which other verbs never need

    weights = prepare_weights(settings, record)
    if weights is not None and weights.note:
        click.echo(f"warning: {record.name} will be served as it is: {weights.note}", err=True)
    return weights.to_dict() if weights is not None else None


# -- models ---------------------------------------------------------------------------------
@click.group()
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
        record = offline(settings, store).models.add(path, name, actor=cli_actor())
        weights = prepare_weights_now(settings, record)
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
    """List registered models: what each runs as, and on which CPU kernels and weight layouts
    (from the running server when there is one, else what `serve` would pick)."""
    with opened(data_dir) as (settings, store):
        records = offline(settings, store).models.list()
    live = _live_status(settings)
    served = {r.name: weights_summary(settings, r) for r in records}
    kernels = {r.name: cpu_kernels(settings) for r in records}
    layouts: dict[str, dict[str, float]] = {}
    for entry in live or []:
        extra = (entry.get("stats") or {}).get("extra") or {}
        if extra.get("weights"):
            served[entry["name"]] = extra["weights"]["encoding"]
            kernels[entry["name"]] = extra.get("cpu_variant", kernels.get(entry["name"], "?"))
            layouts[entry["name"]] = extra.get("buffer_types") or {}
    if as_json:
        emit(
            [
                {**r.to_dict(), "cpu_weights": served[r.name], "cpu_kernels": kernels[r.name], "buffer_types": layouts.get(r.name)}
                for r in records
            ]
        )
        return
    click.echo(f"CPU kernels: {cpu_kernels(settings)}" + ("" if live is None else " (the running server's)"))
    if not records:
        click.echo("no models registered; add one with: appliance models add PATH")
    for r in records:
        params = f"{r.parameter_count / 1e6:.0f}M" if r.parameter_count else "?"
        chat = "chat" if r.has_chat_template else "completion"
        buffers = ", ".join(f"{name} {mib:.0f} MiB" for name, mib in layouts.get(r.name, {}).items())
        click.echo(
            f"{r.name:32} {r.architecture or '?':10} {params:>6} {r.quantization or '?':8} "
            f"ctx {r.context_length or '?':>6}  {chat:10}  on CPU: {served[r.name]}"
            + (f" ({kernels[r.name]}: {buffers})" if buffers else "")
        )


def _live_status(settings: Settings) -> list[dict[str, Any]] | None:
    """The running server's view of its models, or None when it is not running."""
    live = LocalAdmin.connect(settings.paths.admin_socket)
    if live is None:
        return None
    with live:
        data: list[dict[str, Any]] = live.request("GET", "/admin/models")["data"]
        return data


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
        offline(settings, store).models.remove(name, actor=cli_actor())
    click.echo(f"removed {name}")
