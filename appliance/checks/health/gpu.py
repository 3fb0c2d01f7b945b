"""The `gpu` job: NVML readings of every GPU (memory, utilisation, temperature, power,
clock throttle reasons, ECC errors), one finding per GPU (`gpu0`, `gpu1`, ...).

A machine without pynvml, the NVML library or a loaded driver has no GPU: one ok finding,
"no GPU". A reading the device does not support is left out (None); NVML failing part-way
through (a lost GPU, say) is a "fail" for that GPU. Like `runtime.gpu`, every function takes
the NVML module as an argument, so tests pass a fault-injecting stand-in.

Options (`[check.gpu]`): `temperature_warn_c` (85), `temperature_fail_c` (95). Uncorrected
ECC errors (volatile: since the driver loaded) are a "fail"; a throttle reason other than
idle or application clocks a "warn".
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from appliance.checks.findings import Finding, fail, ok, warn
from appliance.checks.registry import CheckContext, CheckJob

__all__ = ["NAME", "GpuReading", "gpu_job", "read_gpus", "run"]

log = logging.getLogger(__name__)
NAME = "gpu"
_NOT_SUPPORTED, _NO_PERMISSION = 3, 4  # NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_NO_PERMISSION
_TEMPERATURE_GPU = 0  # NVML_TEMPERATURE_GPU
_UNCORRECTED, _CORRECTED, _VOLATILE = 1, 0, 0  # NVML_MEMORY_ERROR_TYPE_*, NVML_VOLATILE_ECC
_BENIGN_THROTTLE = 0x1 | 0x2  # GpuIdle, ApplicationsClocksSetting (also UserDefinedClocks)
_THROTTLE_NAMES = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
    0x200: "board_limit",
    0x400: "reliability",
}
MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class GpuReading:
    index: int
    name: str
    uuid: str | None
    memory_total_mb: int
    memory_used_mb: int
    memory_free_mb: int
    utilization_percent: int | None
    memory_utilization_percent: int | None
    temperature_c: int | None
    power_watts: float | None
    power_limit_watts: float | None
    throttle_mask: int | None
    ecc_uncorrected: int | None
    ecc_corrected: int | None

    @property
    def throttle_reasons(self) -> list[str]:
        mask = self.throttle_mask or 0
        return [_THROTTLE_NAMES.get(1 << bit, hex(1 << bit)) for bit in range(mask.bit_length()) if mask >> bit & 1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"throttle_reasons": self.throttle_reasons}


class _ReadFailed(Exception):
    pass


def gpu_job(ctx: CheckContext, *, nvml: Any | None = None) -> CheckJob:
    return CheckJob(
        NAME,
        lambda: run(ctx, nvml=nvml),
        60.0,
        description="NVML readings per GPU: memory, utilisation, temperature, power, throttling, ECC errors",
        timeout_seconds=30.0,
    )


def run(ctx: CheckContext, *, nvml: Any | None = None) -> list[Finding]:
    warn_c = ctx.option(NAME, "temperature_warn_c", 85.0)
    fail_c = ctx.option(NAME, "temperature_fail_c", 95.0)
    return [
        judge(item, warn_c=warn_c, fail_c=fail_c) if isinstance(item, GpuReading) else item for item in read_gpus(nvml)
    ]


def read_gpus(nvml: Any | None = None) -> list[GpuReading | Finding]:
    """A reading per GPU, or a finding where there is none to judge (no GPU, NVML failing)."""
    nv = nvml if nvml is not None else _import_nvml()
    if nv is None:
        return [ok("no GPU (pynvml is not installed)", "gpu")]
    try:
        nv.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, OSError...
        return [ok(f"no GPU (NVML is not available: {_text(exc)})", "gpu")]
    try:
        try:
            count = int(nv.nvmlDeviceGetCount())
        except Exception as exc:  # noqa: BLE001
            return [fail(f"NVML failed listing the GPUs: {_text(exc)}", "gpu")]
        if count == 0:
            return [ok("no GPU", "gpu")]
        out: list[GpuReading | Finding] = []
        for index in range(count):
            try:
                out.append(_read(nv, index))
            except _ReadFailed as exc:
                out.append(fail(f"NVML failed mid-read: {exc}", f"gpu{index}"))
        return out
    finally:
        try:
            nv.nvmlShutdown()
        except Exception as exc:  # noqa: BLE001
            log.debug("nvmlShutdown failed: %s", exc)


def judge(gpu: GpuReading, *, warn_c: float, fail_c: float) -> Finding:
    subject = f"gpu{gpu.index}"
    problems: list[tuple[str, str]] = []
    if gpu.ecc_uncorrected:
        problems.append(("fail", f"{gpu.ecc_uncorrected} uncorrected ECC errors"))
    temp = gpu.temperature_c
    if temp is not None and temp >= fail_c:
        problems.append(("fail", f"temperature {temp} C (fail at {fail_c:g} C)"))
    elif temp is not None and temp >= warn_c:
        problems.append(("warn", f"temperature {temp} C (warn at {warn_c:g} C)"))
    if (gpu.throttle_mask or 0) & ~_BENIGN_THROTTLE:
        reasons = [r for r in gpu.throttle_reasons if r not in ("gpu_idle", "applications_clocks_setting")]
        problems.append(("warn", f"clocks throttled: {', '.join(reasons)}"))
    details = gpu.to_dict()
    if problems:
        make = fail if any(level == "fail" for level, _ in problems) else warn
        return make(f"{gpu.name}: " + "; ".join(text for _, text in problems), subject, **details)
    parts = [f"{gpu.memory_used_mb}/{gpu.memory_total_mb} MB used"]
    if gpu.utilization_percent is not None:
        parts.append(f"{gpu.utilization_percent}% busy")
    if temp is not None:
        parts.append(f"{temp} C")
    if gpu.power_watts is not None:
        parts.append(f"{gpu.power_watts:.0f} W")
    return ok(f"{gpu.name}: " + ", ".join(parts), subject, **details)


def _read(nv: Any, index: int) -> GpuReading:
    handle = _must(nv, "nvmlDeviceGetHandleByIndex", index)
    memory = _must(nv, "nvmlDeviceGetMemoryInfo", handle)
    rates = _maybe(nv, "nvmlDeviceGetUtilizationRates", handle)
    milliwatts = _maybe(nv, "nvmlDeviceGetPowerUsage", handle)
    limit = _maybe(nv, "nvmlDeviceGetEnforcedPowerLimit", handle)
    uuid = _maybe(nv, "nvmlDeviceGetUUID", handle)
    used = int(getattr(memory, "used", int(memory.total) - int(memory.free)))
    return GpuReading(
        index=index,
        name=_text(_must(nv, "nvmlDeviceGetName", handle)),
        uuid=_text(uuid) if uuid is not None else None,
        memory_total_mb=int(memory.total) // MiB,
        memory_used_mb=used // MiB,
        memory_free_mb=int(memory.free) // MiB,
        utilization_percent=int(rates.gpu) if rates is not None else None,
        memory_utilization_percent=int(rates.memory) if rates is not None else None,
        temperature_c=_int(_maybe(nv, "nvmlDeviceGetTemperature", handle, _TEMPERATURE_GPU)),
        power_watts=milliwatts / 1000.0 if milliwatts is not None else None,
        power_limit_watts=limit / 1000.0 if limit is not None else None,
        throttle_mask=_int(_throttle(nv, handle)),
        ecc_uncorrected=_int(_maybe(nv, "nvmlDeviceGetTotalEccErrors", handle, _UNCORRECTED, _VOLATILE)),
        ecc_corrected=_int(_maybe(nv, "nvmlDeviceGetTotalEccErrors", handle, _CORRECTED, _VOLATILE)),
    )


def _throttle(nv: Any, handle: Any) -> Any:
    """NVML renamed "clocks throttle reasons" to "clocks event reasons"; either will do."""
    if getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) is not None:
        return _maybe(nv, "nvmlDeviceGetCurrentClocksEventReasons", handle)
    return _maybe(nv, "nvmlDeviceGetCurrentClocksThrottleReasons", handle)


def _must(nv: Any, fn: str, *args: Any) -> Any:
    try:
        return getattr(nv, fn)(*args)
    except Exception as exc:  # noqa: BLE001 - the device cannot be read: this GPU's finding says so
        raise _ReadFailed(f"{fn}: {_text(exc)}") from None


def _maybe(nv: Any, fn: str, *args: Any) -> Any:
    """A reading the device may not support: None then; any other failure fails the GPU."""
    call: Callable[..., Any] | None = getattr(nv, fn, None)
    if call is None:  # an older pynvml without it
        return None
    try:
        return call(*args)
    except Exception as exc:  # noqa: BLE001
        if getattr(exc, "value", None) in (_NOT_SUPPORTED, _NO_PERMISSION):
            return None
        raise _ReadFailed(f"{fn}: {_text(exc)}") from None


def _import_nvml() -> Any | None:
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value) or type(value).__name__
