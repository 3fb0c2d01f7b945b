"""`appliance plugins list|enable|disable`: the plugins of the running server (over the local
admin socket), or, with no server running, the plugins as they load here and now."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from appliance.admin_client import LocalAdmin
from appliance.cli_support import data_dir_option, emit, handled, json_option
from appliance.config import load_settings
from appliance.errors import ServiceUnavailable
from appliance.hookspecs import HOOKSPEC_VERSION
from appliance.plugin_manager import PluginManager

__all__ = ["plugins"]


@click.group()
def plugins() -> None:
    """List plugins, and turn them on or off in the running server."""


@plugins.command("list")
@data_dir_option
@json_option
@handled
def plugins_list(data_dir: Path | None, as_json: bool) -> None:
    """Each plugin: name, version, source, hooks, state and last error."""
    settings = load_settings(data_dir)
    live = LocalAdmin.connect(settings.paths.admin_socket)
    if live is not None:
        with live:
            result = live.request("GET", "/admin/plugins")
        result["server"] = "running"
    else:
        manager = PluginManager(settings.plugins, only=settings.plugin_filter).load()
        try:
            result = {"object": "list", "hookspec": HOOKSPEC_VERSION, "data": manager.states(), "server": "not running"}
        finally:
            manager.close()
    if as_json:
        emit(result)
        return
    _print(result)


def _print(result: dict[str, Any]) -> None:
    where = "the running server" if result["server"] == "running" else "loaded here (no server is running)"
    click.echo(f"hookspec {result['hookspec']}; plugins of {where}:")
    if not result["data"]:
        click.echo("  none installed")
    for p in result["data"]:
        version = f" {p['version']}" if p["version"] else ""
        click.echo(f"  {p['name']}{version} ({p['source']}): {p['status']}")
        if p["hooks"]:
            click.echo(f"    hooks: {', '.join(p['hooks'])}")
        if p["last_error"]:
            click.echo(f"    last error: {p['last_error']}")


def _switch(data_dir: Path | None, name: str, action: str, as_json: bool) -> None:
    settings = load_settings(data_dir)
    live = LocalAdmin.connect(settings.paths.admin_socket)
    if live is None:
        raise ServiceUnavailable(
            f"the server is not running; to {action} {name} for good, set enabled = "
            f"{'true' if action == 'enable' else 'false'} under [plugins.{name}] in {settings.paths.config}"
        )
    with live:
        result = live.request("POST", f"/admin/plugins/{name}/{action}")
    if as_json:
        emit(result)
    else:
        click.echo(f"{name}: {result['status']} (until the server restarts; [plugins.{name}] enabled is what lasts)")


@plugins.command("enable")
@click.argument("name")
@data_dir_option
@json_option
@handled
def plugins_enable(name: str, data_dir: Path | None, as_json: bool) -> None:
    """Turn a plugin on in the running server, clearing its failure."""
    _switch(data_dir, name, "enable", as_json)


@plugins.command("disable")
@click.argument("name")
@data_dir_option
@json_option
@handled
def plugins_disable(name: str, data_dir: Path | None, as_json: bool) -> None:
    """Stop calling a plugin in the running server."""
    _switch(data_dir, name, "disable", as_json)
