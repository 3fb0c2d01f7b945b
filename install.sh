#!/usr/bin/env bash
# Install the appliance from this checkout: venv, package, default model, first-run init.
#
#   ./install.sh            install for running
#   ./install.sh --dev      also install the test dependencies (.[test]) and the tests' second model
#   ./install.sh --no-init  stop before `appliance init` (container images run it at start-up)
#
# Environment: PYTHON (interpreter used to create .venv, default python3),
# APPLIANCE_DATA_DIR (data directory passed through to `appliance init`),
# CMAKE_ARGS (added to the portable llama-cpp-python build, e.g. -DGGML_CUDA=on),
# APPLIANCE_WHEELHOUSE (where built llama-cpp-python wheels are kept, default
# ~/.cache/appliance/wheels).
#
# Idempotent: a second run finds the venv, the installed package (by a stamp of
# pyproject.toml and the llama-cpp-python wheel), the verified model and the initialised
# data dir, and changes nothing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

DEV=0
INIT=1
for arg in "$@"; do
    case "$arg" in
        --dev) DEV=1 ;;
        --no-init) INIT=0 ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown option: $arg (try --help)" >&2; exit 2 ;;
    esac
done

step() { printf '==> %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

PYTHON="${PYTHON:-python3}"
VENV=".venv"
MODEL_DIR=".cache/models"
MODEL="$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"

# 1. Python >= 3.11 and a virtual environment
if [[ ! -x "$VENV/bin/python" ]]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found; install Python 3.11 or newer (or set PYTHON=/path/to/python3.11)"
    if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
        die "Python 3.11 or newer is required, but $PYTHON is $("$PYTHON" -c 'import platform; print(platform.python_version())'); set PYTHON=/path/to/python3.11"
    fi
    step "creating virtual environment in $VENV"
    "$PYTHON" -m venv "$VENV"
else
    "$VENV/bin/python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
        || die "$VENV uses Python older than 3.11; remove $VENV and run again with PYTHON=/path/to/python3.11"
    step "using existing virtual environment $VENV"
fi

# 2. llama-cpp-python, built once for every x86-64 CPU and kept in a wheelhouse keyed by its
#    version and build flags (packaging/build_llama_wheel.py); the runtime picks the CPU
#    kernels at start-up.
step "llama-cpp-python: portable build (about 7 minutes the first time, then reused)"
WHEEL="$("$VENV/bin/python" packaging/build_llama_wheel.py)" || die "building llama-cpp-python failed"

# 3. The package (skipped when pyproject.toml, the extras and the wheel are unchanged)
if [[ "$DEV" == 1 ]]; then TARGET=".[test]"; else TARGET="."; fi
STAMP="$VENV/.appliance-install-stamp"
WANT="$("$VENV/bin/python" -c 'import hashlib, sys; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest(), *sys.argv[1:])' "$TARGET" "$WHEEL")"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$VENV/bin/appliance" ]]; then
    step "appliance already installed ($TARGET)"
else
    step "installing appliance ($TARGET)"
    # Replace whatever llama-cpp-python the venv had, even at the same version: an older
    # install may have been compiled with -march=native (and AMX).
    "$VENV/bin/python" -m pip install --disable-pip-version-check --no-deps --force-reinstall "$WHEEL"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -e "$TARGET"
    printf '%s\n' "$WANT" > "$STAMP"
fi

# 4. The default model, verified by sha256 (a no-op when already present)
step "fetching the default model into $MODEL_DIR"
"$VENV/bin/python" packaging/fetch_model.py --dest "$MODEL_DIR"
if [[ "$DEV" == 1 ]]; then
    # The routing tests' second, costlier model (completion only), verified the same way.
    step "fetching Gemma 3 270M (tests) into $MODEL_DIR"
    "$VENV/bin/python" packaging/fetch_model.py --dest "$MODEL_DIR" --model gemma3-270m
fi

# 5. First-run initialisation: data dir, database, first admin key, model registration
if [[ "$INIT" == 1 ]]; then
    if [[ -n "${APPLIANCE_DATA_DIR:-}" ]]; then
        export APPLIANCE_DATA_DIR
        step "initialising the appliance in $APPLIANCE_DATA_DIR"
    else
        step "initialising the appliance in the default data directory"
    fi
    "$VENV/bin/appliance" init --model "$MODEL" --model-name smollm2-135m-instruct
fi

step "done; start the server with: $VENV/bin/appliance serve"
