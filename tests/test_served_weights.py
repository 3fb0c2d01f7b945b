"""How the engine pool loads a registered model: which file (the CPU re-encoding or the file
itself), and the runtime settings it passes on."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

import appliance.engine_pool as engine_pool
from appliance.config import load_settings
from appliance.model_registry import ModelRegistry
from appliance.store import Store
from runtime.gpu import GpuInfo
from runtime.model_file import inspect_model, sha256_file
from tests.admin_helpers import ACTOR, audit_of


@pytest.fixture()
def registered(tmp_path: Path, model_path: Path):
    settings = load_settings(tmp_path, env={})
    settings.paths.ensure()
    store = Store(settings.paths.database, backups_dir=settings.paths.backups).open()
    try:
        yield settings, ModelRegistry(store, settings.paths.models, audit_of(store)).add(model_path, "smol", actor=ACTOR)
    finally:
        store.close()


def test_registration_on_a_gpu_machine_builds_no_cpu_encoding(registered, monkeypatch) -> None:
    settings, record = registered
    monkeypatch.setattr(
        engine_pool, "discover_gpus", lambda: [GpuInfo(0, "fake", None, 24 << 30, 20 << 30, None, None, None)]
    )
    assert engine_pool.prepare_weights(settings, record) is None
    assert not settings.paths.encoded_models.exists()


def test_offloaded_or_opted_out_models_load_their_own_file(registered, tmp_path: Path) -> None:
    settings, record = registered
    info = inspect_model(record.path, expected_sha256=record.sha256)
    on_gpu = engine_pool.served_weights(settings, "smol", info, on_gpu=True)
    assert (on_gpu.encoding, on_gpu.path) == ("original", info.path)
    (tmp_path / "appliance.toml").write_text('[[models]]\nname = "smol"\nweights = "original"\n')
    opted_out = engine_pool.served_weights(load_settings(tmp_path, env={}), "smol", info, on_gpu=False)
    assert (opted_out.encoding, opted_out.path) == ("original", info.path)
    on_cpu = engine_pool.served_weights(settings, "smol", info, on_gpu=False)
    assert on_cpu.encoding == "q4_0_offsets" and Path(on_cpu.path).parent == settings.paths.encoded_models.resolve()
    assert Path(on_cpu.adapter_path).parent == settings.paths.encoded_models.resolve()
    (tmp_path / "appliance.toml").write_text('[runtime]\nweights = "q8_0"\n')
    q8 = engine_pool.served_weights(load_settings(tmp_path, env={}), "smol", info, on_gpu=False)
    assert (q8.encoding, q8.adapter_path) == ("q8_0", "")


def test_draft_tokens_reach_the_engine_from_config(registered, tmp_path: Path) -> None:
    settings, record = registered
    configs = {
        '[runtime]\ndraft_tokens = 2\n[[models]]\nname = "other"\ndraft_tokens = 0\n': 2,
        '[[models]]\nname = "smol"\ndraft_tokens = 0\n': 0,
    }
    for toml, expected in configs.items():
        (tmp_path / "appliance.toml").write_text(toml)
        engine = engine_pool._load(load_settings(tmp_path, env={}), record, [])
        try:
            assert engine.stats().extra["drafts"]["max_drafts"] == expected
        finally:
            asyncio.run(engine.close())


def test_a_split_llama_cpp_refuses_at_load_falls_back_to_the_file(registered) -> None:
    settings, record = registered
    info = inspect_model(record.path, expected_sha256=record.sha256)
    split = engine_pool.served_weights(settings, "smol", info, on_gpu=False)
    assert split.encoding == "q4_0_offsets"
    # A well-formed GGUF that is no LoRA adapter, with a record that vouches for it: only
    # llama.cpp itself can tell, at load.
    adapter = Path(split.adapter_path)
    adapter.write_bytes(Path(split.path).read_bytes())
    record_file = Path(split.path).with_suffix(".json")
    meta = json.loads(record_file.read_text())
    meta["adapter_sha256"] = sha256_file(adapter)
    record_file.write_text(json.dumps(meta))
    engine = engine_pool._load(settings, record, [])
    try:
        weights = engine.stats().extra["weights"]
        assert weights["encoding"] == "original" and "did not load" in weights["note"]
        assert weights["path"] == info.path
    finally:
        asyncio.run(engine.close())
