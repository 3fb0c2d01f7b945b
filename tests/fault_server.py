"""The appliance with its registered models (real llama.cpp engines) and, beside them,
`FaultyEngine`s whose faults a test sets by writing `<data>/faults/<name>.json` (read on
every request), for fallback and breaker tests:

    python -m tests.fault_server --data-dir D --port P --faulty broken --faulty slow
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn

from appliance.api.app import create_app
from appliance.config import load_settings
from appliance.logs import configure_logging
from runtime.engine import GenerationEvent, GenerationRequest
from runtime.stand_ins import FaultyEngine

KNOBS = ("fail_before", "fail_after_tokens", "mid_stream", "first_token_delay_s", "token_delay_s", "retry_after", "embed_fails", "healthy")


class ControlledFaultyEngine(FaultyEngine):
    """A `FaultyEngine` whose knobs come from a JSON file, so a test can change them live."""

    def __init__(self, name: str, control: Path) -> None:
        super().__init__(name)
        self.control = control
        self._defaults = {knob: getattr(self, knob) for knob in KNOBS}  # what a file leaves out

    def _reload(self) -> None:
        knobs: dict[str, Any] = json.loads(self.control.read_text()) if self.control.exists() else {}
        for knob in KNOBS:
            setattr(self, knob, knobs.get(knob, self._defaults[knob]))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        self._reload()
        calls = self.control.with_suffix(".calls")
        calls.write_text(str(int(calls.read_text()) + 1 if calls.exists() else 1))
        async for event in super().generate(request):
            yield event


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--faulty", action="append", default=[])
    opts = parser.parse_args()
    settings = load_settings(opts.data_dir, overrides={"server": {"port": opts.port}})
    configure_logging("info")
    faults = Path(opts.data_dir) / "faults"
    faults.mkdir(exist_ok=True)
    engines = [ControlledFaultyEngine(name, faults / f"{name}.json") for name in opts.faulty]
    uvicorn.run(create_app(settings, extra_engines=engines), host="127.0.0.1", port=opts.port, log_config=None, access_log=False)


if __name__ == "__main__":
    main()
