"""A fault-injecting stand-in for the `pynvml` module, for GPU discovery tests.

It raises the real pynvml exception classes (nvidia-ml-py is a runtime
dependency), so `except pynvml.NVMLError` behaves exactly as with the driver.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml

NVMLError = pynvml.NVMLError
NVMLError_LibraryNotFound = pynvml.NVMLError_LibraryNotFound
NVMLError_DriverNotLoaded = pynvml.NVMLError_DriverNotLoaded
NVMLError_NotSupported = pynvml.NVMLError_NotSupported
NVMLError_GpuIsLost = pynvml.NVMLError_GpuIsLost
NVMLError_Uninitialized = pynvml.NVMLError_Uninitialized
NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU


@dataclass
class FakeGpu:
    name: str = "NVIDIA Fake 24GB"
    total: int = 24 << 30
    free: int = 20 << 30
    temperature: int = 55
    power_mw: int = 123_456
    utilization: int = 37
    uuid: str = "GPU-00000000-fake"


@dataclass
class FaultyNvml:
    """Simulates NVML. `missing_library` / `driver_not_loaded` make nvmlInit fail;
    `faults` maps a function name to the exception it raises (a class or an
    instance), optionally only after `fault_after[name]` successful calls."""

    gpus: list[FakeGpu] = field(default_factory=list)
    missing_library: bool = False
    driver_not_loaded: bool = False
    faults: dict[str, BaseException | type[BaseException]] = field(default_factory=dict)
    fault_after: dict[str, int] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    initialised: int = 0

    NVMLError = NVMLError
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU

    @classmethod
    def one_gpu(cls, free: int, total: int | None = None, **kw: Any) -> FaultyNvml:
        return cls(gpus=[FakeGpu(free=free, total=total if total is not None else max(free, 24 << 30))], **kw)

    def _enter(self, name: str) -> None:
        self.calls.append(name)
        fault = self.faults.get(name)
        if fault is not None:
            after = self.fault_after.get(name, 0)
            if self.calls.count(name) > after:
                raise fault() if isinstance(fault, type) else fault
        if name not in {"nvmlInit", "nvmlShutdown"} and self.initialised <= 0:
            raise NVMLError_Uninitialized()

    def _gpu(self, handle: Any) -> FakeGpu:
        return self.gpus[handle.index]

    # --- the pynvml functions the runtime uses -------------------------
    def nvmlInit(self) -> None:
        if self.missing_library:
            self.calls.append("nvmlInit")
            raise NVMLError_LibraryNotFound()
        if self.driver_not_loaded:
            self.calls.append("nvmlInit")
            raise NVMLError_DriverNotLoaded()
        self._enter("nvmlInit")
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        if self.initialised <= 0:
            raise NVMLError_Uninitialized()
        self.initialised -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError_InvalidArgument()
        return SimpleNamespace(index=index)

    def nvmlDeviceGetName(self, handle: Any) -> str:
        self._enter("nvmlDeviceGetName")
        return self._gpu(handle).name

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        self._enter("nvmlDeviceGetUUID")
        return self._gpu(handle).uuid

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any:
        self._enter("nvmlDeviceGetMemoryInfo")
        gpu = self._gpu(handle)
        return SimpleNamespace(total=gpu.total, free=gpu.free, used=gpu.total - gpu.free)

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        self._enter("nvmlDeviceGetTemperature")
        assert sensor == NVML_TEMPERATURE_GPU
        return self._gpu(handle).temperature

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        self._enter("nvmlDeviceGetPowerUsage")
        return self._gpu(handle).power_mw

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any:
        self._enter("nvmlDeviceGetUtilizationRates")
        return SimpleNamespace(gpu=self._gpu(handle).utilization, memory=10)
