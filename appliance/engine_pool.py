"""The engines this process serves, by public model name, and how a local one is sized and
loaded (the model pool, appliance/model_pool.py, decides when)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from appliance.config import Settings
from appliance.errors import ConfigError
from appliance.memory_budget import Need, memory_need
from appliance.model_registry import RegisteredModel
from runtime.backend import ensure_backend
from runtime.cpu import CpuVariantError
from runtime.engine import Engine
from runtime.errors import ModelLoadError
from runtime.gpu import GpuInfo, choose_gpu_layers, discover_gpus
from runtime.llama_engine import LlamaEngine
from runtime.model_file import ModelInfo, inspect_model
from runtime.weights import ServedWeights, original_weights, serve_weights

log = logging.getLogger(__name__)


class EnginePool:
    """Maps model names to running engines. Built at start-up, closed at shutdown."""

    def __init__(self, engines: Iterable[Engine] = ()) -> None:
        self._engines: dict[str, Engine] = {e.name: e for e in engines}
        self.failures: dict[str, str] = {}

    def get(self, name: str) -> Engine | None:
        return self._engines.get(name)

    def __contains__(self, name: object) -> bool:
        """Whether `name` is resident, without counting as a use (`ModelPool.get` does)."""
        return name in self._engines

    def names(self) -> list[str]:
        return list(self._engines)

    def engines(self) -> list[Engine]:
        return list(self._engines.values())

    def add(self, engine: Engine) -> None:
        self._engines[engine.name] = engine

    def remove(self, name: str) -> Engine | None:
        """Take `name`'s engine out of service (the caller closes it)."""
        return self._engines.pop(name, None)

    @property
    def ready(self) -> bool:
        return any(e.health().ok for e in self._engines.values())

    async def close(self) -> None:
        engines, self._engines = list(self._engines.values()), {}
        await asyncio.gather(*(e.close() for e in engines), return_exceptions=True)


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """How a registered model would run here, and what it would take (`need`, counted on the
    registered file: a re-encoding is built, and counted, only once it is loaded)."""

    model: RegisteredModel
    info: ModelInfo
    slots: int
    ctx_per_slot: int
    n_gpu_layers: int  # what llama.cpp is given
    has_gpu: bool  # without one, an n_gpu_layers override places nothing
    kv_bytes: int

    @property
    def need(self) -> Need:
        return self.need_with(self.info.size_bytes)

    def need_with(self, weights_bytes: int) -> Need:
        """What it takes serving a weights file of `weights_bytes` (`memory_need`)."""
        layers = self.n_gpu_layers if self.has_gpu else 0
        return memory_need(weights_bytes, self.kv_bytes, n_gpu_layers=layers, block_count=self.info.block_count)


@dataclass(frozen=True, slots=True)
class Started:
    engine: LlamaEngine
    need: Need  # counted on the weights it serves


async def prepare_backend(settings: Settings) -> None:
    """Load llama.cpp's CPU kernels once, before any model. Raises `ConfigError` when
    `[runtime] cpu_variant` names kernels this machine cannot run."""
    try:
        await asyncio.to_thread(ensure_backend, settings.runtime.cpu_variant)
    except CpuVariantError as exc:
        raise ConfigError(f"runtime.cpu_variant: {exc}") from None


def plan_load(settings: Settings, model: RegisteredModel, gpus: list[GpuInfo]) -> LoadPlan:
    """Re-validate and re-hash the file (one swapped on disk since registration is refused),
    then size the model: slots, context, GPU layers and memory. Blocking."""
    info = inspect_model(Path(model.path), expected_sha256=model.sha256)
    rt, per_model = settings.runtime, settings.model_settings(model.name)
    slots = per_model.slots or rt.slots
    ctx = per_model.ctx_per_slot or rt.ctx_per_slot
    if info.context_length:
        ctx = min(ctx, info.context_length)
    kv_bytes = info.kv_cache_bytes(slots * ctx)
    layers = choose_gpu_layers(
        info.size_bytes, info.block_count or 0, gpus, override=per_model.n_gpu_layers, kv_bytes=kv_bytes
    )
    return LoadPlan(model, info, slots, ctx, layers, bool(gpus), kv_bytes)


def start_engine(settings: Settings, plan: LoadPlan) -> Started:
    """Build (or find) the served weights and load them into a running engine. Blocking."""
    model, info, layers = plan.model, plan.info, plan.n_gpu_layers
    rt, per_model = settings.runtime, settings.model_settings(model.name)
    weights = served_weights(settings, model.name, info, on_gpu=layers != 0)
    log.info(
        "loading model %s (%s served as %s, %d slots x %d tokens, gpu layers %d)",
        model.name,
        info.quantization,
        weights.encoding,
        plan.slots,
        plan.ctx_per_slot,
        layers,
    )
    options = {
        "name": model.name,
        "n_ctx_per_slot": plan.ctx_per_slot,
        "slots": plan.slots,
        "n_threads": per_model.n_threads or rt.n_threads,
        "n_batch": rt.n_batch,
        "n_gpu_layers": layers,
        "queue_limit": rt.queue_limit,
        "queue_timeout_s": rt.queue_timeout_seconds,
        "energy_watts": settings.costs.cpu_watts,
        "draft_tokens": rt.draft_tokens if per_model.draft_tokens is None else per_model.draft_tokens,
    }
    try:
        engine = LlamaEngine(weights.path, weights=weights, **options)
    except ModelLoadError as exc:
        if weights.encoding == "original":
            raise
        # A re-encoding llama.cpp then refuses costs speed, not the model.
        log.error("model %s: llama.cpp refused its %s weights (%s); serving the file as it is", model.name, weights.encoding, exc)
        weights = original_weights(info, note=f"the {weights.encoding} re-encoding did not load: {exc}")
        engine = LlamaEngine(weights.path, weights=weights, **options)
    return Started(engine, plan.need_with(weights.size_bytes))


def _load(settings: Settings, model: RegisteredModel, gpus: list[GpuInfo]) -> LlamaEngine:
    return start_engine(settings, plan_load(settings, model, gpus)).engine


def served_weights(settings: Settings, name: str, info: ModelInfo, *, on_gpu: bool) -> ServedWeights:
    """The file the engine for model `name` loads: `info`'s own, or its cached re-encoding.

    A re-encoding that cannot be built (a full disk, say) costs speed, not the model: the
    original is served and the reason shows in the engine's stats.
    """
    mode = settings.weights_mode(name)
    try:
        return serve_weights(info, settings.paths.encoded_models, mode=mode, on_gpu=on_gpu)
    except ModelLoadError as exc:
        log.error("model %s: serving its file as it is: %s", name, exc)
        return original_weights(info, note=str(exc))


def prepare_weights(settings: Settings, model: RegisteredModel) -> ServedWeights | None:
    """Build a CPU re-encoding at registration time, so the first `serve` starts at full speed.

    Skipped (None) on a machine with a GPU, where `serve` decides per placement.
    """
    if discover_gpus():
        return None
    return served_weights(
        settings, model.name, inspect_model(Path(model.path), expected_sha256=model.sha256), on_gpu=False
    )
