"""Settings: one TOML file in the data directory, overridden by `APPLIANCE_<SECTION>_<KEY>`
environment variables, overridden in turn by CLI flags. Validated once, at start-up."""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from appliance.errors import ConfigError
from appliance.paths import DataPaths, default_data_dir
from runtime.cpu import VARIANTS
from runtime.encodings import WeightsMode

Port = Annotated[int, Meta(ge=1, le=65535)]
Positive = Annotated[int, Meta(ge=1)]
PositiveFloat = Annotated[float, Meta(gt=0)]
DraftTokens = Annotated[int, Meta(ge=0, le=8)]


class ServerSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: Port = 8080
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 4 * 1024 * 1024
    graceful_shutdown_seconds: Annotated[float, Meta(ge=0)] = 30.0
    log_level: str = "info"
    # Host names (compared without the port) requests may be addressed to, beyond the bind
    # address, localhost, 127.0.0.1 and ::1. Required when binding a wildcard address.
    allowed_hosts: list[str] = msgspec.field(default_factory=list)
    tls_cert: str = ""  # PEM certificate chain; with tls_key, the API is served over HTTPS
    tls_key: str = ""
    # Reverse proxies (addresses or CIDR networks) whose X-Forwarded-For is believed.
    trusted_proxies: list[str] = msgspec.field(default_factory=list)
    admin_socket: bool = True  # the local admin socket, <data>/admin.sock (peer-credential auth)
    admin_group: str = ""  # members of this group may use the admin socket too


class AuthSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    expiry_warning_days: Annotated[float, Meta(ge=0)] = 14.0  # keys expiring this soon are listed as expiring
    # Failed authentication is counted per client address and reason over a window, and
    # recorded once per window; past `failure_limit` in a window, further failing attempts
    # from that address get 429 (a request with a valid key never does).
    failure_window_seconds: Annotated[float, Meta(ge=1)] = 60.0
    failure_limit: Positive = 20


class RuntimeSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Defaults for every local model; `[[models]]` entries override them per model."""

    n_threads: Positive | None = None
    slots: Positive = 8
    ctx_per_slot: Annotated[int, Meta(ge=128)] = 1024  # 8 x 1024 keeps RSS under 400 MB for the default model
    n_batch: Positive = 512
    queue_limit: Positive = 64
    queue_timeout_seconds: PositiveFloat = 30.0
    weights: WeightsMode = "auto"  # on CPUs, Q4_1/Q5_1 served re-encoded (runtime/weights.py)
    draft_tokens: DraftTokens = 3  # most guessed tokens per sequence and decode step (runtime/_drafts.py); 0 = off
    # llama.cpp CPU kernels: "auto" picks the best variant this CPU and kernel allow, never one
    # in runtime.cpu.KNOWN_CRASHES; a variant name forces it (e.g. "sapphirerapids" for AMX).
    cpu_variant: str = "auto"
    # Completion tokens when a request gives no max_tokens: what is generated at most, and what
    # budgets and the tokens-per-minute limit reserve (settled on real use).
    default_max_tokens: Positive = 512
    # The model pool (appliance/model_pool.py): the RAM its models may take, in MB (0 = auto,
    # 80% of MemTotal; what /proc/meminfo says is available caps it either way), and how long
    # an unpinned model may sit unused before it is unloaded (0 = never).
    memory_budget_mb: Annotated[int, Meta(ge=0)] = 0
    idle_unload_seconds: Annotated[float, Meta(ge=0)] = 1800.0


class ModelSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Per-model overrides, matched to a registered model by name."""

    name: str
    slots: Positive | None = None
    ctx_per_slot: Annotated[int, Meta(ge=128)] | None = None
    n_threads: Positive | None = None
    n_gpu_layers: Annotated[int, Meta(ge=-1)] | None = None
    weights: WeightsMode | None = None
    draft_tokens: DraftTokens | None = None
    enabled: bool = True
    idle_unload_seconds: Annotated[float, Meta(ge=0)] | None = None  # default: [runtime]'s; 0 = never


class CostSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Prices. Local cost = energy x electricity price + hardware amortisation per compute second."""

    currency: str = "USD"
    electricity_per_kwh: Annotated[float, Meta(ge=0)] = 0.30
    hardware_per_hour: Annotated[float, Meta(ge=0)] = 0.10  # purchase price / expected service hours
    cpu_watts: Annotated[float, Meta(ge=0)] = 15.0  # used when NVML reports no GPU power


class UpstreamPrice(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Price of a remote upstream model, per 1,000 tokens."""

    model: str
    input_per_1k: Annotated[float, Meta(ge=0)] = 0.0
    output_per_1k: Annotated[float, Meta(ge=0)] = 0.0


class RoutingSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Fallback and circuit breakers (appliance/routing/). A route may set its own deadline."""

    # A candidate that has not produced its first token by then is given up for the next one.
    first_token_timeout_seconds: PositiveFloat = 30.0
    # A candidate's breaker opens after this many failures (errors, timeouts, failed retries)
    # within the window, stays open for the cooldown, then lets one probe through.
    breaker_failures: Positive = 5
    breaker_window_seconds: PositiveFloat = 60.0
    breaker_cooldown_seconds: PositiveFloat = 30.0


class AuditSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    checkpoint_every_records: Positive = 1000
    checkpoint_every_seconds: PositiveFloat = 60.0
    default_prompt_retention: str = "sha256"  # none | sha256 | redacted | full
    # Kept prompt text (redacted or full) is cut after this many characters; the record then
    # also holds the whole prompt's length and sha256.
    max_kept_prompt_chars: Annotated[int, Meta(ge=0)] = 65536
    # What is kept of answers, beside the hashed record like prompts (none by default); a
    # key's or team's `answer_retention` wins. Kept answers feed `appliance feedback export`.
    default_answer_retention: str = "none"
    max_kept_answer_chars: Annotated[int, Meta(ge=0)] = 65536
    # Stream audit records, as they are committed, to a syslog receiver (a SIEM):
    # "tcp://host:port", "udp://host:port" or "unix:///path". Resumes where it stopped.
    forward_syslog: str = ""


class ChecksSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The scheduler (appliance/checks/). Each check's own table is `[check.<name>]`:
    `enabled`, `interval_seconds` or `cron`, `timeout_seconds`, and the check's options."""

    enabled: bool = True
    # A run that could not start on time (the loop was busy, the box slept) still starts
    # within this grace; later, it is skipped and the next one is awaited. Runs of one check
    # never overlap, and missed runs coalesce into one.
    misfire_grace_seconds: PositiveFloat = 60.0
    history_days: PositiveFloat = 30.0  # runs older than this are pruned
    history_runs: Positive = 500  # and at most this many are kept per check


class AlertRule(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`[[alerts.rules]]`: findings of these checks, at this severity or worse, go to these channels."""

    name: str
    checks: list[str] = msgspec.field(default_factory=lambda: ["*"])  # check names or globs
    severity: Literal["warn", "fail"] = "warn"
    channels: list[str] = msgspec.field(default_factory=list)
    repeat_seconds: Annotated[float, Meta(ge=0)] = 3600.0  # re-sent while open; 0 = once


class AlertSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    rules: list[AlertRule] = msgspec.field(default_factory=list)
    # `[alerts.channels.<name>]` with `type` = "webhook" | "syslog" | "smtp" (appliance/checks/channels/).
    channels: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)


class MetricsSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # `/metrics` on the API port needs an admin, operator or auditor key. `listen`
    # ("127.0.0.1:9464") serves it without a key on a separate bind, for a local scraper.
    listen: str = ""
    # A `listen` address that is not loopback (a wildcard such as 0.0.0.0, or a LAN address)
    # serves the metrics to the network without a key: refused unless this is true (docs/metrics.md).
    allow_remote: bool = False

    def __post_init__(self) -> None:
        if self.listen:
            host, _ = self.address()
            if not self.allow_remote and not _is_loopback(host):
                raise ValueError(
                    f"listen = {self.listen!r} serves metrics without a key beyond this machine; "
                    "bind 127.0.0.1, or set metrics.allow_remote = true"
                )

    def address(self) -> tuple[str, int]:
        """`listen` as (host, port): "127.0.0.1:9464", "[::1]:9464", "0.0.0.0:9464" (":9464": every address)."""
        host, sep, port = self.listen.rpartition(":")
        host = host.strip()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ValueError(f"listen = {self.listen!r}: write an IPv6 address in brackets, [::1]:9464")
        if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"listen = {self.listen!r}: expected host:port, for example 127.0.0.1:9464")
        return host or "0.0.0.0", int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DriftSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Input and output drift (appliance/checks/drift.py) and golden sets (golden.py)."""

    window_hours: PositiveFloat = 24.0  # the current window, compared with the baseline's
    psi_warn: PositiveFloat = 0.1
    psi_fail: PositiveFloat = 0.25
    pass_rate_drop: Annotated[float, Meta(ge=0, le=1)] = 0.1  # golden pass rate this far below its baseline alerts
    similarity_threshold: Annotated[float, Meta(ge=0, le=1)] = 0.8  # default for golden `similarity` assertions
    embedding_model: str = ""  # default: the default model's embeddings


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    data_dir: str = ""
    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    runtime: RuntimeSettings = msgspec.field(default_factory=RuntimeSettings)
    models: list[ModelSettings] = msgspec.field(default_factory=list)
    costs: CostSettings = msgspec.field(default_factory=CostSettings)
    upstream_prices: list[UpstreamPrice] = msgspec.field(default_factory=list)
    routing: RoutingSettings = msgspec.field(default_factory=RoutingSettings)
    audit: AuditSettings = msgspec.field(default_factory=AuditSettings)
    auth: AuthSettings = msgspec.field(default_factory=AuthSettings)
    checks: ChecksSettings = msgspec.field(default_factory=ChecksSettings)
    check: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    alerts: AlertSettings = msgspec.field(default_factory=AlertSettings)
    metrics: MetricsSettings = msgspec.field(default_factory=MetricsSettings)
    drift: DriftSettings = msgspec.field(default_factory=DriftSettings)
    # [plugins.<name>] tables: `enabled`, `fail` ("open"|"closed"), `timeout_seconds`, `workers`
    # for the host, the rest for the plugin (appliance/plugin_manager.py).
    plugins: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    # APPLIANCE_PLUGINS=a,b loads only those plugins ("none": no plugin), for debugging.
    plugin_filter: list[str] | None = None

    @property
    def paths(self) -> DataPaths:
        return DataPaths(Path(self.data_dir))

    def model_settings(self, name: str) -> ModelSettings:
        for entry in self.models:
            if entry.name == name:
                return entry
        return ModelSettings(name=name)

    def weights_mode(self, name: str) -> WeightsMode:
        """How model `name`'s weights are served: its own setting, else `[runtime] weights`."""
        return self.model_settings(name).weights or self.runtime.weights


_ENV_SECTIONS = {
    "server": ServerSettings,
    "runtime": RuntimeSettings,
    "costs": CostSettings,
    "audit": AuditSettings,
    "auth": AuthSettings,
    "checks": ChecksSettings,
    "metrics": MetricsSettings,
    "drift": DriftSettings,
}
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
RETENTION_POLICIES = ("none", "sha256", "redacted", "full")
_LOG_LEVELS = {"debug", "info", "warning", "error", "critical"}


def load_settings(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    env: dict[str, str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Settings:
    """Build the settings from file, environment and CLI overrides, in rising priority.

    Raises `ConfigError` naming the source, the key and what was expected.
    """
    env = dict(os.environ) if env is None else env
    root = Path(data_dir).expanduser() if data_dir else default_data_dir(env)
    raw: dict[str, Any] = _read_file(DataPaths(root).config)
    _check(raw, source=str(DataPaths(root).config))
    for section, values in _env_overrides(env).items():
        raw.setdefault(section, {}).update(values)
    _check(raw, source="environment (APPLIANCE_*)", strict=False)
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    raw["data_dir"] = str(root.resolve())
    if "APPLIANCE_PLUGINS" in env:
        raw["plugin_filter"] = [n.strip() for n in env["APPLIANCE_PLUGINS"].split(",") if n.strip() and n.strip() != "none"]
    settings = _check(raw, source="command line", strict=False)
    if settings.server.log_level.lower() not in _LOG_LEVELS:
        raise ConfigError(f"server.log_level: expected one of {sorted(_LOG_LEVELS)}, got {settings.server.log_level!r}")
    for name in ("default_prompt_retention", "default_answer_retention"):
        if getattr(settings.audit, name) not in RETENTION_POLICIES:
            raise ConfigError(
                f"audit.{name}: expected one of {list(RETENTION_POLICIES)}, got {getattr(settings.audit, name)!r}"
            )
    if settings.runtime.cpu_variant not in ("auto", *VARIANTS):
        raise ConfigError(
            f"runtime.cpu_variant: expected auto or one of {', '.join(VARIANTS)}, got {settings.runtime.cpu_variant!r}"
        )
    if bool(settings.server.tls_cert) != bool(settings.server.tls_key):
        raise ConfigError("server.tls_cert and server.tls_key: set both (HTTPS) or neither")
    _check_networks(settings.server.trusted_proxies)
    names = [m.name for m in settings.models]
    if len(names) != len(set(names)):
        raise ConfigError("models: each [[models]] entry needs a distinct name")
    return settings


def check_exposure(settings: Settings) -> None:
    """What `serve` demands before it binds: a wildcard address only with an explicit host
    allow-list (DNS rebinding), and named TLS files that exist. Raises `ConfigError`."""
    server = settings.server
    if server.host in WILDCARD_HOSTS and not server.allowed_hosts:
        raise ConfigError(
            f"server.host = {server.host!r} listens on every address, so server.allowed_hosts must name the "
            "host names clients use (for example APPLIANCE_SERVER_ALLOWED_HOSTS=ai.example.lan)"
        )
    for name in ("tls_cert", "tls_key"):
        value = getattr(server, name)
        if value and not Path(value).is_file():
            raise ConfigError(f"server.{name}: {value} does not exist (appliance init --tls makes a pair)")


def _check_networks(entries: list[str]) -> None:
    for entry in entries:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ConfigError(f"server.trusted_proxies: {entry!r} is not an IP address or network") from None


def _read_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror}") from None


def _env_overrides(env: dict[str, str]) -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {}
    for name, value in env.items():
        if not name.startswith("APPLIANCE_"):
            continue
        section, _, key = name[len("APPLIANCE_") :].lower().partition("_")
        if section in _ENV_SECTIONS and key:
            struct = _ENV_SECTIONS[section]
            if key not in struct.__struct_fields__:
                raise ConfigError(f"{name}: unknown setting {section}.{key}")
            # A list setting is comma-separated: APPLIANCE_SERVER_ALLOWED_HOSTS=ai.example.lan,10.0.0.5
            is_list = isinstance(getattr(struct(), key), list)
            found.setdefault(section, {})[key] = [v.strip() for v in value.split(",") if v.strip()] if is_list else value
    return found


def _check(raw: dict[str, Any], *, source: str, strict: bool = True) -> Settings:
    try:
        return msgspec.convert(raw, Settings, strict=strict)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from None


def _describe(exc: msgspec.ValidationError) -> str:
    """Turn msgspec's `Expected int, got str - at $.server.port` into `server.port: expected int, got str`."""
    text = str(exc)
    message, sep, where = text.rpartition(" - at `")
    if not sep:
        message, where = text, "$"
    key = where.rstrip("`").removeprefix("$").lstrip(".")
    message = message[:1].lower() + message[1:]
    message = message.replace("`", "")
    return f"{key}: {message}" if key else message
