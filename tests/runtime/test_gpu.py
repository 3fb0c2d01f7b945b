"""GPU discovery and placement, against a fault-injecting NVML and the real (GPU-less) machine."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.gpu import GpuInfo, choose_gpu_layers, discover_gpus, read_power_watts

# Loaded by path so the test works whatever the package layout of tests/ is.
_spec = importlib.util.spec_from_file_location("fake_nvml", Path(__file__).with_name("fake_nvml.py"))
assert _spec and _spec.loader
fake_nvml = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("fake_nvml", fake_nvml)  # dataclasses look their module up by name
_spec.loader.exec_module(fake_nvml)
FaultyNvml, FakeGpu = fake_nvml.FaultyNvml, fake_nvml.FakeGpu

GiB = 1 << 30


def gpu(free: int, index: int = 0) -> GpuInfo:
    return GpuInfo(index, "fake", None, 24 * GiB, free, None, None, None)


# --- discovery ---------------------------------------------------------------

def test_missing_library_gives_no_gpus() -> None:
    nv = FaultyNvml(missing_library=True, gpus=[FakeGpu()])
    assert discover_gpus(nv) == []
    assert read_power_watts(nv) is None


def test_driver_not_loaded_gives_no_gpus() -> None:
    nv = FaultyNvml(driver_not_loaded=True, gpus=[FakeGpu()])
    assert discover_gpus(nv) == []
    assert read_power_watts(nv) is None


def test_one_gpu_is_reported() -> None:
    nv = FaultyNvml.one_gpu(free=10 * GiB, total=16 * GiB)
    [info] = discover_gpus(nv)
    assert info == GpuInfo(
        index=0, name="NVIDIA Fake 24GB", uuid="GPU-00000000-fake",
        total_memory_bytes=16 * GiB, free_memory_bytes=10 * GiB,
        temperature_c=55, power_watts=123.456, utilization_percent=37,
    )
    assert nv.initialised == 0, "nvmlShutdown must balance nvmlInit"


def test_bytes_names_are_decoded() -> None:
    nv = FaultyNvml(gpus=[FakeGpu(name=b"Tesla T4", uuid=b"GPU-1")])  # old pynvml returned bytes
    [info] = discover_gpus(nv)
    assert (info.name, info.uuid) == ("Tesla T4", "GPU-1")


def test_several_gpus() -> None:
    nv = FaultyNvml(gpus=[FakeGpu(free=1 * GiB), FakeGpu(free=5 * GiB, name="second")])
    infos = discover_gpus(nv)
    assert [(g.index, g.name, g.free_memory_bytes) for g in infos] == [
        (0, "NVIDIA Fake 24GB", 1 * GiB), (1, "second", 5 * GiB)]
    assert read_power_watts(nv) == pytest.approx(2 * 123.456)


def test_no_devices() -> None:
    nv = FaultyNvml(gpus=[])
    assert discover_gpus(nv) == []
    assert read_power_watts(nv) is None


@pytest.mark.parametrize("call", [
    "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetName", "nvmlDeviceGetMemoryInfo",
])
@pytest.mark.parametrize("error", [
    fake_nvml.NVMLError_GpuIsLost, fake_nvml.NVMLError_Uninitialized, OSError, AttributeError,
])
def test_essential_call_failing_midway_gives_no_gpus(call: str, error: type[BaseException]) -> None:
    # fail on the second GPU (the count is asked only once, so fail it at once)
    after = 0 if call == "nvmlDeviceGetCount" else 1
    nv = FaultyNvml(gpus=[FakeGpu(), FakeGpu()], faults={call: error}, fault_after={call: after})
    assert discover_gpus(nv) == []
    assert nv.initialised == 0
    assert "nvmlShutdown" in nv.calls


@pytest.mark.parametrize("call,field", [
    ("nvmlDeviceGetTemperature", "temperature_c"),
    ("nvmlDeviceGetPowerUsage", "power_watts"),
    ("nvmlDeviceGetUtilizationRates", "utilization_percent"),
    ("nvmlDeviceGetUUID", "uuid"),
])
def test_unsupported_optional_reading_becomes_none(call: str, field: str) -> None:
    nv = FaultyNvml.one_gpu(free=8 * GiB, faults={call: fake_nvml.NVMLError_NotSupported})
    [info] = discover_gpus(nv)
    assert getattr(info, field) is None
    assert info.free_memory_bytes == 8 * GiB


def test_power_reading_failure_is_unknown_not_zero() -> None:
    nv = FaultyNvml(gpus=[FakeGpu(), FakeGpu()], faults={"nvmlDeviceGetPowerUsage": fake_nvml.NVMLError_NotSupported},
                    fault_after={"nvmlDeviceGetPowerUsage": 1})
    assert read_power_watts(nv) is None
    assert nv.initialised == 0


def test_shutdown_failure_is_ignored() -> None:
    nv = FaultyNvml.one_gpu(free=GiB, faults={"nvmlShutdown": fake_nvml.NVMLError_Uninitialized})
    assert len(discover_gpus(nv)) == 1
    assert read_power_watts(nv) == pytest.approx(123.456)


def test_module_without_functions_gives_no_gpus() -> None:
    class Broken:  # an nvml-like object missing most functions: AttributeError
        def nvmlInit(self) -> None:
            pass

    assert discover_gpus(Broken()) == []
    assert read_power_watts(Broken()) is None


def test_init_raising_os_error() -> None:
    nv = FaultyNvml(gpus=[FakeGpu()], faults={"nvmlInit": OSError("libnvidia-ml.so.1: cannot open")})
    assert discover_gpus(nv) == []


# --- the real machine (no GPU here) ----------------------------------------

def _has_nvidia_gpu() -> bool:
    return Path("/dev/nvidiactl").exists()


@pytest.mark.skipif(_has_nvidia_gpu(), reason="this machine has an NVIDIA GPU")
def test_real_pynvml_on_a_machine_without_gpu() -> None:
    pytest.importorskip("pynvml")
    gpus = discover_gpus()
    assert gpus == []
    assert read_power_watts() is None
    assert choose_gpu_layers(98_362_432, 30, gpus, override=None) == 0


@pytest.mark.skipif(_has_nvidia_gpu(), reason="this machine has an NVIDIA GPU")
def test_real_path_without_pynvml_installed() -> None:
    code = (
        "import sys; sys.modules['pynvml'] = None\n"
        "from runtime.gpu import discover_gpus, read_power_watts\n"
        "assert discover_gpus() == [] and read_power_watts() is None\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


# --- placement ---------------------------------------------------------------

def test_override_wins() -> None:
    assert choose_gpu_layers(10 * GiB, 30, [], override=12) == 12
    assert choose_gpu_layers(10 * GiB, 30, [gpu(80 * GiB)], override=0) == 0
    assert choose_gpu_layers(10 * GiB, 30, [], override=-5) == -1


def test_no_gpu_means_cpu() -> None:
    assert choose_gpu_layers(100 << 20, 30, [], override=None) == 0


def test_fits_means_all_layers() -> None:
    assert choose_gpu_layers(1 * GiB, 30, [gpu(2 * GiB)], override=None) == -1
    # the largest free memory decides
    assert choose_gpu_layers(1 * GiB, 30, [gpu(GiB // 2), gpu(2 * GiB, 1)], override=None) == -1


def test_kv_and_margin_count() -> None:
    # 1 GiB of weights alone fits in 1.05 GiB free, but not with a 10% margin
    assert choose_gpu_layers(GiB, 30, [gpu(int(1.05 * GiB))], override=None, margin=0.0) == -1
    assert choose_gpu_layers(GiB, 30, [gpu(int(1.05 * GiB))], override=None) != -1
    assert choose_gpu_layers(GiB, 30, [gpu(int(1.5 * GiB))], override=None, kv_bytes=GiB) != -1


def test_partial_offload_is_proportional() -> None:
    # 31 GiB over 30 layers + 1 → 1 GiB a layer; 11 GiB usable after a 10% margin → 11 layers
    assert choose_gpu_layers(31 * GiB, 30, [gpu(int(11 * 1.1 * GiB) + 1)], override=None) == 11
    layers = [choose_gpu_layers(31 * GiB, 30, [gpu(f * GiB)], override=None) for f in (2, 5, 10, 20, 30)]
    assert layers == sorted(layers) and 0 < layers[0] < layers[-1] <= 30


def test_partial_offload_counts_kv() -> None:
    without = choose_gpu_layers(31 * GiB, 30, [gpu(10 * GiB)], override=None)
    with_kv = choose_gpu_layers(31 * GiB, 30, [gpu(10 * GiB)], override=None, kv_bytes=15 * GiB)
    assert with_kv < without


def test_too_small_gpu_gives_zero() -> None:
    assert choose_gpu_layers(31 * GiB, 30, [gpu(100 << 20)], override=None) == 0


def test_unknown_layer_count_is_all_or_nothing() -> None:
    assert choose_gpu_layers(GiB, None, [gpu(2 * GiB)], override=None) == -1
    assert choose_gpu_layers(10 * GiB, None, [gpu(2 * GiB)], override=None) == 0
    assert choose_gpu_layers(10 * GiB, 0, [gpu(2 * GiB)], override=None) == 0


def test_discovered_gpu_feeds_placement() -> None:
    gpus = discover_gpus(FaultyNvml.one_gpu(free=4 * GiB))
    assert choose_gpu_layers(98_362_432, 30, gpus, override=None, kv_bytes=200 << 20) == -1
