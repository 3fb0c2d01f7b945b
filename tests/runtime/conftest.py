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
def served_weights(model_path: str, tmp_path_factory: pytest.TempPathFactory) -> ServedWeights:  # noqa: F821
    """The default model as the appliance serves it on a CPU: split into Q4_0 and block offsets."""
    from runtime.model_file import inspect_model
    from runtime.weights import serve_weights

    served = serve_weights(inspect_model(model_path), tmp_path_factory.mktemp("encoded"))
    assert served.encoding == "q4_0_offsets" and served.adapter_path
    return served


@pytest.fixture(scope="session")
def engine(served_weights: ServedWeights) -> Iterator[LlamaEngine]:  # noqa: F821
    """Eight slots of 1024 tokens on the served weights; tests that need other limits, or the
    registered Q4_1 file itself (`weights = "original"`), build their own engine."""
    from runtime.llama_engine import LlamaEngine

    eng = LlamaEngine(
        served_weights.path, name="smol-test", slots=8, n_ctx_per_slot=1024, energy_watts=10.0, weights=served_weights
    )
    yield eng
    asyncio.run(eng.close())
