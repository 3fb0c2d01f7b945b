"""`pii_redact`: takes personal data out of prompts before the model sees them, out of
answers before the caller does, and out of what the audit log keeps. A thin wrapper around
`appliance.redaction`, the one redactor (RE2, linear time; card numbers Luhn-checked, IBANs
mod-97-checked).

    [plugins.pii_redact]
    prompts = false      # redact prompts before they reach the model
    responses = false    # redact answers (streams are then held back until complete)
    audit = false        # redact what the audit log keeps, where it keeps text ("full" included)
    kinds = ["email", "phone", "iban", "card", "ipv4", "ipv6", "api_key"]   # default: all
    [plugins.pii_redact.national_ids]   # a site's own patterns (RE2), name = pattern
    ssn = '\\b[0-9]{3}-[0-9]{2}-[0-9]{4}\\b'

Each is off until a site turns it on: rewriting what users send or get, or what a key's
explicit "full" retention keeps, is a decision for the site. It notes what it replaced, by
kind and count, in the request's audit record; never a value.
`POST /admin/plugins/pii_redact/routes/preview` with `{"text": ...}` shows what it would make
of a text, to try a site's patterns out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from appliance.hookspecs import AdminRoute, PrincipalView, RequestView, ResponseView, Verdict, hookimpl
from appliance.redaction import KINDS, Redactor

APPLIANCE_HOOKSPEC = "1.0"
NAME = "pii_redact"
_OPTIONS = {"prompts", "responses", "audit", "kinds", "national_ids"}


class PiiRedact:
    STREAMING = False  # an answer is redacted whole: with `responses` on, streams are held back

    def __init__(self) -> None:
        self.prompts, self.responses, self.audit = False, False, False
        self.redactor = Redactor()
        self.disabled_hooks: set[str] = {"prepare_request", "check_response"}

    @hookimpl
    def configure(self, config: Mapping[str, Any]) -> None:
        unknown = set(config) - _OPTIONS
        if unknown:
            raise ValueError(f"unknown options {sorted(unknown)}; expected some of {sorted(_OPTIONS)}")
        for option in ("prompts", "responses", "audit"):
            value = config.get(option, getattr(self, option))
            if not isinstance(value, bool):
                raise ValueError(f"{option} must be true or false, got {value!r}")
            setattr(self, option, value)
        kinds = config.get("kinds", list(KINDS))
        extra = config.get("national_ids", {})
        if not isinstance(kinds, list) or not isinstance(extra, dict):
            raise ValueError("kinds must be a list of names and national_ids a table of name = pattern")
        self.redactor = Redactor(kinds, extra)  # ValueError names an unknown kind or a pattern RE2 refuses
        self.disabled_hooks = set()
        if not self.responses:
            self.disabled_hooks.add("check_response")
        if not (self.prompts or self.audit):
            self.disabled_hooks.add("prepare_request")

    @hookimpl
    def register_admin_routes(self, register: Any) -> None:
        register(AdminRoute("preview", self._preview, method="POST", description="What redaction makes of a text."))

    def _preview(self, query: Mapping[str, str], body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            raise ValueError('send {"text": "..."}')
        result = self.redactor.redact(body["text"])
        return {"text": result.text, "counts": dict(result.counts)}

    @hookimpl
    def prepare_request(self, request: RequestView, principal: PrincipalView) -> None:
        notes: dict[str, dict[str, int]] = {}
        if self.prompts:
            counts: Counter[str] = Counter()
            if request.messages is not None:
                for message in request.messages:
                    message["content"] = self._redact(message["content"], counts)
            if request.prompt is not None:
                request.prompt = [self._redact(p, counts) for p in request.prompt]
            if counts:
                notes["prompt"] = dict(counts)
        elif self.audit and request.audit_keeps_text:
            counts = Counter()
            request.audit_text = self._redact(request.text(), counts)
            if counts:
                notes["audit"] = dict(counts)
        if notes:
            request.notes[NAME] = notes

    @hookimpl
    def check_response(self, request: RequestView, response: ResponseView) -> Verdict | None:
        counts: Counter[str] = Counter()
        text = self._redact(response.text, counts)
        if not counts:
            return None
        request.notes.setdefault(NAME, {})["response"] = dict(counts)
        return Verdict("accept", rule=NAME, text=text)

    def _redact(self, text: str, counts: Counter[str]) -> str:
        result = self.redactor.redact(text)
        counts.update(result.counts)
        return result.text


plugin = PiiRedact()
