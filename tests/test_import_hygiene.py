"""The layers stay apart: the runtime never pulls in the web or console stacks."""

from __future__ import annotations

import subprocess
import sys


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_runtime_loads_neither_litestar_nor_textual_nor_appliance() -> None:
    mods = _loaded_after("import runtime, runtime.llama_engine, runtime.gguf_check, runtime.gpu, runtime.model_file")
    assert not {m for m in mods if m.split(".")[0] in {"litestar", "textual", "appliance", "tui", "uvicorn", "sqlite_utils"}}


def test_appliance_does_not_load_textual() -> None:
    mods = _loaded_after("import appliance.cli, appliance.api.app")
    assert "litestar" in mods
    assert not {m for m in mods if m.split(".")[0] in {"textual", "tui"}}


def test_cli_starts_without_llama_cpp() -> None:
    mods = _loaded_after("import appliance.cli")
    assert "llama_cpp" not in mods and "litestar" not in mods


def test_config_loads_neither_numpy_code_of_ours_nor_llama_cpp() -> None:
    mods = _loaded_after("import appliance.config")
    assert not {"runtime.weights", "runtime._offset_adapter", "llama_cpp", "gguf"} & mods


def test_the_cpu_choice_runs_before_anything_is_installed() -> None:
    # install.sh and `python -m runtime.cpu` need nothing but the standard library
    mods = _loaded_after("import runtime.cpu")
    assert not {m for m in mods if m.split(".")[0] in {"llama_cpp", "numpy", "gguf", "appliance"}}


def test_built_in_plugins_use_only_the_public_plugin_api() -> None:
    mods = _loaded_after("import plugins.pii_redact, plugins.prompt_guard")
    ours = {m for m in mods if m.split(".")[0] in {"appliance", "runtime", "tui"}}
    assert ours == {"appliance", "appliance.hookspecs", "appliance.redaction"}
    assert not {m for m in mods if m.split(".")[0] in {"litestar", "sqlite3", "llama_cpp"}}


def test_the_control_plane_never_imports_the_plugins_package() -> None:
    # Built-ins are found through their entry points, as third-party plugins are.
    mods = _loaded_after("import appliance.cli, appliance.api.app, appliance.plugin_manager, appliance.guardrails")
    assert not {m for m in mods if m.split(".")[0] == "plugins"}
