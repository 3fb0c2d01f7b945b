"""Wire types of the OpenAI-compatible API. Known OpenAI fields are accepted (and refused with
a clear message where unsupported); fields OpenAI does not define are an error."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

Temperature = Annotated[float, Meta(ge=0, le=2)]
TopP = Annotated[float, Meta(gt=0, le=1)]
MaxTokens = Annotated[int, Meta(ge=1)]
Penalty = Annotated[float, Meta(ge=-2, le=2)]


class Struct(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    pass


class TextPart(Struct, kw_only=True):
    type: Literal["text"]
    text: str


class ChatMessage(Struct, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | UnsetType = UNSET
    tool_call_id: str | UnsetType = UNSET
    tool_calls: list[dict[str, Any]] | UnsetType = UNSET
    refusal: str | None | UnsetType = UNSET

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class JsonSchemaSpec(Struct, kw_only=True):
    name: str
    schema: dict[str, Any] | UnsetType = UNSET
    description: str | UnsetType = UNSET
    strict: bool | None | UnsetType = UNSET


class ResponseFormat(Struct, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | UnsetType = UNSET


class StreamOptions(Struct, kw_only=True):
    include_usage: bool = False


class _Generation(Struct, kw_only=True):
    model: str
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_tokens: MaxTokens | None = None
    stop: str | Annotated[list[str], Meta(max_length=4)] | None = None
    seed: int | None = None
    user: Annotated[str, Meta(max_length=256)] | UnsetType = UNSET
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Meta(ge=1)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None


class ChatCompletionRequest(_Generation, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    response_format: ResponseFormat | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    reasoning_effort: str | None = None
    modalities: list[str] | None = None
    service_tier: str | None = None


class CompletionRequest(_Generation, kw_only=True):
    prompt: str | Annotated[list[str], Meta(min_length=1, max_length=16)]
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class EmbeddingRequest(Struct, kw_only=True):
    model: str
    input: str | Annotated[list[str], Meta(min_length=1, max_length=256)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: None = None  # OpenAI's option; local models have one fixed size
    user: str | UnsetType = UNSET


class CreateKeyRequest(Struct, kw_only=True):
    name: str
    role: str = "user"
    expires_at: str | None = None
    models: list[str] | None = None
    team: str = "default"
    rpm: int | None = None
    tpm: int | None = None
    prompt_retention: str | None = None


class CreateTeamRequest(Struct, kw_only=True):
    name: str
    prompt_retention: Literal["none", "sha256", "redacted", "full"] | None = None


class CreateBudgetRequest(Struct, kw_only=True):
    scope: Literal["key", "team"]
    scope_id: str
    amount: Annotated[float, Meta(ge=0)]
    unit: Literal["money", "tokens"] = "money"
    period: Literal["day", "month", "total"] = "month"
