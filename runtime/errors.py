"""The runtime's error tree: one root, grouped subclasses, each saying when it is raised."""

from __future__ import annotations


class RuntimeFault(Exception):
    """Root of every error the runtime raises on purpose."""


class ModelFileError(RuntimeFault):
    """A model file is missing, truncated, corrupt or not GGUF; raised before llama.cpp opens it."""


class ModelLoadError(RuntimeFault):
    """llama.cpp refused to load a file that passed validation (out of memory, unsupported architecture)."""


class InvalidGenerationRequest(RuntimeFault):
    """A generation request the engine cannot run: bad sampling values, a grammar that does not compile."""


class GrammarDeadEnd(InvalidGenerationRequest):
    """Mid-generation, the response format's grammar admits no token the model can produce
    (for example a JSON schema that demands a NUL character)."""


class ContextOverflow(RuntimeFault):
    """The prompt plus the requested completion do not fit in the slot's context window."""

    def __init__(self, message: str, *, prompt_tokens: int, limit: int) -> None:
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.limit = limit


class EngineOverloaded(RuntimeFault):
    """The engine's wait queue is full, or the request waited longer than the queue allows."""

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineUnavailable(RuntimeFault):
    """The engine is closed, failed, or cannot serve this kind of request (for example embeddings)."""
