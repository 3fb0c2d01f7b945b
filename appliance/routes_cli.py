"""`appliance routes list|show|set|delete|explain|calibrate`: routes (virtual models), through
the running server's admin socket when it runs, else on the database."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click

from appliance.admin_client import LocalAdmin
from appliance.audit.log import cli_actor
from appliance.cli_support import Offline, apply_change, data_dir_option, emit, handled, json_option, offline, opened
from appliance.config import load_settings
from appliance.errors import InvalidRequest
from appliance.routing.catalog import Catalog
from appliance.routing.router import Need, Router
from appliance.routing.routes import RouteStore

__all__ = ["routes"]

_CANDIDATE_KEYS = {"max_difficulty": float, "max_prompt_tokens": int, "cost": float}
_CANDIDATE_LISTS = ("keys", "teams", "tags", "capabilities")


def upstream_models(store: Any) -> list[str]:
    """Every "<upstream>/<model>" the upstreams table names."""
    names = []
    for row in store.query("SELECT name, models FROM upstreams"):
        names += [f"{row['name']}/{m}" for m in json.loads(row["models"])]
    return names


def offline_routes(o: Offline) -> RouteStore:
    remote = upstream_models(o.store)
    return RouteStore(
        o.store, o.audit, known=lambda n: o.models.find(n) is not None or n in remote, taken=lambda n: o.models.find(n) is not None
    )


def parse_candidate(text: str) -> dict[str, Any]:
    """`gemma-270m,max_difficulty=0.5,tags=legal|hr` -> a candidate spec."""
    name, *options = [part.strip() for part in text.split(",")]
    if not name:
        raise InvalidRequest(f"candidate {text!r} needs a model name first", param="candidate")
    out: dict[str, Any] = {"model": name}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep:
            raise InvalidRequest(f"candidate option {option!r} needs key=value", param="candidate")
        if key in _CANDIDATE_KEYS:
            try:
                out["cost_per_1k_tokens" if key == "cost" else key] = _CANDIDATE_KEYS[key](value)
            except ValueError:
                raise InvalidRequest(f"{key} must be a number, got {value!r}", param="candidate") from None
        elif key in _CANDIDATE_LISTS:
            out[key] = [v for v in value.split("|") if v]
        else:
            raise InvalidRequest(
                f"unknown candidate option {key!r}: use {', '.join([*_CANDIDATE_KEYS, *_CANDIDATE_LISTS])}", param="candidate"
            )
    return out


@click.group()
def routes() -> None:
    """Routes: names clients pass as `model`, sent to ordered candidates with fallback."""


@routes.command("list")
@data_dir_option
@json_option
@handled
def routes_list(data_dir: Path | None, as_json: bool) -> None:
    """Every route, its strategy and candidates (and breaker states, from the running server)."""
    found = _read(data_dir, "/admin/routes", lambda o: [r.to_dict() for r in offline_routes(o).list()])
    data = found["data"] if isinstance(found, dict) else found
    if as_json:
        emit(data)
        return
    if not data:
        click.echo("no routes")
    for r in data:
        names = ", ".join(_candidate_text(c, r.get("breakers", {})) for c in r["candidates"])
        click.echo(f"{r['name']:16} {r['strategy']:9} {names}")


@routes.command("show")
@click.argument("name")
@data_dir_option
@handled
def routes_show(name: str, data_dir: Path | None) -> None:
    """One route, as JSON."""
    emit(_read(data_dir, f"/admin/routes/{quote(name, safe='')}", lambda o: offline_routes(o).get(name).to_dict()))


@routes.command("set")
@click.argument("name")
@click.option("--spec-file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The whole route as JSON (strategy, candidates with conditions, ...).")
@click.option("--strategy", type=click.Choice(["ordered", "cheapest", "auto"]), default=None)
@click.option("--candidate", "candidates", multiple=True,
              help="MODEL[,max_difficulty=X][,max_prompt_tokens=N][,cost=X][,teams=a|b][,keys=..][,tags=..][,capabilities=..]; in order.")
@click.option("--description", default=None)
@click.option("--local-only", is_flag=True, help="Never send this route's requests to a remote upstream.")
@click.option("--timeout", type=float, default=None, help="Seconds a candidate has for its first token before the next is tried.")
@data_dir_option
@json_option
@handled
def routes_set(
    name: str, spec_file: Path | None, strategy: str | None, candidates: tuple[str, ...], description: str | None,
    local_only: bool, timeout: float | None, data_dir: Path | None, as_json: bool,
) -> None:
    """Create or replace a route (audited with its before and after)."""
    spec: dict[str, Any] = {}
    if spec_file is not None:
        try:
            spec = json.loads(spec_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidRequest(f"{spec_file}: not a JSON route: {exc}") from None
        if not isinstance(spec, dict):
            raise InvalidRequest(f"{spec_file}: a route is a JSON object")
    if candidates:
        spec["candidates"] = [parse_candidate(c) for c in candidates]
    for key, value in (("strategy", strategy), ("description", description), ("first_token_timeout_seconds", timeout)):
        if value is not None:
            spec[key] = value
    if local_only:
        spec["local_only"] = True
    if "candidates" not in spec:
        raise InvalidRequest("give --candidate (in order) or --spec-file")
    route = apply_change(
        data_dir,
        remote=("PUT", f"/admin/routes/{quote(name, safe='')}", spec),
        local=lambda o: offline_routes(o).set(name, spec, actor=cli_actor()).to_dict(),
    )
    if as_json:
        emit(route)
    else:
        click.echo(f"route {route['name']}: {route['strategy']} over {', '.join(c['model'] for c in route['candidates'])}")


@routes.command("delete")
@click.argument("name")
@data_dir_option
@handled
def routes_delete(name: str, data_dir: Path | None) -> None:
    """Delete a route (audited)."""
    apply_change(
        data_dir,
        remote=("DELETE", f"/admin/routes/{quote(name, safe='')}", None),
        local=lambda o: offline_routes(o).delete(name, actor=cli_actor()).to_dict(),
    )
    click.echo(f"deleted route {name}")


@routes.command("explain")
@click.option("--model", required=True, help="A route or model name, as a client would pass it.")
@click.option("--prompt", required=True, help="The request's text.")
@click.option("--kind", type=click.Choice(["chat", "completion", "embeddings"]), default="chat")
@click.option("--max-tokens", type=int, default=None)
@click.option("--json-mode", is_flag=True)
@click.option("--tags", default="", help="As the x-appliance-tags header.")
@click.option("--key", "key_id", default=None, help="Decide as this key id would (its team and allow-list).")
@data_dir_option
@json_option
@handled
def routes_explain(
    model: str, prompt: str, kind: str, max_tokens: int | None, json_mode: bool, tags: str, key_id: str | None,
    data_dir: Path | None, as_json: bool,
) -> None:
    """Show the routing decision for a request without running it."""
    body = {"model": model, "prompt": prompt, "kind": kind, "max_tokens": max_tokens, "json_mode": json_mode, "tags": tags,
            "key_id": key_id}
    out = apply_change(data_dir, remote=("POST", "/admin/routes/explain", body), local=lambda o: _explain_offline(o, body))
    if as_json:
        emit(out)
        return
    click.echo(f"trail:      {out['trail']}")
    click.echo(f"candidates: {', '.join(out['candidates'])}")
    if "score" in out:
        features = ", ".join(f"{name} {value:+.2f}" for name, value in out.get("score_features", []))
        click.echo(f"difficulty: {out['score']:.2f} ({features})")
    for name, why in out["skipped"].items():
        click.echo(f"skipped:    {name}: {why}")


@routes.command("calibrate")
@click.option("--file", "path", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="JSONL of the site's labelled requests: {\"prompt\": ..., \"label\": \"easy\"|\"hard\"} per line.")
@click.option("--reset", is_flag=True, help="Go back to the packaged threshold.")
@data_dir_option
@json_option
@handled
def routes_calibrate(path: Path | None, reset: bool, data_dir: Path | None, as_json: bool) -> None:
    """Show, fit (on the site's golden set) or reset the `auto` router's difficulty threshold."""
    if path is not None and reset:
        raise InvalidRequest("give --file or --reset, not both")
    if path is not None:
        examples = _golden(path)
        body = {label: [{k: v for k, v in e.items() if k != "label"} for e in examples if e.get("label") == label]
                for label in ("easy", "hard")}
        if any(e.get("label") not in ("easy", "hard") for e in examples):
            raise InvalidRequest("every example needs a label of easy or hard", param="examples")
        out = apply_change(data_dir, remote=("PUT", "/admin/router/calibration", body),
                           local=lambda o: _calibration(o).calibrate(examples, actor=cli_actor()))
    elif reset:
        out = apply_change(data_dir, remote=("DELETE", "/admin/router/calibration", None),
                           local=lambda o: _calibration(o).reset(actor=cli_actor()))
    else:
        out = _read(data_dir, "/admin/router/calibration", lambda o: _calibration(o).current())
    if as_json:
        emit(out)
        return
    if out["calibrated"]:
        click.echo(f"threshold {out['threshold']:.4f} (site calibration on {out['examples']} examples: accuracy "
                   f"{out['accuracy']:.1%}, hard recall {out['hard_recall']:.1%}); packaged {out['packaged_threshold']:.4f}")
    else:
        click.echo(f"threshold {out['threshold']:.4f} (packaged)" + (f"; {out['error']}" if "error" in out else ""))


def _golden(path: Path) -> list[dict[str, Any]]:
    examples = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"{path}: cannot read it: {exc}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise InvalidRequest(f"{path}:{number}: not JSON: {exc}") from None
        if not isinstance(row, dict):
            raise InvalidRequest(f"{path}:{number}: each line is a JSON object")
        examples.append({k: row[k] for k in ("prompt", "label", "max_tokens", "json_mode") if k in row})
    return examples


def _calibration(o: Offline) -> Any:
    from appliance.routing.calibration import CalibrationService
    from appliance.routing.scoring import calibration_path

    return CalibrationService(o.store, o.audit, calibration_path(o.settings))


def _explain_offline(o: Offline, body: dict[str, Any]) -> dict[str, Any]:
    from appliance.auth import Principal, Role
    from appliance.engine_pool import EnginePool
    from appliance.guardrails import parse_tags
    from appliance.metering import CostModel
    from appliance.routing.scoring import difficulty_scorer

    principal = o.keys.principal_of(body["key_id"]) if body["key_id"] else Principal("cli", "cli", Role.ADMIN)
    remote = upstream_models(o.store)
    catalog = Catalog(EnginePool(), o.models, remote_names=lambda: remote)
    costs = CostModel(o.settings.costs, o.settings.upstream_prices)
    router = Router(offline_routes(o), catalog, estimate_cost=lambda m, p, c, x: costs.estimate(m, p, c, extra_seconds=x),
                    scorer=lambda: difficulty_scorer(o.settings))
    need = Need(kind=body["kind"], json_mode=body["json_mode"], tags=parse_tags(body["tags"]), text=body["prompt"],
                max_tokens=body["max_tokens"], prompt_tokens_estimate=len(body["prompt"]) // 4)
    return router.explain(principal, body["model"], need)


def _read(data_dir: Path | None, path: str, local: Any) -> Any:
    settings = load_settings(data_dir)
    live = LocalAdmin.connect(settings.paths.admin_socket)
    if live is not None:
        with live:
            return live.request("GET", path)
    with opened(data_dir) as (settings, store):
        return local(offline(settings, store))


def _candidate_text(candidate: dict[str, Any], breakers: dict[str, Any]) -> str:
    state = breakers.get(candidate["model"], {}).get("state")
    extra = f" (<= {candidate['max_difficulty']})" if "max_difficulty" in candidate else ""
    return candidate["model"] + extra + (f" [{state}]" if state and state != "closed" else "")
