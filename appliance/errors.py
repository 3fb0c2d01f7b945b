"""The control plane's error tree. Each class carries its HTTP status and OpenAI error code;
the HTTP layer and the CLI translate them in one place each."""

from __future__ import annotations

import math
from typing import ClassVar


class ApplianceError(Exception):
    """Root of every error the control plane raises on purpose."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    @property
    def headers(self) -> dict[str, str]:
        return {}


class ConfigError(ApplianceError):
    """The config file, an environment override or a CLI flag has a bad value."""


class AuditError(ApplianceError):
    """The audit log, its signing key or a checkpoint file cannot be read or used."""


class StoreError(ApplianceError):
    """The database cannot be opened, migrated or written."""


class SchemaTooNewError(StoreError):
    """The database was written by a newer version of the appliance; it is left untouched."""


class InvalidRequest(ApplianceError):
    """Malformed JSON, wrong types or values the API cannot accept."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_request_error"


class PolicyViolation(InvalidRequest):
    """A plugin's policy refused the request or its answer; the message names the rule, never
    what matched."""

    code = "policy_violation"


class ContextLengthExceeded(InvalidRequest):
    """The prompt plus the requested completion do not fit the model's context window."""

    code = "context_length_exceeded"


class AuthenticationFailed(ApplianceError):
    """No key, an unknown, revoked or expired key. `reason` is one of "missing", "invalid",
    "revoked", "expired" (counted per client address, never shown with the key)."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def __init__(self, message: str, *, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


class PermissionDenied(ApplianceError):
    """The key is valid but its role may not use this endpoint."""

    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class NotFound(ApplianceError):
    """A route, key or other resource does not exist."""

    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    """The model does not exist, is not loaded, or the key may not use it."""

    code = "model_not_found"


class Conflict(ApplianceError):
    """The resource already exists, or is in a state that forbids the change."""

    status = 409
    type = "invalid_request_error"
    code = "conflict"


class RequestTooLarge(ApplianceError):
    """The request body is over the configured limit."""

    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(ApplianceError):
    """The key is over its requests-per-minute or tokens-per-minute limit."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float, limit_headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.limit_headers = limit_headers or {}

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))} | self.limit_headers


class QuotaExceeded(ApplianceError):
    """A key or team budget cannot cover the request's worst-case cost."""

    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))} if self.retry_after else {}


class Overloaded(ApplianceError):
    """Every candidate engine is busy; the client should retry after `retry_after` seconds."""

    status = 503
    type = "server_error"
    code = "overloaded"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class ServiceUnavailable(ApplianceError):
    """The service cannot serve the request right now (no model loaded, shutting down)."""

    status = 503
    type = "server_error"
    code = "service_unavailable"

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": "5"}


class ModelDoesNotFit(ServiceUnavailable):
    """Loading the model would take more memory than the pool's budget has free, even after
    evicting every idle unpinned model; the message says what it needs and what is free (MB)."""

    code = "insufficient_memory"


class AuditUnavailable(ServiceUnavailable):
    """The audit record could not be committed, so the request is refused (fail closed)."""

    code = "audit_unavailable"


class GuardrailUnavailable(ServiceUnavailable):
    """A guardrail plugin that fails closed has failed, so the requests it would judge are
    refused until it works again (an admin re-enables it)."""

    code = "guardrail_unavailable"

    def __init__(self, plugin: str) -> None:
        super().__init__(
            f"The '{plugin}' guardrail is unavailable, and requests it would check are refused until an admin "
            "re-enables it (appliance plugins enable)."
        )
        self.plugin = plugin
