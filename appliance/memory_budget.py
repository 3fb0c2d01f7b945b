"""How much memory the model pool may use, what the loaded models take, and what one more
would need: RAM from `/proc/meminfo` and the configured cap, VRAM from NVML.

Nothing here raises: without `/proc/meminfo`, the configured cap (or the machine's size) limits RAM, and a
machine whose NVML is missing or fails has no VRAM (`runtime.gpu.discover_gpus`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from runtime.gpu import ALL_LAYERS, GpuInfo, discover_gpus

__all__ = ["AUTO_FRACTION", "OVERHEAD_BYTES", "Budget", "MemInfo", "MemoryBudget", "Memory", "Need", "memory_need", "read_meminfo"]

MiB = 1 << 20
AUTO_FRACTION = 0.8  # of MemTotal, when [runtime] memory_budget_mb is 0
# Per loaded model, beyond weights and KV cache: llama.cpp's compute buffers, the logits of a
# batch, the sampler chains and our slot bookkeeping (about 40 MB for the default model).
OVERHEAD_BYTES = 64 * MiB


@dataclass(frozen=True, slots=True)
class Need:
    """Bytes a model takes (or would take) resident, in RAM and on the GPU."""

    ram_bytes: int = 0
    vram_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.ram_bytes + self.vram_bytes

    def __add__(self, other: Need) -> Need:
        return Need(self.ram_bytes + other.ram_bytes, self.vram_bytes + other.vram_bytes)

    def __sub__(self, other: Need) -> Need:
        return Need(self.ram_bytes - other.ram_bytes, self.vram_bytes - other.vram_bytes)


def memory_need(weights_bytes: int, kv_bytes: int, *, n_gpu_layers: int = 0, block_count: int | None = None) -> Need:
    """What one model takes: its weights file (the served one: a re-encoding, with its adapter)
    plus its KV cache (`ModelInfo.kv_cache_bytes(slots * ctx_per_slot)`) plus `OVERHEAD_BYTES`.

    With `n_gpu_layers` offloaded, that share of weights and cache is in VRAM (-1: all of it;
    k of `block_count` layers: k / (block_count + 1), as `choose_gpu_layers` counts them). The
    overhead stays in RAM either way."""
    weights_and_cache = max(0, weights_bytes) + max(0, kv_bytes)
    if n_gpu_layers == 0:
        share = 0.0
    elif n_gpu_layers == ALL_LAYERS or n_gpu_layers < 0 or not block_count:
        share = 1.0
    else:
        share = min(1.0, n_gpu_layers / (block_count + 1))
    vram = int(weights_and_cache * share)
    return Need(ram_bytes=weights_and_cache - vram + OVERHEAD_BYTES, vram_bytes=vram)


@dataclass(frozen=True, slots=True)
class MemInfo:
    """`/proc/meminfo`'s MemTotal and MemAvailable in bytes; None when it cannot be read."""

    total_bytes: int | None
    available_bytes: int | None


def read_meminfo(path: Path = Path("/proc/meminfo")) -> MemInfo:
    fields: dict[str, int] = {}
    try:
        for line in path.read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                fields[key] = int(parts[0]) * 1024  # kB
    except OSError:
        pass
    total = fields.get("MemTotal")
    if total is None:
        try:
            total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):
            total = None
    return MemInfo(total, fields.get("MemAvailable"))


@dataclass(frozen=True, slots=True)
class Memory:
    """One kind of memory as the pool sees it. `free_bytes`: what is left of the budget once
    the loaded models are counted, and no more than the OS (or the driver) says is free."""

    total_bytes: int
    used_bytes: int
    free_bytes: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Budget:
    ram: Memory
    vram: Memory  # all zero without a GPU
    gpu: str | None = None  # the GPU models are placed on (the one with the most free memory)

    @property
    def free(self) -> Need:
        return Need(self.ram.free_bytes, self.vram.free_bytes)

    def fits(self, need: Need, *, freed: Need = Need()) -> bool:
        return need.ram_bytes <= self.ram.free_bytes + freed.ram_bytes and need.vram_bytes <= self.vram.free_bytes + freed.vram_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"ram": self.ram.to_dict(), "vram": self.vram.to_dict(), "gpu": self.gpu}


class MemoryBudget:
    """The pool's budget. `budget_mb` is `[runtime] memory_budget_mb` (0: `AUTO_FRACTION` of
    MemTotal). `meminfo` and `nvml` are injectable so that tests can describe a machine."""

    def __init__(
        self, budget_mb: int = 0, *, meminfo: Callable[[], MemInfo] = read_meminfo, nvml: Any | None = None
    ) -> None:
        self.budget_mb = budget_mb
        self._meminfo = meminfo
        self._nvml = nvml

    def gpus(self) -> list[GpuInfo]:
        return discover_gpus(self._nvml)

    def measure(self, used: Need, *, gpus: list[GpuInfo] | None = None) -> Budget:
        """The budget now, with `used` taken by the resident models (and loads under way).
        Blocking (it reads /proc and asks NVML): call it off the event loop."""
        info = self._meminfo()
        if self.budget_mb:
            cap = self.budget_mb * MiB
        elif info.total_bytes is not None:
            cap = int(info.total_bytes * AUTO_FRACTION)
        else:
            cap = 0  # neither a cap nor the machine's size: nothing is known to fit (set memory_budget_mb)
        free = cap - used.ram_bytes
        if info.available_bytes is not None:
            free = min(free, info.available_bytes)
        ram = Memory(cap, used.ram_bytes, max(0, free))
        gpus = self.gpus() if gpus is None else gpus
        if not gpus:
            return Budget(ram, Memory(0, used.vram_bytes, 0))
        best = max(gpus, key=lambda g: g.free_memory_bytes)
        vram_free = min(best.total_memory_bytes - used.vram_bytes, best.free_memory_bytes)
        return Budget(ram, Memory(best.total_memory_bytes, used.vram_bytes, max(0, vram_free)), gpu=best.name)
