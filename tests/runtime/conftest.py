"""Runtime fixtures: the real default model and one shared, batching engine (loaded once per session)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO_ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def model_path() -> str:
    path = Path(os.environ.get("APPLIANCE_TEST_MODEL", DEFAULT_MODEL))
    if not path.is_file():
        pytest.fail(f"test model missing at {path}: run ./install.sh first or set APPLIANCE_TEST_MODEL")
    return str(path)


@pytest.fixture(scope="session")
def engine(model_path: str) -> Iterator[LlamaEngine]:  # noqa: F821
    """Eight slots of 1024 tokens; tests that need other limits build their own engine."""
    from runtime.llama_engine import LlamaEngine

    eng = LlamaEngine(model_path, name="smol-test", slots=8, n_ctx_per_slot=1024, energy_watts=10.0)
    yield eng
    asyncio.run(eng.close())
