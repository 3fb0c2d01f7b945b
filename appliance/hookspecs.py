"""The plugin API of the appliance: the hooks a plugin may implement, and the plain values they
take and return. This module, with `appliance.redaction`, is everything a plugin imports.

A plugin is a module (or an object) found through the entry-point group `appliance.plugins`,
that declares the hook-specification version it was written for and implements some hooks:

    from appliance.hookspecs import Rejection, hookimpl

    APPLIANCE_HOOKSPEC = "1"          # the major version it was written for

    @hookimpl
    def prepare_request(request, principal):
        if "forbidden" in request.text():
            return Rejection("no-forbidden-words", "This request is not allowed here.")

A plugin object may set `disabled_hooks` (a set of hook names) in `configure`, to switch off
hooks its configuration does not use: a `check_response` that would do nothing should not
hold every stream back. `STREAMING` says how its `check_response` treats streams (below).

Compatibility: `HOOKSPEC_VERSION` is "major.minor". Minor versions only add hooks or optional
fields, so a plugin written for 1.0 loads on 1.3; a plugin that declares another major
version, or none, is refused at load with a message saying so. Hooks are called by the
appliance itself, one plugin at a time, each in its own worker thread with a time limit
(`[plugins.<name>] timeout_seconds`); a hook that raises or runs over is a failure of that
plugin, which is reported, audited and disabled, and the other plugins still run. Whether
its failure lets requests through ("open") or refuses them ("closed") is per plugin
(`[plugins.<name>] fail`); the default is closed for `prepare_request` and `check_response`
and open for everything else. Plugins run in `[plugins.<name>] order` (default 100), then by
name. See docs/plugins.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import pluggy

__all__ = [
    "ACCEPT",
    "HOOKSPEC_VERSION",
    "PROJECT",
    "AdminRoute",
    "Candidate",
    "Check",
    "PrincipalView",
    "Rejection",
    "RequestView",
    "ResponseView",
    "Verdict",
    "hookimpl",
    "hookspec",
]

PROJECT = "appliance"
HOOKSPEC_VERSION = "1.1"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass(slots=True)
class RequestView:
    """A chat, completion or embedding request as plugins see it. `prepare_request` may change
    `messages` (chat: role and content strings) or `prompt` (completion and embeddings: one
    entry per input) in place, and the model then gets the changed text. `notes` collects
    what plugins want in the request's audit record, under their own name (counts, rule
    names: never the text they found). `audit_text`, when a plugin sets it, is what the audit
    log keeps instead of `text()` where its retention policy keeps text at all
    (`audit_keeps_text`); the sha256 policy still hashes what was sent."""

    kind: Literal["chat", "completion", "embeddings"]
    model: str
    messages: list[dict[str, str]] | None = None
    prompt: list[str] | None = None
    max_tokens: int | None = None
    stream: bool = False
    json_mode: bool = False
    tags: tuple[str, ...] = ()
    request_id: str = ""
    audit_keeps_text: bool = False
    notes: dict[str, Any] = field(default_factory=dict)
    audit_text: str | None = None

    def text(self) -> str:
        """The request's text as the audit log keeps it: "role: content" lines for a chat,
        the inputs one per line otherwise."""
        if self.messages is not None:
            return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in self.messages)
        return "\n".join(self.prompt or [])


@dataclass(frozen=True, slots=True)
class PrincipalView:
    """Who sends the request (never their key)."""

    key_id: str
    key_name: str
    role: str
    team: str


@dataclass(frozen=True, slots=True)
class Rejection:
    """`prepare_request` refuses the request: 400 with code `policy_violation`, naming `rule`;
    `message` is shown to the caller and must not quote what matched."""

    rule: str
    message: str = "This request is not allowed by the site's policy."


@dataclass(frozen=True, slots=True)
class Candidate:
    """A model (or upstream) a request may go to, for `choose_route`."""

    name: str
    cost_per_1k_tokens: float = 0.0
    loaded: bool = True
    capabilities: frozenset[str] = frozenset()


@dataclass(slots=True)
class ResponseView:
    """The answer so far: `done` when it is complete. A blocking guardrail sees it once,
    complete, before any of it is sent; a streaming one sees it grow, and after the end."""

    text: str
    done: bool
    streaming: bool
    model: str
    finish_reason: str | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """What `check_response` decided.

    - "accept": send it; with `text`, send that instead (only before anything was sent);
    - "retry": generate again, with `feedback` added to the conversation (before anything
      was sent; the routing layer decides where);
    - "fallback": generate again on the next candidate (before anything was sent);
    - "reject": refuse it (400 `policy_violation`), or end a stream with an error event.

    `rule` names what decided, for the audit record and the error message.
    """

    action: Literal["accept", "retry", "fallback", "reject"]
    rule: str = ""
    text: str | None = None
    feedback: str | None = None


ACCEPT = Verdict("accept")


@dataclass(frozen=True, slots=True)
class Check:
    """A scheduled check a plugin contributes. `run()` is called in a worker thread and
    returns plain JSON values: one finding, `{"status": "ok"|"warn"|"fail", "summary": str,
    ...readings}`, or several, `{"findings": [{"subject", "status", "summary", "details"}]}`
    (a subject per thing looked at, so that two disks raise two alerts). A `run` that
    raises, or runs past `timeout_seconds`, is an "error" run. `cron` (a crontab line, since
    1.1) schedules it instead of `interval_seconds`; `[check.<name>]` may override both."""

    name: str
    run: Callable[[], Mapping[str, Any]]
    interval_seconds: float = 300.0
    cron: str | None = None
    description: str = ""
    timeout_seconds: float = 60.0


@dataclass(frozen=True, slots=True)
class AdminRoute:
    """An admin endpoint a plugin contributes, served at `/admin/plugins/<plugin>/routes/<path>`
    to admins only. `handler(query, body)` takes the query parameters and the JSON body (None
    for GET) and returns a JSON-ready dict."""

    path: str
    handler: Callable[[Mapping[str, str], Any], Mapping[str, Any]]
    method: Literal["GET", "POST"] = "GET"
    description: str = ""


class Specs:
    """The hooks. Each may be implemented by any number of plugins; they run in plugin order."""

    @hookspec
    def configure(self, config: Mapping[str, Any]) -> None:
        """Called once at load with the plugin's own `[plugins.<name>]` table (without the
        host's keys `enabled`, `fail`, `timeout_seconds`, `workers` and `order`). Raise
        `ValueError` to refuse a bad configuration: the plugin is then not loaded, and the
        reason is shown by `appliance plugins list`."""

    @hookspec
    def startup(self, app: Mapping[str, Any]) -> None:
        """The server started (`app`: `data_dir`, `version`, `hookspec`). Errors: reported."""

    @hookspec
    def shutdown(self, app: Mapping[str, Any]) -> None:
        """The server is stopping. Errors: reported."""

    @hookspec
    def prepare_request(self, request: RequestView, principal: PrincipalView) -> Rejection | None:
        """Before routing, metering and the model. May change `request.messages` or
        `request.prompt` in place, add to `request.notes`, or return a `Rejection`. Fails
        closed by default: a plugin that raises or times out refuses the request (503)."""

    @hookspec(firstresult=True)
    def choose_route(self, request: RequestView, principal: PrincipalView, candidates: list[Candidate]) -> list[str] | None:
        """Pick or reorder the candidates (names, best first); the first plugin that returns a
        list decides, None leaves it to the next. Fails open: the built-in order is used."""

    @hookspec
    def check_response(self, request: RequestView, response: ResponseView) -> Verdict | None:
        """Judge the answer; None means accept. Blocking guardrails (the default) see the
        complete answer before it is sent; plugins with `STREAMING = True` see a stream as it
        grows (`done` False) and after its end, and can then only accept or reject. A plugin
        that cannot judge a stream sets `STREAMING = None`: on streams it is not run, and the
        audit record says so. Fails closed by default."""

    @hookspec
    def on_usage(self, record: Mapping[str, Any]) -> None:
        """A usage record, after it was committed (read-only): request_id, key_id, team_id,
        model, status, token counts, timings, energy and cost. Runs off the request path."""

    @hookspec
    def on_audit_event(self, event: Mapping[str, Any]) -> None:
        """An audit record, after it was committed (read-only): `idx`, `ts`, `kind`, `key_id`,
        `team_id` and `body` (kept prompt text, which can be erased, is not included). Runs
        off the request path."""

    @hookspec
    def register_checks(self, register: Callable[[Check], None]) -> None:
        """Contribute scheduled checks: `register(Check(...))`. Names must be unique."""

    @hookspec
    def register_alert_channels(self, register: Callable[[str, Callable[[Mapping[str, Any]], None]], None]) -> None:
        """Contribute alert channels: `register(name, send)`; `send(alert)` delivers one alert
        (a mapping: id, rule, check, subject, severity, event "open"|"repeat"|"resolve",
        state, summary, details, opened_at, ts, sends) or raises. It is called in a worker
        thread with a time limit; a channel that fails is reported and never blocks a check.
        `[[alerts.rules]]` name channels by these names."""

    @hookspec
    def register_admin_routes(self, register: Callable[[AdminRoute], None]) -> None:
        """Contribute admin endpoints: `register(AdminRoute(...))`."""
