"""GPU discovery and layer placement through NVML (the `pynvml` module of nvidia-ml-py).

Every function takes the NVML module as an optional argument so tests can pass
a fault-injecting stand-in; by default the real `pynvml` is imported. None of
them ever raises: a machine without the NVML library, without a loaded driver,
or whose driver fails part-way through is treated as a machine without GPUs.

Placement works on one GPU, the one with the most free memory. The value
returned by `choose_gpu_layers` is llama.cpp's `n_gpu_layers`: -1 means every
layer plus the output layer, 0 means CPU only, and k in 1..n_layers means the
last k repeating layers.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["GpuInfo", "choose_gpu_layers", "discover_gpus", "read_power_watts"]

log = logging.getLogger(__name__)

ALL_LAYERS = -1
NVML_TEMPERATURE_GPU = 0  # pynvml.NVML_TEMPERATURE_GPU


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """One GPU as NVML reports it. Optional readings are None when the device
    does not support them (for example power draw on some consumer cards)."""

    index: int
    name: str
    uuid: str | None
    total_memory_bytes: int
    free_memory_bytes: int
    temperature_c: int | None
    power_watts: float | None
    utilization_percent: int | None


def _load_nvml(nvml: Any | None) -> Any | None:
    if nvml is not None:
        return nvml
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _optional(fn: Any, *args: Any) -> Any:
    """Call an NVML reading that a device may not support; None on any failure."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - an unsupported reading is not an error
        log.debug("NVML reading %s failed: %s", getattr(fn, "__name__", fn), exc)
        return None


def _shutdown(nvml: Any) -> None:
    try:
        nvml.nvmlShutdown()
    except Exception as exc:  # noqa: BLE001
        log.debug("nvmlShutdown failed: %s", exc)


def discover_gpus(nvml: Any | None = None) -> list[GpuInfo]:
    """List the GPUs NVML can see; [] when NVML or the driver is missing or fails.

    The essential calls (init, device count, handle, name, memory) must all
    succeed or the result is []: a half-seen GPU is not one to place a model on.
    Temperature, power, utilisation and UUID are optional and become None.
    """
    nv = _load_nvml(nvml)
    if nv is None:
        log.debug("pynvml is not installed; assuming no GPU")
        return []
    try:
        nv.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, OSError...
        log.info("NVML unavailable (%s); assuming no GPU", exc)
        return []
    try:
        gpus: list[GpuInfo] = []
        for index in range(int(nv.nvmlDeviceGetCount())):
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            name = _text(nv.nvmlDeviceGetName(handle))
            memory = nv.nvmlDeviceGetMemoryInfo(handle)
            uuid = _optional(nv.nvmlDeviceGetUUID, handle)
            temperature = _optional(nv.nvmlDeviceGetTemperature, handle, NVML_TEMPERATURE_GPU)
            milliwatts = _optional(nv.nvmlDeviceGetPowerUsage, handle)
            rates = _optional(nv.nvmlDeviceGetUtilizationRates, handle)
            gpus.append(
                GpuInfo(
                    index=index,
                    name=name,
                    uuid=_text(uuid) if uuid is not None else None,
                    total_memory_bytes=int(memory.total),
                    free_memory_bytes=int(memory.free),
                    temperature_c=int(temperature) if temperature is not None else None,
                    power_watts=milliwatts / 1000.0 if milliwatts is not None else None,
                    utilization_percent=int(rates.gpu) if rates is not None else None,
                )
            )
        return gpus
    except Exception as exc:  # noqa: BLE001 - never crash on a failing driver
        log.warning("NVML failed while listing GPUs (%s); assuming no GPU", exc)
        return []
    finally:
        _shutdown(nv)


def read_power_watts(nvml: Any | None = None) -> float | None:
    """Total power draw of all GPUs in watts, or None when it cannot be read.

    None (not 0.0) means "unknown", so the caller can fall back to a configured
    wattage. Any device that cannot report power makes the total unknown.
    """
    nv = _load_nvml(nvml)
    if nv is None:
        return None
    try:
        nv.nvmlInit()
    except Exception as exc:  # noqa: BLE001
        log.debug("NVML unavailable for power reading: %s", exc)
        return None
    try:
        count = int(nv.nvmlDeviceGetCount())
        if count == 0:
            return None
        total_mw = 0.0
        for index in range(count):
            total_mw += float(nv.nvmlDeviceGetPowerUsage(nv.nvmlDeviceGetHandleByIndex(index)))
        return total_mw / 1000.0
    except Exception as exc:  # noqa: BLE001
        log.debug("NVML power reading failed: %s", exc)
        return None
    finally:
        _shutdown(nv)


def choose_gpu_layers(
    model_size_bytes: int,
    n_layers: int | None,
    gpus: list[GpuInfo],
    *,
    override: int | None = None,
    kv_bytes: int = 0,
    margin: float = 0.1,
) -> int:
    """How many layers to offload (llama.cpp's `n_gpu_layers`).

    - `override` wins (any negative value is normalised to -1, "all");
    - no GPU → 0;
    - weights + KV cache, plus `margin` (a fraction, for compute buffers and
      fragmentation), fit in the largest free memory → -1 (all layers);
    - otherwise as many whole layers as fit, assuming the weights are spread
      evenly over `n_layers` repeating layers plus one layer's worth of
      embeddings and output, and the KV cache evenly over the layers.
    """
    if override is not None:
        return ALL_LAYERS if override < 0 else int(override)
    if not gpus or model_size_bytes <= 0:
        return 0
    margin = max(0.0, float(margin))
    free = max(g.free_memory_bytes for g in gpus)
    kv_bytes = max(0, int(kv_bytes))
    if (model_size_bytes + kv_bytes) * (1.0 + margin) <= free:
        return ALL_LAYERS
    if not n_layers or n_layers <= 0:
        return 0
    per_layer = model_size_bytes / (n_layers + 1) + kv_bytes / n_layers
    usable = free / (1.0 + margin)
    return max(0, min(n_layers, math.floor(usable / per_layer)))
