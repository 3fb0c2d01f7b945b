"""`[runtime] cpu_variant` end to end: the server runs the named kernels and says so, refuses
kernels this CPU cannot run before loading anything, and refuses names that do not exist."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import pytest

from appliance.config import load_settings
from appliance.errors import ConfigError
from runtime.cpu import VARIANTS, detect
from tests.conftest import APPLIANCE, free_port, init_data_dir, start_server, stop_server


def test_a_named_variant_is_what_the_server_runs(tmp_path: Path, model_path: Path) -> None:
    key = init_data_dir(tmp_path, model_path)
    (tmp_path / "appliance.toml").write_text('[runtime]\ncpu_variant = "haswell"\n')
    proc, url, _ = start_server(tmp_path)
    try:
        status = httpx.get(url + "/admin/models", headers={"Authorization": f"Bearer {key}"}).json()
    finally:
        stop_server(proc)
    assert status["backend"]["variant"] == "haswell" and status["backend"]["requested"] == "haswell"
    extra = status["data"][0]["stats"]["extra"]
    assert extra["cpu_variant"] == "haswell" and extra["buffer_types"].get("CPU_REPACK", 0) > 0


def test_a_variant_this_cpu_cannot_run_stops_start_up_with_the_reason(tmp_path: Path, model_path: Path) -> None:
    unrunnable = [v for v, needs in VARIANTS.items() if not needs <= detect().features]
    if not unrunnable:
        pytest.skip("this CPU runs every variant")
    init_data_dir(tmp_path, model_path)
    (tmp_path / "appliance.toml").write_text(f'[runtime]\ncpu_variant = "{unrunnable[0]}"\n')
    proc = subprocess.run(
        [*APPLIANCE, "serve", "--data-dir", str(tmp_path), "--port", str(free_port())],
        capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")},
    )
    assert proc.returncode != 0
    assert "runtime.cpu_variant" in proc.stderr and "does not allow" in proc.stderr


def test_an_unknown_variant_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "appliance.toml").write_text('[runtime]\ncpu_variant = "pentium4"\n')
    with pytest.raises(ConfigError, match="runtime.cpu_variant: expected auto or one of x64"):
        load_settings(tmp_path, env={})
