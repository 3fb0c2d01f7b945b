"""`appliance models add|list|remove`: the registry of GGUF models, on the database; and
`appliance models load|unload|pin|unpin`: the running server's model pool, through its
local admin socket (pins are kept in the database, so those two work without a server)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import click

from appliance.admin_client import LocalAdmin
from appliance.audit.log import cli_actor
from appliance.cli_support import Offline, apply_change, data_dir_option, emit, handled, json_option, offline, opened
from appliance.config import Settings, load_settings
from appliance.errors import ServiceUnavailable
from appliance.model_pins import Pins, default_model
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
    """Register, list and remove GGUF models; load, unload, pin and unpin them on the server."""


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
    (from the running server when there is one, else what `serve` would pick); with a server
    running, whether each is loaded and pinned."""
    with opened(data_dir) as (settings, store):
        records = offline(settings, store).models.list()
    live = _live_status(settings)
    served = {r.name: weights_summary(settings, r) for r in records}
    kernels = {r.name: cpu_kernels(settings) for r in records}
    layouts: dict[str, dict[str, float]] = {}
    pool = {entry["name"]: entry for entry in live or []}
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
                | ({k: pool[r.name].get(k) for k in ("loaded", "pinned", "memory_bytes")} if r.name in pool else {})
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
            + (f"  [{_pool_state(pool[r.name])}]" if r.name in pool else "")
        )


def _pool_state(entry: dict[str, Any]) -> str:
    state = "loaded" if entry.get("loaded") else "not loaded"
    return state + (", pinned" if entry.get("pinned") else "")


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


# -- the running server's pool ----------------------------------------------------------------
LOAD_TIMEOUT_SECONDS = 900.0  # hashing and loading a large model file takes a while


@models.command("load")
@click.argument("name")
@data_dir_option
@json_option
@handled
def models_load(name: str, data_dir: Path | None, as_json: bool) -> None:
    """Load a model on the running server now, evicting idle unpinned models if it needs room."""
    _report(_on_server(data_dir, name, "load"), as_json)


@models.command("unload")
@click.argument("name")
@data_dir_option
@json_option
@handled
def models_unload(name: str, data_dir: Path | None, as_json: bool) -> None:
    """Unload a model from the running server (refused while pinned or serving requests)."""
    _report(_on_server(data_dir, name, "unload"), as_json)


@models.command("pin")
@click.argument("name")
@data_dir_option
@json_option
@handled
def models_pin(name: str, data_dir: Path | None, as_json: bool) -> None:
    """Never unload a model for idleness nor evict it (kept across restarts)."""
    _report(_pin(data_dir, name, True), as_json)


@models.command("unpin")
@click.argument("name")
@data_dir_option
@json_option
@handled
def models_unpin(name: str, data_dir: Path | None, as_json: bool) -> None:
    """Let a model be unloaded when idle and evicted to make room."""
    _report(_pin(data_dir, name, False), as_json)


def _on_server(data_dir: Path | None, name: str, action: str) -> dict[str, Any]:
    path = load_settings(data_dir).paths.admin_socket
    probe = LocalAdmin.connect(path)
    if probe is None:
        raise ServiceUnavailable(f"no server is running on {path}: models {action} acts on a running server (appliance serve)")
    probe.close()
    with LocalAdmin(path, timeout=LOAD_TIMEOUT_SECONDS) as live:
        result: dict[str, Any] = live.request("POST", f"/admin/models/{quote(name, safe='')}/{action}")
        return result


def _pin(data_dir: Path | None, name: str, pinned: bool) -> dict[str, Any]:
    action = "pin" if pinned else "unpin"

    def on_database(o: Offline) -> dict[str, Any]:
        o.models.get(name)  # NotFound for an unknown name
        Pins(o.store, o.audit).set(name, pinned, default=default_model(o.models), actor=cli_actor())
        message = f"{name} is {'pinned' if pinned else 'not pinned'} (no server is running: it applies when one starts)"
        return {"name": name, "action": action, "loaded": False, "pinned": pinned, "memory_bytes": None, "evicted": [],
                "message": message}

    result: dict[str, Any] = apply_change(
        data_dir, remote=("POST", f"/admin/models/{quote(name, safe='')}/{action}", None), local=on_database
    )
    return result


def _report(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        emit(result)
    else:
        click.echo(result["message"])
