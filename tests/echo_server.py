"""The appliance's real app and HTTP server with `EchoEngine` models: for tests that must not run
real generations (the OpenAPI conformance run sends thousands of requests).

    python -m tests.echo_server --data-dir D --port P [--model NAME ...]
"""

from __future__ import annotations

import argparse

import uvicorn

from appliance.api.app import create_app
from appliance.config import load_settings
from appliance.engine_pool import EnginePool
from appliance.logs import configure_logging
from runtime.stand_ins import EchoEngine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", action="append", default=[])
    opts = parser.parse_args()
    settings = load_settings(opts.data_dir, overrides={"server": {"port": opts.port}})
    configure_logging("warning")
    pool = EnginePool([EchoEngine(name) for name in opts.model or ["smollm2-135m-instruct"]])
    uvicorn.run(create_app(settings, pool=pool), host="127.0.0.1", port=opts.port, log_config=None, access_log=False)


if __name__ == "__main__":
    main()
