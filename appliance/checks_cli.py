"""`appliance checks list|run|history` and `appliance alerts list|channels|test`: through
the running server's admin socket; the history and alerts are read from the database when the
server does not run."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import click

from appliance.admin_client import LocalAdmin
from appliance.checks.alerts import list_alerts
from appliance.checks.history import CheckHistory
from appliance.cli_support import data_dir_option, emit, handled, json_option, opened
from appliance.config import Settings, load_settings
from appliance.errors import ServiceUnavailable

__all__ = ["alerts", "checks"]

RUN_TIMEOUT_SECONDS = 900.0  # a golden set on a slow model takes minutes


def _live(settings: Settings, *, timeout: float | None = None) -> LocalAdmin | None:
    probe = LocalAdmin.connect(settings.paths.admin_socket)
    if probe is None or timeout is None:
        return probe
    probe.close()
    return LocalAdmin(settings.paths.admin_socket, timeout=timeout)


def _running_server(settings: Settings) -> LocalAdmin:
    live = _live(settings)
    if live is None:
        raise ServiceUnavailable("the server is not running: channels are registered inside it")
    return live


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


@click.group()
def checks() -> None:
    """Scheduled health and drift checks: list them, run one now, read their history."""


@checks.command("list")
@data_dir_option
@json_option
@handled
def list_checks(data_dir: Path | None, as_json: bool) -> None:
    """Every check with its schedule and last result."""
    settings = load_settings(data_dir)
    live = _live(settings)
    if live is None:
        with opened(data_dir) as (settings, store):
            latest = CheckHistory(store, keep_days=settings.checks.history_days, keep_runs=settings.checks.history_runs).latest()
        result: dict[str, Any] = {
            "object": "list", "server": "not running",
            "data": [{"name": n, "last": r.to_dict()} for n, r in sorted(latest.items())],
        }
    else:
        with live:
            result = live.request("GET", "/admin/checks")
    if as_json:
        emit(result)
        return
    if result.get("server") == "not running":
        click.echo("the server is not running; last results from the database:")
    for c in result["data"]:
        last = c.get("last") or {}
        schedule = c.get("cron") or (f"every {c['interval_seconds']:g}s" if c.get("interval_seconds") else "")
        state = "off" if c.get("enabled") is False else ("running" if c.get("running") else "")
        click.echo(
            f"{c['name']:14} {last.get('status', '-'):6} {_when(last.get('started_at')):19}  {schedule:14} {state:8}"
            f" {last.get('summary', '')}"
        )
        if c.get("error"):
            click.echo(f"    not scheduled: {c['error']}")


@checks.command("run")
@click.argument("name")
@data_dir_option
@json_option
@handled
def run_check(name: str, data_dir: Path | None, as_json: bool) -> None:
    """Run check NAME now in the running server; exits 1 when it does not pass."""
    settings = load_settings(data_dir)
    live = _live(settings, timeout=RUN_TIMEOUT_SECONDS)
    if live is None:
        raise ServiceUnavailable("the server is not running: checks run inside it (appliance serve)")
    with live:
        run = live.request("POST", f"/admin/checks/{name}/run")
    if as_json:
        emit(run)
    else:
        click.echo(f"{run['check']}: {run['status']} in {run['duration_ms']:.0f} ms: {run['summary']}")
        for f in run["findings"]:
            click.echo(f"  {f['status']:5} {f['subject'] or '-':24} {f['summary']}")
    if run["status"] not in ("ok", "warn"):
        raise SystemExit(1)


@checks.command("history")
@click.argument("name", required=False)
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@data_dir_option
@json_option
@handled
def history(name: str | None, limit: int, data_dir: Path | None, as_json: bool) -> None:
    """Stored runs, newest first: of check NAME, or of every check."""
    settings = load_settings(data_dir)
    live = _live(settings)
    if live is None:
        with opened(data_dir) as (settings, store):
            runs = CheckHistory(store, keep_days=settings.checks.history_days, keep_runs=settings.checks.history_runs)
            data = [r.to_dict() for r in runs.runs(name, limit=limit)]
    else:
        with live:
            params: dict[str, Any] = {"limit": limit} | ({"check": name} if name else {})
            data = live.request("GET", "/admin/checks/history", params=params)["data"]
    if as_json:
        emit({"object": "list", "data": data})
        return
    for r in data:
        click.echo(
            f"{_when(r['started_at']):19} {r['check']:14} {r['status']:6} {r['duration_ms']:>8.0f} ms"
            f" {r['trigger']:8} {r['summary']}"
        )


@click.group()
def alerts() -> None:
    """Alerts raised by checks, and the channels they go to."""


@alerts.command("list")
@click.option("--state", type=click.Choice(["open", "resolved"]), default=None)
@click.option("--check", default=None, help="Only this check's alerts.")
@data_dir_option
@json_option
@handled
def list_alerts_command(state: str | None, check: str | None, data_dir: Path | None, as_json: bool) -> None:
    """Alerts, newest first."""
    settings = load_settings(data_dir)
    live = _live(settings)
    if live is None:
        with opened(data_dir) as (settings, store):
            data = list_alerts(store, state=state, check=check)
    else:
        with live:
            params = {k: v for k, v in (("state", state), ("check", check)) if v}
            data = live.request("GET", "/admin/alerts", params=params)["data"]
    if as_json:
        emit({"object": "list", "data": data})
        return
    for a in data:
        click.echo(
            f"#{a['id']:<5} {a['state']:8} {a['severity']:4} {_when(a['opened_at']):19} {a['rule']}/{a['check']}"
            f"{'/' + a['subject'] if a['subject'] else ''}: {a['summary']} (sent {a['sends']}x)"
        )


@alerts.command("channels")
@data_dir_option
@json_option
@handled
def channels(data_dir: Path | None, as_json: bool) -> None:
    """The channels of the running server, with their delivery record."""
    with _running_server(load_settings(data_dir)) as live:
        data = live.request("GET", "/admin/alerts/channels")["data"]
    if as_json:
        emit({"object": "list", "data": data})
        return
    for c in data:
        health = "FAILING" if c["failing"] else "ok"
        click.echo(f"{c['name']:16} {c['kind']:8} {health:8} sent {c['delivered']}/{c['attempts']}  {c.get('target', '')}")
        if c["last_error"]:
            click.echo(f"    last error: {c['last_error']}")


@alerts.command("test")
@click.argument("name")
@data_dir_option
@json_option
@handled
def test(name: str, data_dir: Path | None, as_json: bool) -> None:
    """Send a test alert on channel NAME; exits 1 when it is not delivered."""
    with _running_server(load_settings(data_dir)) as live:
        result = live.request("POST", f"/admin/alerts/channels/{name}/test")
    if as_json:
        emit(result)
    else:
        click.echo(f"{name}: {'delivered' if result['delivered'] else 'NOT delivered: ' + str(result['error'])}")
    if not result["delivered"]:
        raise SystemExit(1)
