"""`appliance drift run|sets|history|baseline|report`: golden sets and input and output drift,
through the running server's admin socket. `run` needs the server (it generates with its
models); `baseline` and `report` work on the database when none runs, without the prompt
embedding centroid (it needs the local model)."""

from __future__ import annotations

import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click

from appliance.admin_client import LocalAdmin
from appliance.audit.log import cli_actor
from appliance.checks.drift import DriftOptions, baseline_fn, build_baseline, drift_report
from appliance.cli_support import data_dir_option, emit, handled, json_option, offline, opened
from appliance.config import load_settings
from appliance.errors import ServiceUnavailable

__all__ = ["drift"]

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class _When(click.ParamType):
    """A time: a duration ago (`24h`, `7d`, `90m`), an ISO date or date-time (UTC unless it has
    an offset), or seconds since the epoch. Converted to RFC 3339 for the admin API."""

    name = "TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip()
        match = _DURATION.match(text)
        if match:
            when = time.time() - float(match.group(1)) * _UNIT[match.group(2)]
        else:
            try:
                when = float(text)
            except ValueError:
                try:
                    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
                except ValueError:
                    self.fail(
                        f"{value!r} is not a time: use 24h, 7d, YYYY-MM-DD[THH:MM[:SS]] or epoch seconds", param, ctx
                    )
                when = (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
        return datetime.fromtimestamp(when, UTC).isoformat().replace("+00:00", "Z")


WHEN = _When()


@click.group()
def drift() -> None:
    """Golden sets, and input and output drift."""


@drift.command("run")
@click.option(
    "--set", "set_name", required=True, help="The golden set (its file in <data>/golden/, without the suffix)."
)
@click.option(
    "--model", default=None, help="Score this model or route (a release candidate, an arm) against the baselines."
)
@click.option("--rebaseline", is_flag=True, help="This run's answers become the set's baseline.")
@click.option(
    "--min-pass-rate", type=click.FloatRange(0, 1), default=None, help="Also fail the gate below this pass rate."
)
@click.option("--timeout", type=float, default=3600.0, show_default=True, help="Seconds to wait for the run.")
@data_dir_option
@json_option
@handled
def drift_run(
    set_name: str,
    model: str | None,
    rebaseline: bool,
    min_pass_rate: float | None,
    timeout: float,
    data_dir: Path | None,
    as_json: bool,
) -> None:
    """Run a golden set now and score it; exits 1 when it fails its gate."""
    body = {"model": model, "rebaseline": rebaseline}
    run = _live(data_dir, "POST", f"/admin/drift/golden/{quote(set_name, safe='')}/run", body, timeout=timeout)
    gate = run["gate"] == "pass" and (min_pass_rate is None or run["pass_rate"] >= min_pass_rate)
    if as_json:
        emit(run)
    else:
        _print_run(run)
        click.echo(f"gate: {'pass' if gate else 'FAIL'}")
    if not gate:
        sys.exit(1)


@drift.command("sets")
@data_dir_option
@json_option
@handled
def drift_sets(data_dir: Path | None, as_json: bool) -> None:
    """The golden sets and their last runs."""
    out = _live(data_dir, "GET", "/admin/drift/golden")
    if as_json:
        emit(out["data"])
        return
    if not out["data"]:
        click.echo(f"no golden sets in {out['directory']}")
    for s in out["data"]:
        if s["error"]:
            click.echo(f"{s['name']:20} INVALID: {s['error']}")
            continue
        last = s["last_run"]
        state = f"{last['status']:4} pass rate {last['pass_rate']:.0%}" if last else "never run"
        click.echo(f"{s['name']:20} {s['cases']:3} cases on {s['target']}: {state}")


@drift.command("history")
@click.option("--set", "set_name", required=True)
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@data_dir_option
@json_option
@handled
def drift_history(set_name: str, limit: int, data_dir: Path | None, as_json: bool) -> None:
    """A golden set's runs, newest first."""
    out = _live(data_dir, "GET", f"/admin/drift/golden/{quote(set_name, safe='')}/history?limit={limit}")
    if as_json:
        emit(out["data"])
        return
    for r in out["data"]:
        when = datetime.fromtimestamp(r["started_at"], UTC).strftime("%Y-%m-%d %H:%M")
        click.echo(
            f"{when} {r['status']:4} {r['pass_rate']:4.0%} {r['target']} ({r['trigger']}"
            f"{', baseline' if r['baseline'] else ''}) {r['summary']}"
        )


@drift.command("baseline")
@click.option(
    "--since", type=WHEN, default=None, help="Start of the reference window (default: [drift] window_hours ago)."
)
@click.option("--until", type=WHEN, default=None, help="End of the reference window (default: now).")
@data_dir_option
@json_option
@handled
def drift_baseline(since: str | None, until: str | None, data_dir: Path | None, as_json: bool) -> None:
    """Compute the reference distributions from the audit log and store them as the baseline."""
    out = _either(
        data_dir,
        ("POST", "/admin/drift/baseline", {"since": since, "until": until}),
        lambda settings, store: _baseline_offline(settings, store, since, until),
    )
    if as_json:
        emit(out)
    else:
        click.echo(f"drift baseline set from {out['requests']} requests ({out['kept_prompts']} with kept prompts)")


@drift.command("report")
@click.option(
    "--since", type=WHEN, default=None, help="Start of the current window (default: [drift] window_hours ago)."
)
@click.option("--until", type=WHEN, default=None, help="End of the current window (default: now).")
@data_dir_option
@json_option
@handled
def drift_report_command(since: str | None, until: str | None, data_dir: Path | None, as_json: bool) -> None:
    """The current window against the baseline, one line per feature."""
    params = "&".join(f"{k}={quote(v)}" for k, v in (("since", since), ("until", until)) if v)
    out = _either(
        data_dir,
        ("GET", "/admin/drift/report" + (f"?{params}" if params else ""), None),
        lambda settings, store: _report_offline(settings, store, since, until),
    )
    if as_json:
        emit(out)
        return
    click.echo(f"drift: {out['status']} ({out['window']['count']} requests in the window)")
    for f in out["findings"]:
        click.echo(f"  {f['status']:4} {f['subject']:28} {f['summary']}")


def _print_run(run: dict[str, Any]) -> None:
    click.echo(f"golden set {run['set']} on {run['target']}: {run['status']} - {run['summary']}")
    for case in run.get("cases", []):
        mark = "ok  " if case["passed"] else "FAIL"
        bits = [f"{case['latency_ms']:.0f} ms"] if "latency_ms" in case else []
        if case.get("similarity") is not None:
            bits.append(f"similarity {case['similarity']:.3f}")
        click.echo(f"  {mark} {case['id']}" + (f" ({', '.join(bits)})" if bits else ""))
        if case.get("error"):
            click.echo(f"       {case['error']}")
        for check in case["checks"]:
            if not check["passed"]:
                click.echo(f"       {check['assertion']}: {check['detail']}")


def _live(data_dir: Path | None, method: str, path: str, body: Any = None, *, timeout: float = 120.0) -> Any:
    settings = load_settings(data_dir)
    if LocalAdmin.connect(settings.paths.admin_socket) is None:
        raise ServiceUnavailable("the server must run for this (it uses its models): start it with `appliance serve`")
    with LocalAdmin(settings.paths.admin_socket, timeout=timeout) as live:
        return live.request(method, path, json=body)


def _either(data_dir: Path | None, remote: tuple[str, str, Any], local: Any) -> Any:
    settings = load_settings(data_dir)
    if LocalAdmin.connect(settings.paths.admin_socket) is not None:
        with LocalAdmin(settings.paths.admin_socket, timeout=600.0) as live:
            return live.request(remote[0], remote[1], json=remote[2])
    with opened(data_dir) as (settings, store):
        return local(settings, store)


def _epoch(text: str | None) -> float | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() if text else None


def _baseline_offline(settings: Any, store: Any, since: str | None, until: str | None) -> dict[str, Any]:
    options = DriftOptions.from_settings(settings.drift, settings.check.get("drift"))
    end = _epoch(until) or time.time()
    start = _epoch(since) or end - options.window_seconds
    with store.snapshot() as conn:
        summaries = build_baseline(conn, options, start=start, end=end)
    return store.write_sync(
        baseline_fn(offline(settings, store).audit, summaries, start=start, end=end, actor=cli_actor())
    )


def _report_offline(settings: Any, store: Any, since: str | None, until: str | None) -> dict[str, Any]:
    options = DriftOptions.from_settings(settings.drift, settings.check.get("drift"))
    with store.snapshot() as conn:
        return drift_report(conn, options, since=_epoch(since), until=_epoch(until)).to_dict()
