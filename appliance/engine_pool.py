"""The engines this process serves, by public model name, and how local ones are loaded."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from pathlib import Path

from appliance.config import Settings
from appliance.errors import ConfigError
from appliance.model_registry import ModelRegistry, RegisteredModel
from runtime.backend import ensure_backend
from runtime.cpu import CpuVariantError
from runtime.engine import Engine
from runtime.errors import ModelLoadError, RuntimeFault
from runtime.gpu import choose_gpu_layers, discover_gpus
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

    def names(self) -> list[str]:
        return list(self._engines)

    def engines(self) -> list[Engine]:
        return list(self._engines.values())

    def add(self, engine: Engine) -> None:
        self._engines[engine.name] = engine

    @property
    def ready(self) -> bool:
        return any(e.health().ok for e in self._engines.values())

    async def close(self) -> None:
        engines, self._engines = list(self._engines.values()), {}
        await asyncio.gather(*(e.close() for e in engines), return_exceptions=True)


async def load_local_engines(settings: Settings, registry: ModelRegistry) -> EnginePool:
    """Load every registered, enabled model. A model that fails is logged and skipped.

    Raises `ConfigError` when `[runtime] cpu_variant` names kernels this machine cannot run.
    """
    pool = EnginePool()
    try:
        await asyncio.to_thread(ensure_backend, settings.runtime.cpu_variant)
    except CpuVariantError as exc:
        raise ConfigError(f"runtime.cpu_variant: {exc}") from None
    gpus = await asyncio.to_thread(discover_gpus)
    for model in registry.list():
        if not settings.model_settings(model.name).enabled:
            continue
        try:
            pool.add(await asyncio.to_thread(_load, settings, model, gpus))
        except RuntimeFault as exc:
            pool.failures[model.name] = str(exc)
            log.error("model %s not loaded: %s", model.name, exc)
    return pool


def _load(settings: Settings, model: RegisteredModel, gpus: list) -> LlamaEngine:
    # Re-validate and re-hash: a file swapped on disk since registration is refused.
    info = inspect_model(Path(model.path), expected_sha256=model.sha256)
    rt, per_model = settings.runtime, settings.model_settings(model.name)
    slots = per_model.slots or rt.slots
    ctx = per_model.ctx_per_slot or rt.ctx_per_slot
    if info.context_length:
        ctx = min(ctx, info.context_length)
    layers = choose_gpu_layers(
        info.size_bytes,
        info.block_count or 0,
        gpus,
        override=per_model.n_gpu_layers,
        kv_bytes=info.kv_cache_bytes(slots * ctx),
    )
    weights = served_weights(settings, model.name, info, on_gpu=layers != 0)
    log.info(
        "loading model %s (%s served as %s, %d slots x %d tokens, gpu layers %d)",
        model.name,
        info.quantization,
        weights.encoding,
        slots,
        ctx,
        layers,
    )
    options = {
        "name": model.name,
        "n_ctx_per_slot": ctx,
        "slots": slots,
        "n_threads": per_model.n_threads or rt.n_threads,
        "n_batch": rt.n_batch,
        "n_gpu_layers": layers,
        "queue_limit": rt.queue_limit,
        "queue_timeout_s": rt.queue_timeout_seconds,
        "energy_watts": settings.costs.cpu_watts,
        "draft_tokens": rt.draft_tokens if per_model.draft_tokens is None else per_model.draft_tokens,
    }
    try:
        return LlamaEngine(weights.path, weights=weights, **options)
    except ModelLoadError as exc:
        if weights.encoding == "original":
            raise
        # A re-encoding llama.cpp then refuses costs speed, not the model.
        log.error("model %s: llama.cpp refused its %s weights (%s); serving the file as it is", model.name, weights.encoding, exc)
        original = original_weights(info, note=f"the {weights.encoding} re-encoding did not load: {exc}")
        return LlamaEngine(original.path, weights=original, **options)


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
