"""The `appliance` command line. Output is for people, or JSON with `--json`; errors are one
clear line on stderr and a non-zero exit status."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from appliance.audit.cli import audit
from appliance.audit.log import cli_actor
from appliance.checks_cli import alerts, checks
from appliance.cli_support import data_dir_option, emit, handled, json_option, offline, opened
from appliance.config import Settings, load_settings
from appliance.drift_cli import drift
from appliance.feedback_cli import feedback, promote
from appliance.keys_cli import keys
from appliance.logs import configure_logging
from appliance.metering.cli import budgets, teams, usage
from appliance.models_cli import models, prepare_weights_now
from appliance.plugins_cli import plugins
from appliance.routes_cli import routes
from appliance.tls import CertificatePair, make_self_signed
from appliance.upstreams_cli import upstreams
from runtime.model_file import sha256_file

DEFAULT_CONFIG = """\
# Appliance configuration. Environment variables APPLIANCE_<SECTION>_<KEY> override these
# values (for example APPLIANCE_SERVER_PORT=9000), and CLI flags override both.

[server]
host = "127.0.0.1"   # keep on loopback unless a proxy or firewall fronts it
port = 8080
# allowed_hosts = ["ai.example.lan"]   # names clients use; required when host is 0.0.0.0
# trusted_proxies = ["10.0.0.2"]       # whose X-Forwarded-For is believed
# tls_cert = "/path/cert.pem"          # with tls_key: HTTPS (appliance init --tls makes a pair)
# tls_key = "/path/key.pem"
# admin_group = "appliance-admins"     # may use the local admin socket, as root and the service user do
# max_body_bytes = 4194304

[runtime]
# n_threads = 2        # default: every core
# slots = 8            # concurrent sequences per model
# ctx_per_slot = 1024  # context window of each sequence (KV memory grows with slots x this)
# weights = "auto"     # on CPUs, serve Q4_1/Q5_1 models re-encoded for batched kernels; "q8_0" for llama.cpp's Q8_0 only; "original" to keep the file
# draft_tokens = 3     # guessed tokens a decode step may carry per sequence, kept only if sampled anyway; 0 = off
# default_max_tokens = 512  # completion cap when a request gives none (also what budgets reserve)
# cpu_variant = "auto" # llama.cpp CPU kernels; a variant name forces it ("sapphirerapids" runs AMX)
# memory_budget_mb = 0        # RAM the loaded models may take; 0 = 80% of MemTotal
# idle_unload_seconds = 1800  # unload an unpinned model unused this long; 0 = never

# [routing]
# first_token_timeout_seconds = 30  # a candidate without a first token by then is given up for the next
# breaker_failures = 5              # failures within the window that open a candidate's breaker
# breaker_window_seconds = 60
# breaker_cooldown_seconds = 30     # then one probe (a request, or a free canary for local models)

# [checks]                          # scheduled health and drift checks (appliance checks list)
# misfire_grace_seconds = 60        # a late run still starts within this; runs never overlap
# history_days = 30
# [check.host]                      # each check: enabled, interval_seconds or cron, timeout_seconds, options
# interval_seconds = 60
# min_free_percent = 10
# [check.backup]
# cron = "0 3 * * *"                # daily at 03:00 local time
# keep = 7

# Alerts: rules send findings at a severity or worse to channels (appliance alerts channels).
# [alerts.channels.ops]
# type = "webhook"                  # or "syslog" (address = "udp://10.0.0.5:514") or "smtp"
# url = "https://hooks.example.lan/appliance"
# secret_file = "keys/ops.secret"   # HMAC-SHA256 key, mode 0600
# [[alerts.rules]]
# name = "everything"
# checks = ["*"]
# severity = "warn"
# channels = ["ops"]
# repeat_seconds = 3600

# [metrics]
# listen = "127.0.0.1:9464"         # /metrics without a key, for a local Prometheus

# [[models]]
# name = "smollm2-135m-instruct"
# slots = 8
# n_gpu_layers = -1    # override the automatic GPU placement

# Plugins (docs/plugins.md). Each takes enabled, fail ("open"|"closed"), timeout_seconds, order.
# [plugins.pii_redact]
# prompts = false      # redact prompts before the model sees them
# responses = false    # redact answers (streams are then held back until complete)
# audit = false        # redact what the audit log keeps, where it keeps text
# [plugins.prompt_guard]
# max_prompt_chars = 200000
# [[plugins.prompt_guard.block]]
# name = "no-credentials"
# regex = '(?i)\\bpassword\\s*[:=]'
# [[plugins.keyword_router.rules]]
# name = "code"
# regex = '(?i)\\b(def|class|select|traceback)\\b'
# to = ["coder"]                    # routes or candidates, best first
"""


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
@click.option("--tls", is_flag=True, help="Make a self-signed certificate and serve HTTPS with it (prints its fingerprint).")
@click.option("--tls-name", "tls_names", multiple=True, help="A host name or address the certificate covers (repeatable).")
@json_option
@handled
def init(
    data_dir: Path | None, model_path: Path | None, model_name: str | None, tls: bool, tls_names: tuple[str, ...], as_json: bool
) -> None:
    """Create the data directory and database; print the first admin key once.

    Safe to run again: it never creates a second admin key or overwrites data.
    """
    with opened(data_dir) as (settings, store):
        paths = settings.paths
        if not paths.config.exists():
            paths.config.write_text(DEFAULT_CONFIG, encoding="utf-8")
        services = offline(settings, store)
        result: dict[str, Any] = {"data_dir": str(paths.root), "admin_key": None, "model": None}
        if services.keys.count() == 0:
            new = services.keys.create("admin", "admin", actor=cli_actor())
            result["admin_key"] = new.secret
            result["admin_key_id"] = new.record.id
        if model_path is not None:
            existing = services.models.find_by_sha256(sha256_file(model_path)) if model_path.exists() else None
            if existing is None:
                existing = services.models.add(model_path, model_name, actor=cli_actor())
            result["model"] = existing.name
            result["weights"] = prepare_weights_now(settings, existing)
        if tls:
            result["tls"] = _enable_tls(settings, list(tls_names))
    if as_json:
        emit(result)
        return
    click.echo(f"data directory: {result['data_dir']}")
    if result["model"]:
        click.echo(f"default model: {result['model']}")
    if tls:
        click.echo(f"HTTPS certificate: {result['tls']['cert']}")
        click.echo(f"  SHA-256 fingerprint: {result['tls']['fingerprint']}")
    if result["admin_key"]:
        click.echo("")
        click.echo("First admin key. It is shown once and cannot be recovered; store it now:")
        click.echo(f"  {result['admin_key']}")
    else:
        click.echo("already initialised: the admin key was shown when the data directory was created")


def _enable_tls(settings: Settings, names: list[str]) -> dict[str, str]:
    """Make (or keep) the self-signed pair and name it in appliance.toml's [server] section."""
    server = settings.server
    if server.tls_cert and server.tls_key:
        pair = CertificatePair.load(Path(server.tls_cert), Path(server.tls_key))
    else:
        pair = make_self_signed(settings.paths.tls, [*names, *server.allowed_hosts])
        config = settings.paths.config
        lines = config.read_text(encoding="utf-8").splitlines()
        entries = [f"tls_cert = {json.dumps(str(pair.cert))}", f"tls_key = {json.dumps(str(pair.key))}"]  # TOML strings
        at = lines.index("[server]") + 1 if "[server]" in lines else None
        if at is None:
            lines += ["", "[server]", *entries]
        else:
            lines[at:at] = entries
        config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"cert": str(pair.cert), "key": str(pair.key), "fingerprint": pair.fingerprint}


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


for group in (models, keys, teams, budgets, usage, audit, plugins, routes, upstreams, checks, alerts, drift, feedback):
    main.add_command(group)
drift.add_command(promote)  # the feedback loop's end: a correction becomes a golden case
