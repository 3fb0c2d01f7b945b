"""Wire types of the API's responses, so that the OpenAPI document says exactly what is sent
(client generators and the console's typed client rely on it), and the error responses each
route documents."""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from litestar.openapi.datastructures import ResponseSpec
from msgspec import UNSET, UnsetType


class Out(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A response body. Fields that are UNSET are left out."""


# -- errors ---------------------------------------------------------------------------------
class ErrorDetail(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(msgspec.Struct, kw_only=True):
    """OpenAI's error shape."""

    error: ErrorDetail


_ERRORS = {
    400: "The request is malformed or asks for something this server does not do.",
    401: "No API key, or an unknown, revoked or expired one.",
    403: "The key's role may not use this endpoint, or the Host is not allowed.",
    404: "The resource does not exist, or the key may not see it.",
    409: "The resource exists already, or is in a state that forbids the change.",
    413: "The request body is larger than the server accepts.",
    429: "A rate limit or budget was reached, or too many failed authentication attempts; see Retry-After.",
    503: "The model or the audit log cannot serve the request now; see Retry-After.",
}
AUTHENTICATED = (401, 403, 429)  # every route but the health probes


def error_response_schema(status: int) -> dict[str, Any]:
    """The OpenAPI response object of `status`, as litestar renders an `errors(...)` entry."""
    schema = {"$ref": "#/components/schemas/ErrorResponse"}
    return {"description": _ERRORS[status], "content": {"application/json": {"schema": schema}}}


def errors(*statuses: int) -> dict[int, ResponseSpec]:
    """Error responses in the OpenAI shape for `statuses`, plus those every authenticated
    route can return. Each overrides litestar's own 400 schema, which we never send."""
    return {
        s: ResponseSpec(data_container=ErrorResponse, description=_ERRORS[s], generate_examples=False)
        for s in sorted({*statuses, *AUTHENTICATED, 400})
    }


# -- OpenAI-compatible ----------------------------------------------------------------------
class PromptTokensDetails(Out):
    cached_tokens: int


class Usage(Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(Out):
    role: Literal["assistant"]
    content: str


class ChatChoice(Out):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(Out):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(Out):
    index: int
    text: str
    logprobs: None
    finish_reason: Literal["stop", "length"]


class Completion(Out):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class Embedding(Out):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # a list of floats, or little-endian float32 in base64


class EmbeddingUsage(Out):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(Out):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class Model(Out):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(Out):
    object: Literal["list"]
    data: list[Model]


# -- health ---------------------------------------------------------------------------------
class Liveness(Out):
    status: Literal["ok"]


class Readiness(Out):
    status: Literal["ready", "not ready"]
    models: dict[str, bool]  # loaded models: whether each is healthy
    loadable: list[str] = msgspec.field(default_factory=list)  # not loaded, but a request would load them
    reasons: list[str] = msgspec.field(default_factory=list)  # why it is not ready


# -- keys, teams, budgets, usage ------------------------------------------------------------
class KeyInfo(Out):
    id: str
    name: str
    role: Literal["admin", "operator", "auditor", "user"]
    status: Literal["active", "expired", "revoked"]
    expiring: bool
    created_at: str
    expires_at: str | None
    revoked_at: str | None
    rotated_at: str | None
    previous_secret_valid_until: str | None
    models: list[str] | None
    team: str
    rpm: int | None
    tpm: int | None
    prompt_retention: str | None
    answer_retention: str | None


class NewKey(KeyInfo):
    key: str  # the secret, shown this once


class KeyList(Out):
    object: Literal["list"]
    data: list[KeyInfo]


class TeamInfo(Out):
    id: str
    name: str
    prompt_retention: str | None
    answer_retention: str | None
    created_at: str
    keys: int


class TeamList(Out):
    object: Literal["list"]
    data: list[TeamInfo]


class BudgetInfo(Out):
    id: int
    scope: Literal["key", "team"]
    scope_id: str
    unit: Literal["money", "tokens"]
    amount: float
    period: Literal["day", "month", "total"]
    created_at: str
    spent: float | UnsetType = UNSET
    in_flight: float | UnsetType = UNSET
    remaining: float | UnsetType = UNSET
    resets_at: str | None | UnsetType = UNSET


class BudgetList(Out):
    object: Literal["list"]
    data: list[BudgetInfo]


class UsageRow(Out):
    """One group; exactly one of `key`, `team`, `model` and `day` names it (the report's `by`)."""

    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    tokens: int
    energy_j: float
    compute_ms: float
    cost: float
    unbilled_cost: float
    key: str | UnsetType = UNSET
    team: str | UnsetType = UNSET
    model: str | None | UnsetType = UNSET
    day: str | UnsetType = UNSET


class UsageReport(Out):
    object: Literal["list"]
    by: Literal["key", "team", "model", "day"]
    data: list[UsageRow]


# -- audit ----------------------------------------------------------------------------------
class AuditRecordOut(Out):
    idx: int
    ts: str
    ts_epoch: float
    kind: Literal["request", "admin", "security", "system"]
    key_id: str | None
    team_id: str | None
    body: dict[str, Any]
    prev_hash: str
    hash: str
    content: dict[str, str] | UnsetType = UNSET
    content_erased_at: str | UnsetType = UNSET


class AuditList(Out):
    object: Literal["list"]
    data: list[AuditRecordOut]


class VerifyReportOut(Out):
    ok: bool
    records_checked: int
    checkpoints_checked: int
    first_bad_index: int | None
    problem: str | None
    last_index: int
    last_hash: str
    content_checked: int
    content_erased: int


class CheckpointOut(Out):
    index: int
    hash: str
    time: float
    signature: str
    public_key: str


class ErasureOut(Out):
    erased: int  # records whose kept text was removed
    record: int  # idx of the admin record of the erasure


# -- models (operator) ----------------------------------------------------------------------
class EngineHealthOut(Out):
    ok: bool
    detail: str


class EngineStatsOut(Out):
    model: str
    slots: int
    active_sequences: int
    queue_depth: int
    queue_limit: int
    kv_cells_used: int
    kv_cells_total: int
    tokens_generated: int
    requests_served: int
    n_gpu_layers: int
    extra: dict[str, Any]


class BreakerOut(Out):
    """A candidate's circuit breaker (appliance/routing/breakers.py)."""

    state: str  # closed, open or half_open
    recent_failures: int
    last_error: str | None
    times_opened: int
    seconds_since_change: float
    half_open_in_seconds: float


class ModelStatus(Out):
    name: str
    path: str
    sha256: str
    size_bytes: int
    architecture: str | None
    parameter_count: int | None
    quantization: str | None
    context_length: int | None
    block_count: int | None
    has_chat_template: bool
    added_at: float
    loaded: bool
    loading: bool
    pinned: bool  # never unloaded for idleness nor evicted
    memory_bytes: int | None  # what it takes resident (not resident: what it took when last planned)
    last_used: float | None  # when a request last got its engine (seconds since the epoch); None: not resident
    idle_unload_seconds: float  # unloaded after this long unused, unless pinned; 0 = never
    breaker: BreakerOut  # routes skip the model while it is open
    health: EngineHealthOut | UnsetType = UNSET
    stats: EngineStatsOut | UnsetType = UNSET
    error: str | UnsetType = UNSET


class MemoryOut(Out):
    """Bytes of one kind of memory: the pool's budget, what its models take, what is free."""

    total_bytes: int
    used_bytes: int
    free_bytes: int


class BudgetOut(Out):
    ram: MemoryOut
    vram: MemoryOut  # all zero without a GPU
    gpu: str | None  # the GPU models are placed on


class ModelStatusList(Out):
    object: Literal["list"]
    data: list[ModelStatus]
    budget: BudgetOut
    backend: dict[str, Any] | None


class ModelChange(Out):
    """The outcome of `POST /admin/models/{name}/load|unload|pin|unpin`."""

    name: str
    action: Literal["load", "unload", "pin", "unpin"]
    loaded: bool
    pinned: bool
    memory_bytes: int | None
    evicted: list[str]  # models unloaded to make room for this one
    message: str


# -- plugins (admin) ------------------------------------------------------------------------
class PluginInfo(Out):
    """A plugin as the host holds it. `status`: active, disabled (by config or an admin),
    failed (a hook raised or ran over; see `last_error`), refused (not loaded)."""

    name: str
    version: str
    source: str  # "built-in", or the distribution it came from
    hooks: list[str]
    enabled: bool
    status: Literal["active", "disabled", "failed", "refused"]
    last_error: str | None
    fail: Literal["open", "closed", "default"]
    timeout_seconds: float
    order: int
    streaming: Literal["blocking", "along", "cannot"]
    observer_values_dropped: int
    admin_routes: list[str]
    checks: list[str]
    alert_channels: list[str]


class PluginList(Out):
    object: Literal["list"]
    hookspec: str
    data: list[PluginInfo]


# -- feedback -------------------------------------------------------------------------------
Kept = Literal["full", "redacted", "sha256", "none", "erased", "absent"]


class FeedbackOut(Out):
    """Stored feedback. `score` runs 0..1: down 0, up 1, n stars (n-1)/4."""

    id: str
    object: Literal["feedback"]
    response_id: str
    rating: Literal["up", "down"] | int
    score: float
    created_at: str


class FeedbackKept(Out):
    """What the audit log holds of each text: the kept text (`full`, `redacted`), a digest only
    (`sha256`), nothing (`none`), text since erased (`erased`), or none was given (`absent`)."""

    prompt: Kept
    answer: Kept
    correction: Kept
    comment: Kept


class FeedbackInfo(FeedbackOut):
    request_idx: int  # the audit record of the request rated
    audit_idx: int | None  # the audit record of the feedback itself
    key_id: str | None  # who gave it
    team_id: str | None
    model: str | None  # the model that served the response
    kind: str | None  # chat | completion
    current: bool  # the newest feedback on its response: the response's rating
    correction: str | None
    comment: str | None
    kept: FeedbackKept
    promoted_to: str | None  # the golden set it became a case of


class FeedbackList(Out):
    object: Literal["list"]
    data: list[FeedbackInfo]


class PromotionOut(Out):
    feedback_id: str
    set: str
    case_id: str
    path: str  # the golden-set file written
    case: dict[str, Any]
