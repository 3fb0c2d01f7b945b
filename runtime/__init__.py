"""The data plane: runs GGUF models on llama.cpp. Knows nothing of HTTP, users or SQLite."""

from runtime.engine import (
    Embeddings,
    Engine,
    EngineHealth,
    EngineStats,
    Finished,
    GenerationEvent,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)
from runtime.errors import (
    ContextOverflow,
    EngineOverloaded,
    EngineUnavailable,
    GrammarDeadEnd,
    InvalidGenerationRequest,
    ModelFileError,
    ModelLoadError,
    RuntimeFault,
)

__all__ = [
    "ContextOverflow",
    "Embeddings",
    "Engine",
    "EngineHealth",
    "EngineOverloaded",
    "EngineStats",
    "EngineUnavailable",
    "Finished",
    "GenerationEvent",
    "GenerationRequest",
    "GrammarDeadEnd",
    "InvalidGenerationRequest",
    "ModelFileError",
    "ModelLoadError",
    "RuntimeFault",
    "SamplingParams",
    "TokenEvent",
]
