"""Settings: one TOML file in the data directory, overridden by `APPLIANCE_<SECTION>_<KEY>`
environment variables, overridden in turn by CLI flags. Validated once, at start-up."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from appliance.errors import ConfigError
from appliance.paths import DataPaths, default_data_dir
from runtime.cpu import VARIANTS
from runtime.weights import WeightsMode

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


class AuditSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    checkpoint_every_records: Positive = 1000
    checkpoint_every_seconds: PositiveFloat = 60.0
    default_prompt_retention: str = "sha256"  # none | sha256 | redacted | full


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    data_dir: str = ""
    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    runtime: RuntimeSettings = msgspec.field(default_factory=RuntimeSettings)
    models: list[ModelSettings] = msgspec.field(default_factory=list)
    costs: CostSettings = msgspec.field(default_factory=CostSettings)
    upstream_prices: list[UpstreamPrice] = msgspec.field(default_factory=list)
    audit: AuditSettings = msgspec.field(default_factory=AuditSettings)

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


_ENV_SECTIONS = {"server": ServerSettings, "runtime": RuntimeSettings, "costs": CostSettings, "audit": AuditSettings}
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
    settings = _check(raw, source="command line", strict=False)
    if settings.server.log_level.lower() not in _LOG_LEVELS:
        raise ConfigError(f"server.log_level: expected one of {sorted(_LOG_LEVELS)}, got {settings.server.log_level!r}")
    if settings.audit.default_prompt_retention not in RETENTION_POLICIES:
        raise ConfigError(
            f"audit.default_prompt_retention: expected one of {list(RETENTION_POLICIES)}, "
            f"got {settings.audit.default_prompt_retention!r}"
        )
    if settings.runtime.cpu_variant not in ("auto", *VARIANTS):
        raise ConfigError(
            f"runtime.cpu_variant: expected auto or one of {', '.join(VARIANTS)}, got {settings.runtime.cpu_variant!r}"
        )
    names = [m.name for m in settings.models]
    if len(names) != len(set(names)):
        raise ConfigError("models: each [[models]] entry needs a distinct name")
    return settings


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
            if key not in _ENV_SECTIONS[section].__struct_fields__:
                raise ConfigError(f"{name}: unknown setting {section}.{key}")
            found.setdefault(section, {})[key] = value
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
