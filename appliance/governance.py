"""The governed part of every API request: admission (rate limits, then a budget reservation
of the worst case) before any compute, and afterwards one durable write holding the usage
record and the audit record together, followed by settlement of the reservation.

`RequestContext` travels with the request (the audit middleware creates it, handlers fill it
in); `Governance.complete` is called exactly once per request, also on client disconnect."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from appliance.audit import AuditLog
from appliance.audit.retention import Retained, resolve_policy, retain
from appliance.auth import Principal
from appliance.checks.features import looks_like_refusal, script_of
from appliance.config import Settings
from appliance.errors import AuditUnavailable, StoreError
from appliance.metering import BudgetService, CostModel, RateHeaders, RateLimiter, Reservation, UsageRecord, insert_fn
from appliance.redaction import scrub_keys
from appliance.store import Store
from appliance.work import WorkPool
from runtime.engine import Finished

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # the status recorded for a client that went away mid-response (nginx's code)


@dataclass(slots=True)
class Admission:
    """What admission granted: the reservation to settle and the tokens charged up front."""

    model: str
    reservation: Reservation | None  # None when governance is switched off
    rate: RateHeaders
    charged_tokens: int
    prompt_tokens: int

    @property
    def headers(self) -> dict[str, str]:
        return self.rate.as_dict()


@dataclass(slots=True)
class RequestContext:
    """Everything the audit record and the usage record need, gathered along the request."""

    request_id: str
    route: str
    client: str
    started: float = field(default_factory=time.perf_counter)
    principal: Principal | None = None
    models_tried: list[str] = field(default_factory=list)
    model: str | None = None
    prompt_text: str | None = None
    user: str | None = None
    admission: Admission | None = None
    finished: Finished | None = None
    streamed_tokens: int = 0  # tokens already sent, for a stream cut short
    error_code: str | None = None
    weights: dict[str, str] | None = None  # the files that served it: encoding and sha256s
    route_trail: str | None = None
    recorded: bool = False  # an admin change wrote this request's record in its own transaction
    auth_failed: bool = False  # counted by auth.failures, not recorded one by one
    used_tokens: int = 0  # what metering charged, for the rate limiter's refund
    completed: bool = False
    plugin_notes: dict[str, Any] | None = None  # what prepare_request/check_response plugins noted
    guardrails: dict[str, str] | None = None  # per check_response plugin: passed, rejected, not run...
    audit_text: str | None = None  # a plugin's stand-in for prompt_text in kept text
    kind: str = ""  # chat | completion | embeddings; "" for the rest of the API
    response_id: str | None = None  # the response's own id (chatcmpl-..., cmpl-...)
    first_token_at: float | None = None  # perf_counter when the first token was produced
    answer_text: str | None = None  # the answer, for retention, features and feedback


class Governance:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        audit: AuditLog,
        costs: CostModel,
        budgets: BudgetService,
        limiter: RateLimiter,
        *,
        enabled: bool = True,
        work: WorkPool | None = None,
    ) -> None:
        """`enabled=False` skips admission and recording; only the gateway benchmark uses it,
        to measure what governance costs against the same app without it."""
        self.enabled = enabled
        self._settings = settings
        self._store = store
        self.audit = audit
        self.costs = costs
        self.budgets = budgets
        self.limiter = limiter
        self._detached: set[asyncio.Task[None]] = set()
        self._work = work or WorkPool(2)
        # Called with each usage record (a dict) once it is committed (plugins' on_usage); quick only.
        self.usage_listeners: list[Callable[[dict[str, Any]], None]] = []
        # Called on the loop with each request's context and status once its records are
        # committed (metrics); quick only.
        self.request_listeners: list[Callable[[RequestContext, int], None]] = []

    def keeps_text(self, principal: Principal) -> bool:
        """Whether the audit log keeps this principal's prompt text (policy redacted or full)."""
        policy = resolve_policy(principal.prompt_retention, None, self._settings.audit.default_prompt_retention)
        return policy in ("redacted", "full")

    # -- before compute ---------------------------------------------------------------------
    def admit(
        self, ctx: RequestContext, principal: Principal, model: str, prompt_tokens: int, max_tokens: int,
        *, models: list[str] | None = None,
    ) -> Admission:
        """Check the key's rate limits, then reserve the worst case against every budget: the
        dearest of `models` (the candidates a fallback may still reach), default `model`.

        Raises `RateLimited` or `QuotaExceeded` (429) before any compute is spent.
        """
        ctx.principal = principal
        tokens = prompt_tokens + max_tokens
        if not self.enabled:
            ctx.admission = Admission(model, None, RateHeaders(), tokens, prompt_tokens)
            return ctx.admission
        rate = self.limiter.check(principal.key_id, principal.rpm, principal.tpm, tokens)
        worst = max(self.costs.worst_case(m, prompt_tokens, max_tokens) for m in (models or [model]))
        try:
            reservation = self.budgets.reserve(principal.key_id, principal.team_id, cost=worst, tokens=tokens)
        except BaseException:
            self.limiter.refund(principal.key_id, tokens)
            raise
        ctx.admission = Admission(model, reservation, rate, tokens, prompt_tokens)
        return ctx.admission

    # -- after the response is produced ------------------------------------------------------
    async def complete(self, ctx: RequestContext, status: int) -> None:
        """Commit the usage and audit records in one transaction, then settle.

        Raises `AuditUnavailable` when the records cannot be committed; the reservation is then
        released so the ledger keeps matching the usage table.
        """
        (await self.record(ctx, status))()

    async def record(self, ctx: RequestContext, status: int) -> Callable[[], None]:
        """`complete` in two steps: commit the records (built off the event loop when retention
        may redact megabytes of prompt), and return the settlement (budgets, the rate limiter's
        refund, the request listeners), for the caller to run once the response is on its way,
        so the client does not wait for it. The settlement must be called, once, without an
        await between it and sending the response. Raises as `complete` does."""
        if ctx.completed:
            return _nothing
        ctx.completed = True  # first, so a disconnect while this waits cannot record twice
        if not self.enabled or (ctx.recorded and status < 400) or (ctx.auth_failed and ctx.principal is None):
            self._release(ctx)
            return _nothing
        try:
            chars = len(ctx.prompt_text or "") + len(ctx.audit_text or "") + len(ctx.answer_text or "")
            job, settle = await self._work.run_for(chars, self._prepare, ctx, status)
            await self._store.write(job)
        except (StoreError, OSError) as exc:
            self._release(ctx)
            raise AuditUnavailable(f"the audit record could not be written: {exc}") from exc
        except BaseException:
            self._release(ctx)
            raise

        def settlement() -> None:
            try:
                settle()
                for listener in self.request_listeners:
                    listener(ctx, status)
            finally:
                self._release(ctx)

        return settlement

    def complete_nowait(self, ctx: RequestContext, status: int) -> None:
        """For a request whose client is gone: the same write, not waited on."""
        if ctx.completed:
            return
        task = asyncio.get_running_loop().create_task(self._complete_detached(ctx, status))
        self._detached.add(task)
        task.add_done_callback(self._detached.discard)

    async def _complete_detached(self, ctx: RequestContext, status: int) -> None:
        try:
            await self.complete(ctx, status)
        except Exception as exc:  # nobody is waiting: log it, never raise into the loop
            log.error("request %s could not be recorded: %s", ctx.request_id, exc)

    async def drain(self) -> None:
        """Wait for the records of requests whose clients went away (at shutdown)."""
        if self._detached:
            await asyncio.gather(*list(self._detached), return_exceptions=True)

    def _prepare(self, ctx: RequestContext, status: int) -> tuple[Callable[[Any], Any], Callable[[], None]]:
        now = time.time()
        usage = self._usage(ctx, status, now)
        body, content = self._audit_body(ctx, status, usage)
        p = ctx.principal
        audit_fn = self.audit.append_fn(
            "request", body, key_id=p.key_id if p else None, team_id=p.team_id if p else None, ts=now, content=content
        )
        if ctx.response_id is not None and status < 400:  # a refused request's id never reached its client
            audit_fn = _indexed(audit_fn, ctx.response_id)
        if usage is None:
            return audit_fn, lambda: None
        record, bill = usage
        usage_fn = insert_fn(record)
        if self.usage_listeners:
            insert, listeners = usage_fn, list(self.usage_listeners)

            def usage_fn(conn: Any) -> None:
                insert(conn)
                self._store.after_commit(lambda: _tell(listeners, asdict(record)))

        admission = ctx.admission
        assert admission is not None

        def settle() -> None:
            self.budgets.settle(admission.reservation, cost=bill.cost, tokens=bill.tokens, ts=record.ts)

        return (lambda conn: (usage_fn(conn), audit_fn(conn))), settle

    def _release(self, ctx: RequestContext) -> None:
        admission = ctx.admission
        if admission is None or admission.reservation is None:
            return
        self.budgets.release(admission.reservation)  # no-op once settled
        # What metering charged stays charged, a stream cut short included (its tokens were
        # computed); only the unused rest of the worst case goes back.
        self.limiter.refund(ctx.principal.key_id if ctx.principal else "", admission.charged_tokens - ctx.used_tokens)

    def _usage(self, ctx: RequestContext, status: int, now: float) -> tuple[UsageRecord, Any] | None:
        admission, p = ctx.admission, ctx.principal
        if admission is None or admission.reservation is None or p is None:
            return None
        if ctx.finished is None and ctx.streamed_tokens == 0 and status != CLIENT_CLOSED:
            return None  # refused before any compute (overload, engine error): nothing to charge
        model = admission.model
        f = ctx.finished
        if f is not None:
            prompt, completion, cached = f.prompt_tokens, f.completion_tokens, f.cached_tokens
            queue_s, compute_s, energy = f.queue_seconds, f.compute_seconds, f.energy_joules
            self.costs.observe(model, tokens=prompt - cached + completion, compute_seconds=compute_s)
        else:
            # Cut short before the engine reported: estimate from what was streamed.
            prompt, completion, cached = admission.prompt_tokens, ctx.streamed_tokens, 0
            queue_s = 0.0
            compute_s = self.costs.seconds_per_token(model) * (prompt + completion)
            energy = compute_s * self.costs.watts()
        measured = self.costs.actual(
            model, prompt_tokens=prompt, completion_tokens=completion, energy_joules=energy, compute_seconds=compute_s
        )
        bill = admission.reservation.bill(cost=measured, tokens=prompt + completion)
        ctx.used_tokens = prompt + completion
        record = UsageRecord(
            request_id=ctx.request_id,
            ts=now,
            key_id=p.key_id,
            team_id=p.team_id,
            model=model,
            status=status,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=cached,
            queue_ms=queue_s * 1000,
            compute_ms=compute_s * 1000,
            energy_j=energy,
            cost=bill.cost,
            unbilled_cost=bill.unbilled_cost,
            unbilled_tokens=bill.unbilled_tokens,
        )
        return record, bill

    def _audit_body(
        self, ctx: RequestContext, status: int, usage: tuple[UsageRecord, Any] | None
    ) -> tuple[dict[str, Any], dict[str, str] | None]:
        """The request record's body, and the kept text to store beside it (if any)."""
        p = ctx.principal
        principal = {"key_id": p.key_id, "key_name": p.name, "team": p.team_id, "role": str(p.role)} if p else None
        if status == CLIENT_CLOSED or (ctx.finished is not None and ctx.finished.reason == "cancelled"):
            outcome = "cancelled"
        else:
            failed = (ctx.finished is not None and ctx.finished.reason == "error") or ctx.error_code is not None
            outcome = "ok" if status < 400 and not failed else "error"
        record = usage[0] if usage else None
        body: dict[str, Any] = {
            "request_id": ctx.request_id,
            "principal": principal,
            "route": ctx.route,
            "models_tried": ctx.models_tried,
            "model": ctx.model,
            "outcome": outcome,
            "status": status,
            "tokens": {
                "prompt": record.prompt_tokens if record else 0,
                "completion": record.completion_tokens if record else 0,
                "cached": record.cached_tokens if record else 0,
            },
            "cost": record.cost if record else 0.0,
            "latency_ms": round((time.perf_counter() - ctx.started) * 1000, 3),
            "client": ctx.client,
            "user": ctx.user,
        }
        if ctx.error_code:
            body["error"] = ctx.error_code
        if ctx.kind:
            body["kind"] = ctx.kind
        if ctx.response_id is not None:
            body["response_id"] = ctx.response_id
        if ctx.finished is not None and ctx.kind != "embeddings":
            body["finish_reason"] = ctx.finished.reason
        features = request_features(ctx)
        if features:
            body["features"] = features
        if ctx.weights is not None:
            body["weights"] = ctx.weights
        if ctx.route_trail is not None:
            body["route_trail"] = ctx.route_trail
        if ctx.plugin_notes:
            body["plugins"] = ctx.plugin_notes
        if ctx.guardrails:
            body["guardrails"] = ctx.guardrails
        content: dict[str, str] = {}
        audit = self._settings.audit
        if ctx.prompt_text is not None and p is not None:
            policy = resolve_policy(p.prompt_retention, None, audit.default_prompt_retention)
            text = ctx.audit_text if ctx.audit_text is not None and policy in ("redacted", "full") else ctx.prompt_text
            kept = _retain(policy, text, audit.max_kept_prompt_chars)
            if kept is not None:
                body["prompt"] = kept.digest
                if kept.text is not None:
                    content["prompt"] = kept.text
        if ctx.answer_text is not None and p is not None:
            policy = resolve_policy(p.answer_retention, None, audit.default_answer_retention)
            kept = _retain(policy, ctx.answer_text, audit.max_kept_answer_chars)
            if kept is not None:
                body["answer"] = kept.digest
                if kept.text is not None:
                    content["answer"] = kept.text
        return body, content or None


def request_features(ctx: RequestContext) -> dict[str, Any]:
    """What drift is measured on, kept whatever the retention policy (appliance/checks/features.py)."""
    features: dict[str, Any] = {}
    if ctx.prompt_text is not None:
        features["script"] = script_of(ctx.prompt_text)
    if ctx.answer_text is not None:
        features["refusal"] = looks_like_refusal(ctx.answer_text)
    if ctx.first_token_at is not None:
        features["ttft_ms"] = round((ctx.first_token_at - ctx.started) * 1000, 3)
    return features


def _retain(policy: str, text: str, limit: int) -> Retained | None:
    """`retain`, with API-key-shaped strings scrubbed from kept text first: the audit log
    scrubs them from what it stores, and the digest must be of what is stored."""
    return retain(policy, scrub_keys(text) if policy in ("redacted", "full") else text, limit=limit)


def _indexed(append: Callable[[Any], int], response_id: str) -> Callable[[Any], int]:
    """`append` that also files the record under the response's own id (`audit_responses`), in
    the same transaction, so feedback finds the request's record by that id at once."""

    def write(conn: Any) -> int:
        idx = append(conn)
        conn.execute("INSERT INTO audit_responses (response_id, idx) VALUES (?, ?)", (response_id, idx))
        return idx

    return write


def _nothing() -> None:
    pass


def _tell(listeners: list[Callable[[dict[str, Any]], None]], record: dict[str, Any]) -> None:
    for listener in listeners:
        listener(record)
