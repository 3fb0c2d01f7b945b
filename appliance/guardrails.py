"""The plugin hooks on the request path: `prepare_request` before anything is counted or
reserved, `check_response` on the answer before (or, for streaming guardrails, while) it is
sent. With no plugin implementing a hook, its step costs one cached lookup.

Plugins are handed copies of the request and the answer, and what they changed is taken
back only when they return in time with something well-formed: a plugin that times out
keeps running in its thread, but can no longer touch the request.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from typing import Literal

from appliance.auth import Principal
from appliance.errors import ApplianceError, PolicyViolation
from appliance.governance import RequestContext
from appliance.hookspecs import PrincipalView, RequestView, ResponseView, Verdict
from appliance.inference import GenerationInput
from appliance.plugin_manager import PluginManager, plain_json

CANNOT_JUDGE_STREAMS = "not run: cannot judge a stream"


def principal_view(principal: Principal) -> PrincipalView:
    return PrincipalView(key_id=principal.key_id, key_name=principal.name, role=str(principal.role), team=principal.team_id)


def parse_tags(header: str | None) -> tuple[str, ...]:
    """`x-appliance-tags: a, b` -> ("a", "b")."""
    if not header:
        return ()
    return tuple(dict.fromkeys(t.strip().lower() for t in header.split(",") if t.strip()))


@dataclass(slots=True)
class Gate:
    """The hooks for one request: its view as plugins see it, and what they said."""

    plugins: PluginManager
    view: RequestView
    principal: PrincipalView
    outcomes: dict[str, str] = field(default_factory=dict)

    async def prepare(self, ctx: RequestContext) -> None:
        """Run `prepare_request`; raises `PolicyViolation` (400) when a plugin rejects the
        request, `GuardrailUnavailable` (503) when one that fails closed has failed."""
        if not self.plugins.active("prepare_request"):
            return
        try:
            rejection = await self.plugins.prepare(self.view, self.principal)
        finally:
            self._record(ctx)
        if rejection is not None:
            ctx.error_code = PolicyViolation.code
            raise PolicyViolation(
                f"{rejection.message} (rule '{rejection.rule}')", param="messages" if self.view.messages is not None else "prompt"
            )

    def chat_input(self, spec: GenerationInput) -> GenerationInput:
        """`spec` with the messages as the plugins left them."""
        if self.view.messages is None or self.view.messages == spec.messages:
            return spec
        return replace(spec, messages=self.view.messages)

    async def judge(
        self, ctx: RequestContext, text: str, *, streaming: bool, finish_reason: str | None, only: list[str] | None = None
    ) -> tuple[str, Verdict | None]:
        """Judge a complete answer that nobody has seen yet: (the text to send, None) when it
        is accepted (a plugin may have rewritten it), (text, verdict) when a plugin asks for
        another answer ("retry" or "fallback"). Raises `PolicyViolation` when one rejects it."""
        if not self.plugins.active("check_response"):
            return text, None
        response = ResponseView(text=text, done=True, streaming=streaming, model=self.view.model, finish_reason=finish_reason)
        try:
            outcome = await self.plugins.check(self.view, response, only=only)
        finally:
            self._record(ctx)
        self.outcomes.update(outcome.outcomes)
        ctx.guardrails = dict(self.outcomes)
        verdict = outcome.verdict
        if verdict.action == "accept":
            return (verdict.text if verdict.text is not None else text), None
        if verdict.action == "reject":
            raise self.refuse(ctx, verdict)
        return text, verdict

    def refuse(self, ctx: RequestContext, verdict: Verdict) -> PolicyViolation:
        """The refusal for a verdict that cannot be honoured (or a rejection)."""
        ctx.error_code = PolicyViolation.code
        return PolicyViolation(_refusal(verdict))

    def streaming_plan(self, ctx: RequestContext) -> tuple[list[str], list[str]]:
        """For a stream: the guardrails that hold it back, and those that read along. Those
        that cannot judge a stream are noted as not run."""
        if not self.plugins.active("check_response"):
            return [], []
        blocking, along, unable = self.plugins.guardrails_for(streaming=True)
        for name in unable:
            self.outcomes[name] = CANNOT_JUDGE_STREAMS
        if unable:
            ctx.guardrails = dict(self.outcomes)
        if blocking:  # the whole answer is held anyway: the streaming ones judge it whole too
            return blocking + along, []
        return [], along

    def _record(self, ctx: RequestContext) -> None:
        if self.view.notes:
            ctx.plugin_notes = plain_json(self.view.notes)
        if self.view.audit_text is not None:
            ctx.audit_text = str(self.view.audit_text)
        ctx.prompt_text = self.view.text()


class StreamJudge:
    """Guardrails that read a stream as it goes (`STREAMING = True`). One check runs at a time
    on the text so far, behind the stream, never holding it; a rejection ends the stream at
    the next token with an error event. The complete text is judged once more at the end."""

    def __init__(self, gate: Gate, names: list[str]) -> None:
        self._gate = gate
        self._names = names
        self._parts: list[str] = []
        self._task: asyncio.Task[Verdict] | None = None
        self.verdict: Verdict | None = None  # a rejection, once one came in
        self.failure: ApplianceError | None = None  # the error event that ended the stream

    def outcomes(self) -> dict[str, str]:
        return dict(self._gate.outcomes)

    def feed(self, text: str) -> Verdict | None:
        """Add streamed text; the rejection, if a finished check made one."""
        self._parts.append(text)
        self._collect()
        if self.verdict is None and self._task is None:
            self._task = asyncio.ensure_future(self._judge(done=False, finish_reason=None))
        return self.verdict

    async def finish(self, finish_reason: str | None) -> Verdict | None:
        """Judge the whole answer; the rejection, if any."""
        if self._task is not None:
            await asyncio.wait([self._task])
            self._collect()
        if self.verdict is None:
            verdict = await self._judge(done=True, finish_reason=finish_reason)
            if verdict.action != "accept":
                self.verdict = verdict
        return self.verdict

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _collect(self) -> None:
        task = self._task
        if task is None or not task.done():
            return
        self._task = None
        if not task.cancelled() and task.exception() is None and task.result().action != "accept":
            self.verdict = task.result()
        elif not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]  # GuardrailUnavailable: fails closed

    async def _judge(self, *, done: bool, finish_reason: str | None) -> Verdict:
        gate = self._gate
        response = ResponseView("".join(self._parts), done=done, streaming=True, model=gate.view.model, finish_reason=finish_reason)
        outcome = await gate.plugins.check(gate.view, response, only=self._names)
        gate.outcomes.update(outcome.outcomes)
        if outcome.verdict.action in ("retry", "fallback"):  # tokens are out: too late for either
            return Verdict("reject", outcome.verdict.rule)
        return outcome.verdict

    def refusal(self) -> PolicyViolation:
        assert self.verdict is not None
        return PolicyViolation(_refusal(self.verdict))


def _refusal(verdict: Verdict) -> str:
    if verdict.action in ("retry", "fallback"):
        return (
            f"The answer did not pass the site's policy (rule '{verdict.rule}'), which asked for another answer "
            f"({verdict.action}); no other answer is available."
        )
    return f"The answer was withheld by the site's policy (rule '{verdict.rule}')."


def gate_for(
    plugins: PluginManager,
    ctx: RequestContext,
    principal: Principal,
    kind: Literal["chat", "completion", "embeddings"],
    model: str,
    *,
    messages: list[dict[str, str]] | None = None,
    prompt: list[str] | None = None,
    max_tokens: int | None = None,
    stream: bool = False,
    json_mode: bool = False,
    tags: tuple[str, ...] = (),
    keeps_text: bool = False,
) -> Gate | None:
    """The request's gate, or None when no plugin judges requests or answers, or routes them."""
    if not (plugins.active("prepare_request") or plugins.active("check_response") or plugins.active("choose_route")):
        return None
    view = RequestView(
        kind=kind,
        model=model,
        messages=[dict(m) for m in messages] if messages is not None else None,
        prompt=list(prompt) if prompt is not None else None,
        max_tokens=max_tokens,
        stream=stream,
        json_mode=json_mode,
        tags=tags,
        request_id=ctx.request_id,
        audit_keeps_text=keeps_text,
    )
    return Gate(plugins, view, principal_view(principal))
