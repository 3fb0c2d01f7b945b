#!/usr/bin/env bash
# Installs llama-cpp-python's own server (the peer in bench/throughput.py) into its own
# environment, .bench-venv/, at the same llama-cpp-python version the appliance uses.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')
[[ -x .bench-venv/bin/python ]] || python3 -m venv .bench-venv
.bench-venv/bin/python -m pip install -q --disable-pip-version-check "llama-cpp-python[server]==${version}" httpx psutil
echo ".bench-venv ready with llama-cpp-python[server]==${version}"
