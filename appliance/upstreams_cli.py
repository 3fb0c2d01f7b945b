"""CLI group `upstreams`: list, set and delete remote OpenAI-compatible upstreams;
`appliance.cli` adds it to the main group.

An API key is read from a file or an environment variable, never from an argument, which
`ps` and the shell history would show.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import click

from appliance.audit.log import cli_actor
from appliance.cli_support import Offline, apply_change, data_dir_option, emit, handled, json_option, opened
from appliance.routing.secrets import SecretBox
from appliance.routing.upstream_registry import KEEP, UpstreamRegistry

__all__ = ["upstreams"]


def _registry(o: Offline) -> UpstreamRegistry:
    return UpstreamRegistry(o.store, o.audit, SecretBox(o.settings.paths.upstream_secret_key))


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@click.group()
def upstreams() -> None:
    """Remote OpenAI-compatible servers (vLLM, llama-server, another appliance) routes can use."""


@upstreams.command("list")
@data_dir_option
@json_option
@handled
def upstreams_list(data_dir: Path | None, as_json: bool) -> None:
    """List upstreams (keys are never shown, only whether one is set)."""
    with opened(data_dir) as (_, store):
        found = [u.to_dict() for u in UpstreamRegistry(store).list()]
    if as_json:
        emit(found)
        return
    if not found:
        click.echo("no upstreams; add one with: appliance upstreams set NAME --base-url URL --model MODEL")
    for u in found:
        key = "key set" if u["api_key"] else "no key"
        click.echo(f"{u['name']:20} {u['base_url']:40} {key:8} models {', '.join(u['models'])}")


@upstreams.command("set")
@click.argument("name")
@click.option("--base-url", required=True, help="The upstream's OpenAI base URL, e.g. http://10.0.0.5:8000/v1.")
@click.option("--model", "models", multiple=True, required=True, help="A model it serves (repeat for more).")
@click.option("--api-key-file", type=click.File("r"), default=None, help="Read the upstream's API key from this file ('-': stdin).")
@click.option("--api-key-env", metavar="VAR", default=None, help="Read the upstream's API key from this environment variable.")
@click.option("--no-api-key", is_flag=True, help="Remove the stored key (by default a stored key is kept).")
@click.option("--prompt-price", type=float, default=0.0, show_default=True, help="Price per 1,000 prompt tokens.")
@click.option("--completion-price", type=float, default=0.0, show_default=True, help="Price per 1,000 completion tokens.")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds to the first token, retries included.")
@click.option("--retries", type=int, default=2, show_default=True, help="Retries on connection errors, 5xx and 429 (0-5).")
@data_dir_option
@json_option
@handled
def upstreams_set(
    name: str,
    base_url: str,
    models: tuple[str, ...],
    api_key_file: IO[str] | None,
    api_key_env: str | None,
    no_api_key: bool,
    prompt_price: float,
    completion_price: float,
    timeout: float,
    retries: int,
    data_dir: Path | None,
    as_json: bool,
) -> None:
    """Create upstream NAME, or replace its settings (its key is kept unless given or removed)."""
    if sum((api_key_file is not None, api_key_env is not None, no_api_key)) > 1:
        _fail("give at most one of --api-key-file, --api-key-env and --no-api-key")
    api_key = _read_key(api_key_file, api_key_env, no_api_key)
    settings: dict[str, Any] = {
        "base_url": base_url,
        "models": list(models),
        "prompt_price_per_1k": prompt_price,
        "completion_price_per_1k": completion_price,
        "timeout_seconds": timeout,
        "max_retries": retries,
    }
    body = settings | ({} if api_key is KEEP else {"api_key": api_key})
    upstream = apply_change(
        data_dir,
        remote=("PUT", f"/admin/upstreams/{quote(name, safe='')}", body),
        local=lambda o: _registry(o).set(name, api_key=api_key, actor=cli_actor(), **settings).to_dict(),
    )
    if as_json:
        emit(upstream)
    else:
        key = "key set" if upstream["api_key"] else "no key"
        click.echo(f"upstream {upstream['name']}: {upstream['base_url']} ({key}), models {', '.join(upstream['models'])}")


def _read_key(key_file: IO[str] | None, key_env: str | None, no_key: bool) -> Any:
    """The key to store: KEEP, None (remove) or the key, stripped of surrounding whitespace."""
    if no_key:
        return None
    if key_file is not None:
        key = key_file.read().strip()
        if not key:
            _fail(f"{key_file.name} holds no API key")
        return key
    if key_env is not None:
        key = os.environ.get(key_env, "").strip()
        if not key:
            _fail(f"the environment variable {key_env} is not set or empty")
        return key
    return KEEP


@upstreams.command("delete")
@click.argument("name")
@data_dir_option
@json_option
@handled
def upstreams_delete(name: str, data_dir: Path | None, as_json: bool) -> None:
    """Delete upstream NAME and its stored key."""
    removed = apply_change(
        data_dir,
        remote=("DELETE", f"/admin/upstreams/{quote(name, safe='')}", None),
        local=lambda o: _registry(o).delete(name, actor=cli_actor()).to_dict(),
    )
    if as_json:
        emit(removed)
    else:
        click.echo(f"deleted upstream {removed['name']}")
