"""The contract between the control plane and anything that runs a model."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from .errors import ContextOverflow, RuntimeFault

FinishReason = Literal["stop", "length", "cancelled", "error"]


def fit_completion(prompt_tokens: int, max_tokens: int | None, context_length: int, *, default: int) -> int:
    """The completion length to run: `max_tokens`, or when it is None `default` capped by the
    room the prompt leaves. Raises `ContextOverflow` when the prompt and the completion do not
    fit the context window: the one place that check is made."""
    if max_tokens is None:
        max_tokens = min(default, context_length - prompt_tokens)
    if max_tokens < 1 or prompt_tokens + max_tokens > context_length:
        raise ContextOverflow(
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{prompt_tokens + max(max_tokens, 1)} tokens ({prompt_tokens} in the prompt, {max(max_tokens, 1)} in the "
            "completion). Please reduce the length of the messages or completion.",
            prompt_tokens=prompt_tokens,
            limit=context_length,
        )
    return max_tokens


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-sequence sampling settings. Zero temperature means greedy decoding."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    grammar: str | None = None  # GBNF text, used for response_format


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation. Exactly one of `prompt` and `messages` is set.

    `messages` are OpenAI-style chat messages; the engine renders them with the
    model's own chat template. `tokens`, when set, is that prompt as `Engine.tokens_for`
    already rendered and tokenised it, so the engine does not do it again.
    """

    max_tokens: int
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    request_id: str = ""
    tokens: tuple[int, ...] = ()
    # The API's response_format ({"type": "json_object"} or {"type": "json_schema", "schema": ...}):
    # local engines enforce `sampling.grammar` built from it; remote ones pass it on.
    response_format: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """A piece of generated text; `text` may be empty while a multi-byte character is incomplete."""

    text: str


@dataclass(frozen=True, slots=True)
class Finished:
    """The last event of every stream."""

    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0
    energy_joules: float = 0.0
    error: RuntimeFault | None = None  # why, when `reason` is "error"


GenerationEvent = TokenEvent | Finished


@dataclass(frozen=True, slots=True)
class Embeddings:
    vectors: list[list[float]]
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class EngineHealth:
    ok: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class EngineStats:
    model: str
    slots: int
    active_sequences: int
    queue_depth: int
    queue_limit: int
    kv_cells_used: int
    kv_cells_total: int
    tokens_generated: int
    requests_served: int
    n_gpu_layers: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Engine(Protocol):
    """Runs one model. Implementations are safe to call from one asyncio event loop."""

    name: str
    context_length: int

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Stream token events, ending with exactly one `Finished`.

        Raises `ContextOverflow`, `EngineOverloaded`, `InvalidGenerationRequest` or
        `EngineUnavailable` before the first event. Closing the iterator early
        (client disconnect) cancels the sequence and frees its resources at once.
        """
        ...

    async def embed(self, texts: list[str]) -> Embeddings:
        """Return one normalised vector per text. Raises `EngineUnavailable` if unsupported."""
        ...

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]: ...

    def count_chat_tokens(self, messages: list[dict[str, Any]]) -> int:
        """Prompt tokens the messages take once rendered with the chat template."""
        ...

    def tokens_for(self, request: GenerationRequest) -> list[int]:
        """The request's prompt as the model sees it (chat template rendered, tokenised). Pure
        CPU work that may take a while on a long prompt; safe to run on any thread. Raises
        `InvalidGenerationRequest` for a request with neither or both of prompt and messages."""
        ...

    @property
    def served_files(self) -> dict[str, str] | None:
        """What exactly answers, for the audit log: encoding and sha256 of each file loaded
        (None for engines without model files)."""
        ...

    def health(self) -> EngineHealth: ...

    def stats(self) -> EngineStats: ...

    async def close(self) -> None:
        """Stop accepting work, cancel what is running and free the model."""
        ...
