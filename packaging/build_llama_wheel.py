"""Build (or find already built) the llama-cpp-python wheel the appliance runs on, and print its path.

One portable build for every x86-64 machine: ggml's CPU backend is compiled once per feature
level (`GGML_CPU_ALL_VARIANTS`) as loadable modules (`GGML_BACKEND_DL`), never with
`-march=native`, and the runtime picks the variant when it starts (`runtime/cpu.py`). So a
wheel built here also runs on an older CPU, which is what the USB bundle needs.

Wheels are kept in a wheelhouse under a key made of the version and every CMake argument, and
pip's own wheel cache is bypassed: pip keys that cache by the source alone, so it would hand
back a wheel built with other flags (an old `-march=native` one with AMX, say).

    python packaging/build_llama_wheel.py [--wheelhouse DIR]

`CMAKE_ARGS` in the environment is appended to the portable flags (for example
`-DGGML_CUDA=on` on a GPU box) and is part of the key. Standard library only: this runs
before anything is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PORTABLE_ARGS = (
    "-DGGML_NATIVE=OFF",
    "-DGGML_BACKEND_DL=ON",
    "-DGGML_CPU_ALL_VARIANTS=ON",
    # Install the variant modules next to libllama, inside the package (the default is bin/).
    # Typed STRING: a PATH-typed relative value would be made absolute against the build dir.
    "-DGGML_BACKEND_DIR:STRING=llama_cpp/lib",
    "-DLLAVA_BUILD=OFF",  # multimodal projectors: not used, a fifth of the compile
)
_RECORD = "build.json"


def pinned_version(pyproject: Path = REPO / "pyproject.toml") -> str:
    """The exact llama-cpp-python version pyproject.toml pins."""
    deps = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]
    for dep in deps:
        match = re.fullmatch(r"llama-cpp-python==([\w.]+)", dep.replace(" ", ""))
        if match:
            return match.group(1)
    raise SystemExit("pyproject.toml must pin llama-cpp-python exactly (llama-cpp-python==X.Y.Z)")


def cmake_args(extra: str = "") -> list[str]:
    return [*PORTABLE_ARGS, *extra.split()]


def build_key(version: str, args: list[str]) -> str:
    return hashlib.sha256(json.dumps([version, args]).encode()).hexdigest()[:16]


def find_built(folder: Path, version: str, args: list[str]) -> Path | None:
    """The wheel in `folder` if its record says it was built from exactly `version` and `args`."""
    try:
        record = json.loads((folder / _RECORD).read_text())
    except (OSError, ValueError):
        return None
    wheel = folder / str(record.get("wheel", ""))
    if record.get("version") == version and record.get("cmake_args") == args and wheel.is_file():
        return wheel
    return None


def build(folder: Path, version: str, args: list[str], python: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CMAKE_ARGS=" ".join(args))
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        subprocess.run(
            [python, "-m", "pip", "wheel", "--disable-pip-version-check", "--no-deps", "--no-cache-dir",
             "--no-binary", "llama-cpp-python", "-w", tmp, f"llama-cpp-python=={version}"],
            env=env,
            check=True,
            stdout=sys.stderr,  # stdout carries only the wheel's path
        )
        (built,) = Path(tmp).glob("*.whl")
        wheel = folder / built.name
        shutil.move(built, wheel)
    record = {
        "version": version,
        "cmake_args": args,
        "wheel": wheel.name,
        "size_bytes": wheel.stat().st_size,
        "build_seconds": round(time.monotonic() - started, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (folder / _RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return wheel


def default_wheelhouse() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("APPLIANCE_WHEELHOUSE") or Path(cache) / "appliance" / "wheels")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheelhouse", type=Path, default=default_wheelhouse())
    parser.add_argument("--python", default=sys.executable, help="interpreter whose pip builds the wheel")
    opts = parser.parse_args(argv)
    version = pinned_version()
    args = cmake_args(os.environ.get("CMAKE_ARGS", ""))
    folder = opts.wheelhouse / f"llama-cpp-python-{version}-{build_key(version, args)}"
    wheel = find_built(folder, version, args)
    if wheel is None:
        print(f"building llama-cpp-python {version} for every x86-64 CPU (several minutes)", file=sys.stderr)
        wheel = build(folder, version, args, opts.python)
    print(wheel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
