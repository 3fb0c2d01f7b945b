"""The model pool on a real database with real engines: the default model's file registered
under three names (one slot of 256 tokens each), loaded on demand, evicted, unloaded when
idle, pinned. The machine's memory is described by stand-ins for `/proc/meminfo` and NVML
(tests/runtime/fake_nvml.py); only a fault-injecting NVML stands in for anything of the engine's."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.audit import AuditLog
from appliance.audit.log import cli_actor
from appliance.config import Settings, load_settings
from appliance.engine_pool import plan_load
from appliance.errors import Conflict, ModelDoesNotFit, ModelNotFound
from appliance.memory_budget import OVERHEAD_BYTES, MemInfo, MemoryBudget, Need, memory_need
from appliance.model_pins import Pins
from appliance.model_pool import ModelPool, mb
from appliance.model_registry import ModelRegistry
from appliance.store import Store
from runtime.engine import GenerationRequest, SamplingParams, TokenEvent
from runtime.errors import EngineUnavailable
from runtime.stand_ins import EchoEngine

_spec = importlib.util.spec_from_file_location("fake_nvml", Path(__file__).parent.parent / "runtime" / "fake_nvml.py")
assert _spec and _spec.loader
fake_nvml = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("fake_nvml", fake_nvml)
_spec.loader.exec_module(fake_nvml)
FaultyNvml = fake_nvml.FaultyNvml

GiB, MiB = 1 << 30, 1 << 20
NAMES = ("smol-a", "smol-b", "smol-c")  # smol-a, registered first, is the default model
NO_GPU = FaultyNvml(missing_library=True)
PLENTY = MemInfo(total_bytes=64 * GiB, available_bytes=32 * GiB)
CONFIG = '[runtime]\nslots = 1\nctx_per_slot = 256\nweights = "original"\n'


@dataclass
class Box:
    data: Path
    store: Store
    audit: AuditLog
    models: ModelRegistry

    def settings(self, extra: str = "") -> Settings:
        (self.data / "appliance.toml").write_text(CONFIG + extra)
        return load_settings(self.data, env={})

    def pool(self, *, budget_mb: int = 0, extra: str = "", nvml: object = NO_GPU, meminfo: MemInfo = PLENTY,
             grace: float = 0.0) -> ModelPool:
        settings = self.settings(extra)
        budget = MemoryBudget(budget_mb, meminfo=lambda: meminfo, nvml=nvml)
        return ModelPool(settings, self.models, Pins(self.store, self.audit), self.audit, budget=budget, grace_seconds=grace)

    def admin_records(self, action: str) -> list[dict[str, Any]]:
        return [b for b in self._bodies("admin") if b["action"] == action]

    def system_records(self, event: str) -> list[dict[str, Any]]:
        return [b for b in self._bodies("system") if b["event"] == event]

    def _bodies(self, kind: str) -> list[dict[str, Any]]:
        return [json.loads(r["body"]) for r in self.store.query("SELECT body FROM audit WHERE kind = ? ORDER BY idx", (kind,))]


@pytest.fixture
def need_mb(box: Box) -> int:
    """What one of these models takes, in MB, as the pool counts it (all RAM: no GPU)."""
    return mb(plan_load(box.settings(), box.models.get("smol-a"), []).need.total_bytes)


@pytest.fixture
def box(tmp_path: Path, model_path: Path) -> Iterator[Box]:
    (tmp_path / "appliance.toml").write_text(CONFIG)
    settings = load_settings(tmp_path, env={})
    settings.paths.ensure()
    store = Store(settings.paths.database, backups_dir=settings.paths.backups).open()
    audit = AuditLog.from_settings(store, settings)
    models = ModelRegistry(store, settings.paths.models, audit)
    for name in NAMES:
        models.add(model_path, name, actor=cli_actor())
    yield Box(tmp_path, store, audit, models)
    store.close()


@pytest.fixture
async def closing() -> AsyncIterator[list[ModelPool]]:
    pools: list[ModelPool] = []
    yield pools
    for pool in pools:
        await pool.close()


# -- memory ---------------------------------------------------------------------------------
def test_a_models_need_is_weights_plus_kv_cache_plus_overhead() -> None:
    assert memory_need(100 * MiB, 20 * MiB) == Need(120 * MiB + OVERHEAD_BYTES, 0)
    assert memory_need(100 * MiB, 20 * MiB, n_gpu_layers=-1) == Need(OVERHEAD_BYTES, 120 * MiB)
    half = memory_need(100 * MiB, 20 * MiB, n_gpu_layers=15, block_count=29)
    assert half == Need(60 * MiB + OVERHEAD_BYTES, 60 * MiB)


def test_the_ram_budget_is_the_cap_or_a_share_of_memtotal_and_never_more_than_is_available() -> None:
    auto = MemoryBudget(0, meminfo=lambda: MemInfo(10 * GiB, 9 * GiB), nvml=NO_GPU).measure(Need(1 * GiB))
    assert (auto.ram.total_bytes, auto.ram.used_bytes, auto.ram.free_bytes) == (8 * GiB, 1 * GiB, 7 * GiB)
    tight = MemoryBudget(4096, meminfo=lambda: MemInfo(10 * GiB, 2 * GiB), nvml=NO_GPU).measure(Need(1 * GiB))
    assert (tight.ram.total_bytes, tight.ram.free_bytes) == (4 * GiB, 2 * GiB)
    assert tight.vram.to_dict() == {"total_bytes": 0, "used_bytes": 0, "free_bytes": 0} and tight.gpu is None


def test_vram_comes_from_nvml_and_a_failing_nvml_means_no_vram() -> None:
    gpu = FaultyNvml.one_gpu(free=6 * GiB, total=8 * GiB)
    seen = MemoryBudget(0, meminfo=lambda: PLENTY, nvml=gpu).measure(Need(0, 1 * GiB))
    assert (seen.vram.total_bytes, seen.vram.used_bytes, seen.vram.free_bytes) == (8 * GiB, 1 * GiB, 6 * GiB)
    lost = FaultyNvml.one_gpu(free=6 * GiB, faults={"nvmlDeviceGetMemoryInfo": fake_nvml.NVMLError_GpuIsLost})
    for nvml in (lost, FaultyNvml(driver_not_loaded=True), FaultyNvml.one_gpu(free=1, faults={"nvmlInit": OSError})):
        budget = MemoryBudget(0, meminfo=lambda: PLENTY, nvml=nvml).measure(Need())
        assert budget.vram.total_bytes == 0 and budget.gpu is None
        assert budget.ram.free_bytes == 32 * GiB


# -- loading ----------------------------------------------------------------------------------
async def test_concurrent_requests_for_a_cold_model_share_one_load(box: Box, closing: list[ModelPool]) -> None:
    pool = box.pool()
    closing.append(pool)
    engines = await asyncio.gather(*(pool.acquire("smol-b") for _ in range(6)))
    assert len({id(e) for e in engines}) == 1 and engines[0].name == "smol-b"
    assert pool.names() == ["smol-b"]
    [record] = box.system_records("model.loaded")
    assert record["model"] == "smol-b" and record["memory_bytes"] == pool.memory_bytes("smol-b")
    assert pool.memory_bytes("smol-b") == pool.used().total_bytes > 0
    events = [e async for e in engines[0].generate(GenerationRequest(max_tokens=3, prompt="Hello"))]
    assert events[-1].completion_tokens == 3  # a real engine


async def test_a_load_that_does_not_fit_says_what_it_needs_and_what_is_free(
    box: Box, closing: list[ModelPool], need_mb: int
) -> None:
    pool = box.pool(budget_mb=need_mb // 2)
    closing.append(pool)
    with pytest.raises(ModelDoesNotFit) as refused:
        await pool.acquire("smol-b")
    message = refused.value.message
    assert f"needs {need_mb} MB of RAM" in message
    assert f"only {need_mb // 2} MB of RAM is free (budget {need_mb // 2} MB" in message
    assert "no idle unpinned model can be evicted" in message
    assert refused.value.status == 503 and refused.value.code == "insufficient_memory"
    assert pool.names() == [] and box.system_records("model.loaded") == []


async def test_the_least_recently_used_idle_model_is_evicted_to_make_room(
    box: Box, closing: list[ModelPool], need_mb: int
) -> None:
    pool = box.pool(budget_mb=int(need_mb * 2.5))
    closing.append(pool)
    await pool.pin("smol-a", False, actor=cli_actor())  # the default model would be pinned
    await pool.acquire("smol-a")
    await pool.acquire("smol-b")
    pool.get("smol-a")  # smol-a used last: smol-b is the least recently used
    loaded = await pool.load("smol-c", actor=cli_actor())
    assert loaded.evicted == ["smol-b"]
    assert sorted(pool.names()) == ["smol-a", "smol-c"]
    [evicted] = box.system_records("model.unloaded")
    assert evicted["model"] == "smol-b" and evicted["reason"] == "evicted to make room for smol-c"
    admin_load = box.admin_records("models.load")[-1]
    assert admin_load["actor"]["kind"] == "cli" and admin_load["after"]["evicted"] == ["smol-b"]
    # smol-b comes back on its next request, evicting smol-a (now the least recently used)
    pool.get("smol-c")
    await pool.acquire("smol-b")
    assert sorted(pool.names()) == ["smol-b", "smol-c"]


async def test_pinned_and_busy_models_are_never_evicted(box: Box, closing: list[ModelPool], need_mb: int) -> None:
    pool = box.pool(budget_mb=int(need_mb * 2.5))
    closing.append(pool)
    await pool.acquire("smol-a")  # the default model: pinned
    engine = await pool.acquire("smol-b")
    # Greedy, so it runs to its 200 tokens: sampled at 0.8, 5 seeds in 30 stopped within 50 and
    # left smol-b idle, hence evictable, before the refusal below was asked for.
    counting = GenerationRequest(
        max_tokens=200, prompt="Count from one to a thousand: 1, 2, 3, 4, 5,", sampling=SamplingParams(temperature=0.0)
    )
    stream = engine.generate(counting)
    assert isinstance(await anext(stream), TokenEvent)  # smol-b now has an active sequence
    try:
        with pytest.raises(ModelDoesNotFit) as refused:
            await pool.acquire("smol-c")
        assert "kept: smol-a (pinned), smol-b (in use)" in refused.value.message
        with pytest.raises(Conflict, match="1 request"):
            await pool.unload("smol-b", actor=cli_actor())
    finally:
        await stream.aclose()
    await _until(lambda: engine.stats().active_sequences == 0)
    assert (await pool.load("smol-c", actor=cli_actor())).evicted == ["smol-b"]


async def test_a_recently_handed_out_engine_is_not_evicted(box: Box, closing: list[ModelPool], need_mb: int) -> None:
    pool = box.pool(budget_mb=int(need_mb * 1.5), grace=60.0)
    closing.append(pool)
    await pool.pin("smol-a", False, actor=cli_actor())
    await pool.acquire("smol-a")  # got by a request that may still be preparing
    with pytest.raises(ModelDoesNotFit, match=r"kept: smol-a \(in use\)"):
        await pool.acquire("smol-b")


async def test_an_unknown_or_disabled_model(box: Box, closing: list[ModelPool]) -> None:
    pool = box.pool(extra='[[models]]\nname = "smol-c"\nenabled = false\n')
    closing.append(pool)
    for action in (pool.load("nope", actor=cli_actor()), pool.unload("nope", actor=cli_actor()),
                   pool.pin("nope", True, actor=cli_actor())):
        with pytest.raises(ModelNotFound):
            await action
    with pytest.raises(Conflict, match="disabled"):
        await pool.load("smol-c", actor=cli_actor())


async def test_a_model_whose_file_changed_is_not_hashed_again_on_every_request(
    box: Box, closing: list[ModelPool], model_path: Path
) -> None:
    stored = Path(box.models.get("smol-b").path)
    stored.unlink()  # break the hard link first: never touch the shared model file
    data = bytearray(model_path.read_bytes())
    data[-100:] = b"\xff" * 100
    stored.write_bytes(bytes(data))
    pool = box.pool()
    closing.append(pool)
    with pytest.raises(EngineUnavailable, match="sha256 mismatch"):
        await pool.acquire("smol-b")
    assert not pool.loadable("smol-b") and pool.loadable("smol-a")
    with pytest.raises(EngineUnavailable, match="retry: appliance models load smol-b"):
        await pool.acquire("smol-b")  # refused from memory
    stored.unlink()
    stored.hardlink_to(model_path)  # the file is put back: an admin's load tries again
    assert (await pool.load("smol-b", actor=cli_actor())).engine.name == "smol-b"
    assert pool.loadable("smol-b") and "smol-b" not in pool.failures


async def test_start_loads_pinned_models_first_then_what_fits(box: Box, closing: list[ModelPool], need_mb: int) -> None:
    await box.pool().pin("smol-c", True, actor=cli_actor())
    pool = box.pool(budget_mb=int(need_mb * 2.5))
    closing.append(pool)
    await pool.start()
    assert pool.names() == ["smol-a", "smol-c"]  # both pinned; smol-b did not fit and loads on demand
    assert pool.failures == {} and pool.memory_bytes("smol-b") is not None
    assert box.system_records("model.loaded") == [] == box.admin_records("models.load")  # start-up is no change


# -- unloading and pins -------------------------------------------------------------------------
async def test_an_unpinned_model_unused_for_its_idle_time_is_unloaded(box: Box, closing: list[ModelPool]) -> None:
    pool = box.pool(extra='idle_unload_seconds = 0.3\n[[models]]\nname = "smol-c"\nidle_unload_seconds = 0\n')
    closing.append(pool)
    for name in NAMES:
        await pool.acquire(name)
    task = asyncio.create_task(pool.run_idle_unloads())
    try:
        await _until(lambda: box.system_records("model.unloaded"))
    finally:
        task.cancel()
    assert sorted(pool.names()) == ["smol-a", "smol-c"]  # smol-a pinned (the default), smol-c never
    [record] = box.system_records("model.unloaded")
    assert record["model"] == "smol-b" and record["reason"] == "idle for 0.3s"
    assert pool.idle_unload_seconds("smol-c") == 0 and pool.sweep_seconds() == 0.25


async def test_unload_refuses_a_pinned_model_and_is_idempotent(box: Box, closing: list[ModelPool]) -> None:
    pool = box.pool()
    closing.append(pool)
    await pool.acquire("smol-a")
    with pytest.raises(Conflict, match="unpin it first"):
        await pool.unload("smol-a", actor=cli_actor())
    await pool.pin("smol-a", False, actor=cli_actor())
    await pool.unload("smol-a", actor=cli_actor())
    await pool.unload("smol-a", actor=cli_actor())
    assert pool.names() == []
    assert [r["before"] for r in box.admin_records("models.unload")] == [{"loaded": True}, {"loaded": False}]


async def test_pins_default_to_the_default_model_and_survive_a_restart(box: Box) -> None:
    pool = box.pool()
    assert [pool.pinned(n) for n in NAMES] == [True, False, False]
    await pool.pin("smol-b", True, actor=cli_actor())
    await pool.pin("smol-a", False, actor=cli_actor())
    box.store.close()
    box.store = Store(box.store.path).open()
    box.audit = AuditLog.from_settings(box.store, box.settings())
    box.models = ModelRegistry(box.store, box.settings().paths.models, box.audit)
    again = box.pool()
    assert [again.pinned(n) for n in NAMES] == [False, True, False]
    records = box.admin_records("models.pin") + box.admin_records("models.unpin")
    assert [(r["target"], r["before"], r["after"]) for r in records] == [
        ("smol-b", {"pinned": False}, {"pinned": True}),
        ("smol-a", {"pinned": True}, {"pinned": False}),
    ]


async def test_a_fixed_pool_of_stand_ins_loads_and_unloads_nothing(box: Box) -> None:
    settings = box.settings("idle_unload_seconds = 0.1\n")
    pool = ModelPool(settings, box.models, Pins(box.store, box.audit), box.audit, engines=[EchoEngine("echo")],
                     on_demand=False, grace_seconds=0)
    time.sleep(0.2)
    assert await pool.unload_idle() == []
    with pytest.raises(Conflict, match="fixed set"):
        await pool.load("smol-b", actor=cli_actor())
    with pytest.raises(Conflict, match="cannot be loaded again"):
        await pool.unload("echo", actor=cli_actor())
    assert (await pool.load("echo", actor=cli_actor())).engine.name == "echo" and pool.names() == ["echo"]
    await pool.close()


# -- GPUs ---------------------------------------------------------------------------------------
async def test_a_model_on_the_gpu_counts_against_vram(box: Box, closing: list[ModelPool], need_mb: int) -> None:
    gpu = FaultyNvml.one_gpu(free=4 * GiB, total=8 * GiB)
    pool = box.pool(budget_mb=need_mb // 2, nvml=gpu)  # too little RAM for the model, but it goes to the GPU
    closing.append(pool)
    await pool.acquire("smol-b")
    used = pool.used()
    assert used.ram_bytes == OVERHEAD_BYTES and used.vram_bytes > 0
    budget = await pool.measure()
    assert budget.vram.total_bytes == 8 * GiB and budget.vram.used_bytes == used.vram_bytes
    assert budget.gpu == "NVIDIA Fake 24GB"


async def test_a_failing_nvml_leaves_the_pool_on_the_cpu(box: Box, closing: list[ModelPool]) -> None:
    lost = FaultyNvml.one_gpu(free=4 * GiB, faults={"nvmlDeviceGetName": fake_nvml.NVMLError_GpuIsLost})
    pool = box.pool(nvml=lost)
    closing.append(pool)
    engine = await pool.acquire("smol-b")
    assert engine.stats().n_gpu_layers == 0
    assert pool.used().vram_bytes == 0 and (await pool.measure()).vram.total_bytes == 0


async def _until(check: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.05)
