"""packaging/build_llama_wheel.py: one portable build, pinned, never a cached wheel built otherwise."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import llama_cpp
import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("build_llama_wheel", REPO / "packaging" / "build_llama_wheel.py")
assert _spec and _spec.loader
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


def test_the_pin_is_exact_and_installed() -> None:
    assert build.pinned_version() == llama_cpp.__version__


def test_a_pyproject_without_an_exact_pin_is_refused(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = ["llama-cpp-python>=0.3,<0.4"]\n')
    with pytest.raises(SystemExit, match="exactly"):
        build.pinned_version(pyproject)


def test_the_build_is_portable() -> None:
    args = build.cmake_args()
    assert "-DGGML_NATIVE=OFF" in args and "-DGGML_CPU_ALL_VARIANTS=ON" in args and "-DGGML_BACKEND_DL=ON" in args
    assert not any("march=native" in a or "GGML_NATIVE=ON" in a for a in args)
    # a site's own flags (a GPU backend) come after, and change the key
    gpu = build.cmake_args("-DGGML_CUDA=on")
    assert gpu[-1] == "-DGGML_CUDA=on"
    assert build.build_key("0.3.36", gpu) != build.build_key("0.3.36", args)


def test_a_wheel_built_with_other_flags_is_not_reused(tmp_path: Path) -> None:
    wheel = tmp_path / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
    wheel.write_bytes(b"PK")
    args = build.cmake_args()
    record = {"version": "0.3.36", "cmake_args": ["-DGGML_NATIVE=ON"], "wheel": wheel.name}
    (tmp_path / "build.json").write_text(json.dumps(record))
    assert build.find_built(tmp_path, "0.3.36", args) is None
    (tmp_path / "build.json").write_text(json.dumps(record | {"cmake_args": args}))
    assert build.find_built(tmp_path, "0.3.36", args) == wheel
    assert build.find_built(tmp_path, "0.3.35", args) is None
    (tmp_path / "build.json").write_text("{not json")
    assert build.find_built(tmp_path, "0.3.36", args) is None
