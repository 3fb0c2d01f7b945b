"""Wire types of the OpenAI-compatible API. Known OpenAI fields are accepted (and refused with
a clear message where unsupported); fields OpenAI does not define are an error."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from appliance.checks.golden import SET_NAME_PATTERN as SET_NAME
from appliance.feedback import MAX_FEEDBACK_CHARS
from appliance.feedback_promotion import CASE_ID

Temperature = Annotated[float, Meta(ge=0, le=2)]
TopP = Annotated[float, Meta(ge=0, le=1)]  # 0 keeps only the most likely token
MaxTokens = Annotated[int, Meta(ge=1, le=2**31 - 1)]
Penalty = Annotated[float, Meta(ge=-2, le=2)]


class Struct(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    pass


def unsupported(schema: dict[str, Any], why: str) -> Meta:
    """An OpenAI field decoded as usual, so that a value we do not support gets a clear
    message (`tools are not supported...`), while the OpenAPI document admits only the values
    we do support (`schema`), as clients generated from it should send."""
    return Meta(extra_json_schema=schema | {"description": why})


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
    schema: dict[str, Any]  # required here: the grammar that enforces it is built from it
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
    n: Annotated[Annotated[int, Meta(ge=1)] | None, unsupported({"maximum": 1}, "one choice per request")] = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: Annotated[dict[str, float] | None, unsupported({"maxProperties": 0}, "not supported")] = None
    logprobs: Annotated[bool | int | None, unsupported({"enum": [False, 0, None]}, "not supported")] = None


class ChatCompletionRequest(_Generation, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    response_format: ResponseFormat | None = None
    top_logprobs: Annotated[int | None, unsupported({"enum": [0, None]}, "not supported")] = None
    tools: Annotated[list[dict[str, Any]] | None, unsupported({"type": "null"}, "not supported by the local models")] = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    reasoning_effort: str | None = None
    modalities: list[str] | None = None
    service_tier: str | None = None


class CompletionRequest(_Generation, kw_only=True):
    prompt: str | Annotated[list[str], Meta(min_length=1, max_length=16)]  # streaming takes a single prompt
    echo: Annotated[bool | None, unsupported({"enum": [False, None]}, "not supported")] = None
    best_of: Annotated[int | None, unsupported({"enum": [1, None]}, "not supported")] = None
    suffix: Annotated[str | None, unsupported({"enum": ["", None]}, "not supported")] = None


class EmbeddingRequest(Struct, kw_only=True):
    model: str
    input: str | Annotated[list[str], Meta(min_length=1, max_length=256)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: None = None  # OpenAI's option; local models have one fixed size
    user: str | UnsetType = UNSET


Retention = Literal["none", "sha256", "redacted", "full"]
KeyName = Annotated[str, Meta(min_length=1, max_length=100, pattern=r"\S")]
Limit = Annotated[int, Meta(ge=1, le=2**53)]
ModelNames = Annotated[list[Annotated[str, Meta(min_length=1, max_length=64)]], Meta(max_length=256)]
# RFC 3339 (2027-06-30T12:00:00Z); UTC when it has no offset. A string checked by the handler,
# so that a bare number is refused rather than taken for seconds since the epoch.
Timestamp = Annotated[str, Meta(extra_json_schema={"format": "date-time"})]


class CreateKeyRequest(Struct, kw_only=True):
    name: KeyName
    role: Literal["admin", "operator", "auditor", "user"] = "user"
    expires_at: Timestamp | None = None
    models: ModelNames | None = None
    team: Annotated[str, Meta(min_length=1)] = "default"
    rpm: Limit | None = None
    tpm: Limit | None = None
    prompt_retention: Retention | None = None
    answer_retention: Retention | None = None


class UpdateKeyRequest(Struct, kw_only=True):
    """Fields left out stay as they are (an empty object changes nothing); null clears a
    limit, the model list, the expiry or a retention policy (the team's then applies)."""

    rpm: Limit | None | UnsetType = UNSET
    tpm: Limit | None | UnsetType = UNSET
    models: ModelNames | None | UnsetType = UNSET
    expires_at: Timestamp | None | UnsetType = UNSET
    team: Annotated[str, Meta(min_length=1)] | UnsetType = UNSET
    prompt_retention: Retention | None | UnsetType = UNSET
    answer_retention: Retention | None | UnsetType = UNSET


class RotateKeyRequest(Struct, kw_only=True):
    overlap_seconds: Annotated[float, Meta(ge=0, le=90 * 86400)] = 0.0  # how long the old secret keeps working


class CreateTeamRequest(Struct, kw_only=True):
    name: Annotated[str, Meta(min_length=1, max_length=100, pattern=r"[A-Za-z0-9]")]
    prompt_retention: Retention | None = None
    answer_retention: Retention | None = None


class UpdateTeamRequest(Struct, kw_only=True):
    """Fields left out stay as they are; null: the appliance default ([audit])."""

    prompt_retention: Retention | None | UnsetType = UNSET
    answer_retention: Retention | None | UnsetType = UNSET


class CreateBudgetRequest(Struct, kw_only=True):
    scope: Literal["key", "team"]
    scope_id: Annotated[str, Meta(min_length=1, max_length=100)]
    amount: Annotated[float, Meta(ge=0, le=1e15)]  # in tokens, a fraction is dropped
    unit: Literal["money", "tokens"] = "money"
    period: Literal["day", "month", "total"] = "month"


class EraseByKey(Struct, tag="key", tag_field="by", kw_only=True):
    """The kept prompts of one key's requests."""

    key_id: Annotated[str, Meta(min_length=1)]


class EraseByTeam(Struct, tag="team", tag_field="by", kw_only=True):
    """The kept prompts of one team's requests (its id or name)."""

    team: Annotated[str, Meta(min_length=1)]


class EraseBefore(Struct, tag="before", tag_field="by", kw_only=True):
    """The kept prompts of every request before a time."""

    before: Timestamp


EraseRequest = EraseByKey | EraseByTeam | EraseBefore


# -- feedback (appliance/feedback.py) --------------------------------------------------------
FeedbackText = Annotated[str, Meta(max_length=MAX_FEEDBACK_CHARS)]


class FeedbackRequest(Struct, kw_only=True):
    """A rating of one response, by its own id (`chatcmpl-...`, `cmpl-...`): thumbs up or down,
    or 1 to 5 stars; optionally the answer it should have been, and a comment."""

    id: Annotated[str, Meta(min_length=1, max_length=128)]
    rating: Literal["up", "down"] | Annotated[int, Meta(ge=1, le=5)]
    correction: FeedbackText | None = None
    comment: FeedbackText | None = None


class PromoteRequest(Struct, kw_only=True):
    """The golden set to add the case to (`<data>/golden/<set>.yaml`), and the case's id
    (default: the feedback's)."""

    set: Annotated[str, Meta(pattern=SET_NAME)]
    case_id: Annotated[str, Meta(pattern=CASE_ID)] | None = None
