"""The jobs that read the machine and the network: `gpu` (this machine's real NVML, which
finds no GPU, and the fault-injecting NVML stand-in of tests/runtime/fake_nvml.py for the
rest), `host` (real readings) and `upstreams` (real local HTTP servers: one that checks the
key, one that answers too late, and a port nobody listens on)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from test_health_support import Site, by_subject, encoded_cache, open_site

from appliance.audit import cli_actor
from appliance.checks.health import gpu
from appliance.checks.metrics_readings import Readings
from appliance.checks.registry import CheckContext
from tests.conftest import free_port

_spec = importlib.util.spec_from_file_location("fake_nvml", Path(__file__).parent.parent / "runtime" / "fake_nvml.py")
assert _spec is not None and _spec.loader is not None
fake_nvml = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("fake_nvml", fake_nvml)  # dataclasses look their module up by name
_spec.loader.exec_module(fake_nvml)
fake_nvml = sys.modules["fake_nvml"]

GOOD_KEY = "sk-health-check-good-key-0123456789"
WRONG_KEY = "sk-health-check-wrong-key-9876543210"


@dataclass
class FullGpu(fake_nvml.FakeGpu):  # type: ignore[name-defined,misc]
    throttle: int = 0
    ecc_uncorrected: int = 0
    ecc_corrected: int = 0
    power_limit_mw: int = 300_000


@dataclass
class FullNvml(fake_nvml.FaultyNvml):  # type: ignore[name-defined,misc]
    """The stand-in, with the readings the gpu job takes beyond discovery's."""

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: Any) -> int:
        self._enter("nvmlDeviceGetCurrentClocksThrottleReasons")
        return int(self._gpu(handle).throttle)

    def nvmlDeviceGetTotalEccErrors(self, handle: Any, error_type: int, counter: int) -> int:
        self._enter("nvmlDeviceGetTotalEccErrors")
        assert counter == 0  # volatile: since the driver loaded
        g = self._gpu(handle)
        return int(g.ecc_uncorrected if error_type == 1 else g.ecc_corrected)

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int:
        self._enter("nvmlDeviceGetEnforcedPowerLimit")
        return int(self._gpu(handle).power_limit_mw)


def gpu_findings(nv: Any, **options: Any) -> dict[str, Any]:
    ctx = CheckContext(None, None, None, {"gpu": options})  # type: ignore[arg-type]  # the gpu job reads options only
    found = by_subject(gpu.gpu_job(ctx, nvml=nv).run())
    if isinstance(nv, fake_nvml.FaultyNvml):
        assert nv.initialised == 0  # NVML always shut down again
    return found


def test_this_machine_without_a_gpu_passes() -> None:
    (found,) = gpu_findings(None).values()  # the real pynvml: no driver here
    assert found.status == "ok" and found.subject == "gpu" and found.summary.startswith("no GPU"), found


@pytest.mark.parametrize(
    "nv", [fake_nvml.FaultyNvml(missing_library=True), fake_nvml.FaultyNvml(driver_not_loaded=True), FullNvml(gpus=[])]
)
def test_no_nvml_or_no_driver_or_no_device_is_no_gpu(nv: Any) -> None:
    (found,) = gpu_findings(nv).values()
    assert found.status == "ok" and found.summary.startswith("no GPU"), found


def test_a_healthy_gpu_reports_its_readings() -> None:
    found = gpu_findings(FullNvml(gpus=[FullGpu(temperature=60, throttle=0x1 | 0x2, ecc_corrected=3)]))["gpu0"]
    assert found.status == "ok", found
    assert found.summary == "NVIDIA Fake 24GB: 4096/24576 MB used, 37% busy, 60 C, 123 W"
    d = found.details
    assert (d["memory_free_mb"], d["temperature_c"], d["power_watts"], d["power_limit_watts"]) == (
        20480,
        60,
        123.456,
        300.0,
    )
    assert d["throttle_reasons"] == ["gpu_idle", "applications_clocks_setting"]
    assert (d["ecc_uncorrected"], d["ecc_corrected"]) == (0, 3)


def test_hot_throttled_and_ecc_errors() -> None:
    found = gpu_findings(
        FullNvml(
            gpus=[
                FullGpu(temperature=88),
                FullGpu(temperature=96),
                FullGpu(ecc_uncorrected=2),
                FullGpu(throttle=0x40 | 0x1),
            ]
        )
    )
    assert found["gpu0"].status == "warn" and "temperature 88 C (warn at 85 C)" in found["gpu0"].summary
    assert found["gpu1"].status == "fail" and "temperature 96 C (fail at 95 C)" in found["gpu1"].summary
    assert found["gpu2"].status == "fail" and "2 uncorrected ECC errors" in found["gpu2"].summary
    assert found["gpu3"].status == "warn" and "clocks throttled: hw_thermal_slowdown" in found["gpu3"].summary
    cooler = gpu_findings(FullNvml(gpus=[FullGpu(temperature=88)]), temperature_warn_c=90)
    assert cooler["gpu0"].status == "ok"


def test_metrics_export_the_gpu_jobs_readings_and_nothing_without_a_gpu() -> None:
    hot = FullNvml(gpus=[FullGpu(temperature=91, throttle=0x40, ecc_uncorrected=2, ecc_corrected=5)])
    text = generate_latest(_gpu_registry(lambda: gpu.read_gpus(hot))).decode()
    series = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("appliance_gpu")
    }
    ident = 'gpu="0",name="NVIDIA Fake 24GB"'
    assert series["appliance_gpus"] == 1
    assert series[f"appliance_gpu_memory_used_bytes{{{ident}}}"] == 4 << 30
    assert series[f"appliance_gpu_temperature_celsius{{{ident}}}"] == 91
    assert series[f"appliance_gpu_clocks_throttled{{{ident},reason=\"hw_thermal_slowdown\"}}"] == 1
    for kind, n in (("uncorrected", 2), ("corrected", 5)):
        assert series[f'appliance_gpu_ecc_errors_total{{gpu="0",kind="{kind}",name="NVIDIA Fake 24GB"}}'] == n
    for nv in (fake_nvml.FaultyNvml(driver_not_loaded=True), None):  # None: this machine's real NVML
        text = generate_latest(_gpu_registry(lambda nv=nv: gpu.read_gpus(nv))).decode()
        assert "appliance_gpus 0.0" in text and 'appliance_metrics_source_up{source="gpus"} 1.0' in text
        assert "appliance_gpu_memory_used_bytes{" not in text


def _gpu_registry(read: Any) -> CollectorRegistry:
    """A registry with the scrape's readings and no services: every other source fails (and is
    marked down), which leaves the GPUs' part whole."""
    registry = CollectorRegistry()
    registry.register(Readings(None, read_gpus=read))  # type: ignore[arg-type]
    return registry


def test_unsupported_readings_are_left_out() -> None:
    faults = {
        "nvmlDeviceGetTotalEccErrors": fake_nvml.NVMLError_NotSupported,
        "nvmlDeviceGetTemperature": fake_nvml.NVMLError_NotSupported,
    }
    found = gpu_findings(fake_nvml.FaultyNvml(gpus=[fake_nvml.FakeGpu()], faults=faults))[
        "gpu0"
    ]  # no throttle/ECC calls
    assert found.status == "ok", found
    assert found.details["temperature_c"] is None and found.details["ecc_uncorrected"] is None
    assert found.details["throttle_reasons"] == []


def test_nvml_failing_mid_read_fails_that_gpu() -> None:
    nv = FullNvml(
        gpus=[FullGpu(), FullGpu()],
        faults={"nvmlDeviceGetTemperature": fake_nvml.NVMLError_GpuIsLost},
        fault_after={"nvmlDeviceGetTemperature": 1},
    )
    found = gpu_findings(nv)
    assert found["gpu0"].status == "ok"
    assert found["gpu1"].status == "fail" and found["gpu1"].summary.startswith(
        "NVML failed mid-read: nvmlDeviceGetTemperature"
    )
    memory = gpu_findings(FullNvml(gpus=[FullGpu()], faults={"nvmlDeviceGetMemoryInfo": fake_nvml.NVMLError_GpuIsLost}))
    assert memory["gpu0"].status == "fail" and "nvmlDeviceGetMemoryInfo" in memory["gpu0"].summary
    listing = gpu_findings(FullNvml(gpus=[FullGpu()], faults={"nvmlDeviceGetCount": fake_nvml.NVMLError_Uninitialized}))
    assert listing["gpu"].status == "fail" and listing["gpu"].summary.startswith("NVML failed listing the GPUs")


# -- host and upstreams, on real services -------------------------------------------------------------------------------
@pytest.fixture
async def site(tmp_path: Path, model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Site]:
    async with open_site(tmp_path / "data", model_path, encoded_cache(tmp_path_factory, model_path)) as site:
        yield site


async def test_host_readings(site: Site) -> None:
    found = by_subject(await site.run("host", max_load_per_core=1e6))  # the box is shared: its load is not ours
    assert set(found) == {"disk", "memory", "load"}
    assert all(f.status == "ok" for f in found.values()), found
    assert found["disk"].details["path"] == str(site.data) and found["disk"].details["free_mb"] > 0
    assert 0 < found["memory"].details["available_mb"] <= found["memory"].details["total_mb"]
    assert found["load"].details["cores"] >= 1

    found = by_subject(
        await site.run("host", min_free_percent=100.0, min_available_percent=100.0, max_load_per_core=-1.0)
    )
    assert [found[s].status for s in ("disk", "memory", "load")] == ["warn", "warn", "warn"]
    found = by_subject(await site.run("host", min_free_mb=1e12, min_available_percent_fail=100.0))
    assert found["disk"].status == "fail" and "MB free of" in found["disk"].summary
    assert found["memory"].status == "fail"


class _Upstream(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.startswith("/slow/"):
            time.sleep(2.0)
        if self.headers.get("Authorization") != f"Bearer {GOOD_KEY}":
            self._send(401, {"error": {"message": f"bad key {self.headers.get('Authorization')}"}})
        elif self.path.endswith("/v1/models"):
            self._send(200, {"object": "list", "data": [{"id": "served-a"}, {"id": "served-b"}]})
        else:
            self._send(404, {"error": {"message": "no such route"}})

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def upstream_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def test_upstreams_reachable_with_their_key_accepted_or_not(site: Site, upstream_url: str) -> None:
    registry = site.services.upstreams
    for name, base, models, key in [
        ("good", f"{upstream_url}/v1", ["served-a"], GOOD_KEY),
        ("refused", f"{upstream_url}/v1", ["served-a"], WRONG_KEY),
        ("keyless", f"{upstream_url}/v1", ["served-a"], None),
        ("partial", f"{upstream_url}/v1", ["served-a", "not-served"], GOOD_KEY),
        ("wrong-path", f"{upstream_url}/v2", ["served-a"], GOOD_KEY),
        ("gone", f"http://127.0.0.1:{free_port()}/v1", ["served-a"], GOOD_KEY),
        ("slow", f"{upstream_url}/slow/v1", ["served-a"], GOOD_KEY),
    ]:
        await asyncio.to_thread(registry.set, name, base_url=base, models=models, api_key=key, actor=cli_actor())
    findings = await site.run("upstreams", request_timeout_seconds=0.5)
    found = by_subject(findings)
    assert found["good"].status == "ok" and found["good"].summary.startswith("reachable, key accepted, 2 models listed")
    assert found["refused"].status == "fail" and found["refused"].summary == "key refused (HTTP 401)"
    assert found["keyless"].status == "fail" and "needs an API key and none is set" in found["keyless"].summary
    assert found["partial"].status == "warn" and "does not list not-served" in found["partial"].summary
    assert found["wrong-path"].status == "fail" and found["wrong-path"].summary == "GET /models answered HTTP 404"
    assert found["gone"].status == "fail" and found["gone"].summary.startswith("unreachable"), found["gone"]
    assert found["slow"].status == "fail" and found["slow"].summary == "unreachable: no answer within 0.5 s"
    text = json.dumps([f.to_dict() for f in findings])
    assert GOOD_KEY not in text and WRONG_KEY not in text


async def test_no_upstream_is_ok(site: Site) -> None:
    (found,) = await site.run("upstreams")
    assert found.status == "ok" and found.summary == "no upstream is registered"
