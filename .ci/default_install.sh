#!/usr/bin/env bash
# The README's first command, `./install.sh && .venv/bin/appliance serve`, in a fresh clone:
# no test extras get installed, and the default model is served on the split weights (the
# fast path) as GET /admin/models reports it. The llama-cpp-python wheel comes from the
# wheelhouse the test install filled.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
server=""
cleanup() { [[ -n "$server" ]] && kill "$server" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

git clone -q "$here" "$work/clone"
cd "$work/clone"
export APPLIANCE_DATA_DIR="$work/data"
export APPLIANCE_SERVER_PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"

./install.sh > "$work/install.log" 2>&1 || { cat "$work/install.log"; exit 1; }
key="$(grep -A1 'First admin key' "$work/install.log" | tail -n 1 | tr -d ' ')"
if .venv/bin/python -c 'import pytest' 2>/dev/null; then
    echo "default install: the test extras were installed" >&2; exit 1
fi

.venv/bin/appliance serve > "$work/serve.log" 2>&1 &
server=$!
url="http://127.0.0.1:$APPLIANCE_SERVER_PORT"
for _ in $(seq 1 300); do
    curl -fsS "$url/readyz" >/dev/null 2>&1 && break
    kill -0 "$server" 2>/dev/null || { cat "$work/serve.log"; exit 1; }
    sleep 0.2
done
curl -fsS -H "Authorization: Bearer $key" "$url/admin/models" > "$work/models.json" || { cat "$work/serve.log"; exit 1; }
.venv/bin/python - "$work/models.json" <<'PY'
import json, sys
models = json.load(open(sys.argv[1]))["data"]
default = next(m for m in models if m["name"] == "smollm2-135m-instruct")
extra = default["stats"]["extra"]
weights = extra["weights"]
assert weights["encoding"] == "q4_0_offsets", f"default install serves {weights['encoding']}: {weights['note']}"
assert extra["buffer_types"].get("CPU_REPACK"), extra["buffer_types"]
print(f"default install: serves {weights['encoding']} on the {extra['cpu_variant']} CPU variant, "
      f"buffers {extra['buffer_types']}")
PY
