"""`prompt_guard`: refuses requests by rule, before any compute or budget is spent.

    [plugins.prompt_guard]
    max_prompt_chars = 200000                 # every team (optional)
    [plugins.prompt_guard.teams.interns]
    max_prompt_chars = 8000                   # this team's own limit
    [[plugins.prompt_guard.block]]
    name = "no-credentials"                   # shown in the refusal and the audit record
    regex = '(?i)\\bpassword\\s*[:=]'         # RE2: linear time, no lookaround
    [[plugins.prompt_guard.block]]
    name = "project-falcon"
    literal = "Project Falcon"                # case-insensitive unless case_sensitive = true
    [[plugins.prompt_guard.allow]]
    name = "password-policy"
    literal = "password: policy"              # an exception: block matches inside it do not count

A refusal is a 400 with code `policy_violation` and the rule's name, never the text that matched.
Rules look at the content of every message (or every prompt), not at role names.

Admin endpoints: `GET /admin/plugins/prompt_guard/routes/rules` (the rules by name), and
`POST .../routes/check` with `{"text": ..., "team": ...}`, which says whether that text would
be refused and by which rule, without sending anything to a model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from appliance.hookspecs import AdminRoute, PrincipalView, Rejection, RequestView, hookimpl
from appliance.redaction import compile_pattern

APPLIANCE_HOOKSPEC = "1.0"
_OPTIONS = {"block", "allow", "max_prompt_chars", "teams"}
_RULE_KEYS = {"name", "regex", "literal", "case_sensitive"}


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    pattern: Any  # a compiled RE2 pattern


def _rule(entry: Any, where: str) -> Rule:
    if not isinstance(entry, dict) or set(entry) - _RULE_KEYS or not isinstance(entry.get("name"), str) or not entry["name"]:
        raise ValueError(f"each {where} rule needs a name and one of regex or literal (keys: {sorted(_RULE_KEYS)})")
    if ("regex" in entry) == ("literal" in entry):
        raise ValueError(f"{where} rule {entry['name']!r} needs exactly one of regex or literal")
    sensitive = entry.get("case_sensitive", False)
    if not isinstance(sensitive, bool):
        raise ValueError(f"{where} rule {entry['name']!r}: case_sensitive must be true or false")
    source = entry["regex"] if "regex" in entry else re.escape(str(entry["literal"]))
    if not isinstance(source, str) or not source:
        raise ValueError(f"{where} rule {entry['name']!r} has an empty pattern")
    return Rule(entry["name"], compile_pattern(source if sensitive or "regex" in entry else f"(?i){source}"))


def _limit(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where} max_prompt_chars must be a positive whole number, got {value!r}")
    return value


class PromptGuard:
    def __init__(self) -> None:
        self.block: list[Rule] = []
        self.allow: list[Rule] = []
        self.max_chars: int | None = None
        self.team_max_chars: dict[str, int | None] = {}
        self.disabled_hooks: set[str] = {"prepare_request"}

    @hookimpl
    def configure(self, config: Mapping[str, Any]) -> None:
        unknown = set(config) - _OPTIONS
        if unknown:
            raise ValueError(f"unknown options {sorted(unknown)}; expected some of {sorted(_OPTIONS)}")
        for option in ("block", "allow"):
            if not isinstance(config.get(option, []), list):
                raise ValueError(f"{option} must be a list of rules ([[plugins.prompt_guard.{option}]])")
        self.block = [_rule(e, "block") for e in config.get("block", [])]
        self.allow = [_rule(e, "allow") for e in config.get("allow", [])]
        names = [r.name for r in self.block]
        if len(set(names)) != len(names):
            raise ValueError("block rule names must be unique")
        self.max_chars = _limit(config.get("max_prompt_chars"), "")
        teams = config.get("teams", {})
        if not isinstance(teams, dict) or not all(isinstance(v, dict) and set(v) <= {"max_prompt_chars"} for v in teams.values()):
            raise ValueError("teams must be tables of max_prompt_chars, as [plugins.prompt_guard.teams.<team>]")
        self.team_max_chars = {team: _limit(v.get("max_prompt_chars"), f"teams.{team}") for team, v in teams.items()}
        in_use = self.block or self.max_chars is not None or any(v is not None for v in self.team_max_chars.values())
        self.disabled_hooks = set() if in_use else {"prepare_request"}

    @hookimpl
    def register_admin_routes(self, register: Any) -> None:
        register(AdminRoute("rules", self._rules, description="The rules, by name."))
        register(AdminRoute("check", self._check, method="POST", description="Would this text be refused?"))

    def _rules(self, query: Mapping[str, str], body: Any) -> dict[str, Any]:
        return {
            "block": [r.name for r in self.block],
            "allow": [r.name for r in self.allow],
            "max_prompt_chars": self.max_chars,
            "teams": {team: {"max_prompt_chars": limit} for team, limit in self.team_max_chars.items()},
        }

    def _check(self, query: Mapping[str, str], body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            raise ValueError('send {"text": "...", "team": "..."} (team optional)')
        team = body.get("team", "default")
        if not isinstance(team, str):
            raise ValueError("team must be a string")
        request = RequestView(kind="completion", model="", prompt=[body["text"]])
        refused = self._judge(request, team)
        return {"refused": refused is not None, "rule": refused.rule if refused else None}

    @hookimpl
    def prepare_request(self, request: RequestView, principal: PrincipalView) -> Rejection | None:
        return self._judge(request, principal.team)

    def _judge(self, request: RequestView, team: str) -> Rejection | None:
        texts = [m["content"] for m in request.messages] if request.messages is not None else list(request.prompt or [])
        limit = self.team_max_chars.get(team, self.max_chars)
        if limit is not None and sum(len(t) for t in texts) > limit:
            return Rejection("max_prompt_chars", f"The prompt is longer than the {limit:,} characters allowed for your team.")
        for text in texts:
            for rule in self.block:
                if self._blocked(rule, text):
                    return Rejection(rule.name)
        return None

    def _blocked(self, rule: Rule, text: str) -> bool:
        """Whether `rule` matches `text` anywhere that no allow rule covers (linear: the allow
        spans are merged once, then both are walked in order)."""
        allowed: list[tuple[int, int]] | None = None
        at = 0
        for match in rule.pattern.finditer(text):
            if allowed is None:
                allowed = _merged(m.span() for a in self.allow for m in a.pattern.finditer(text))
            start, end = match.span()
            while at < len(allowed) and allowed[at][1] <= start:
                at += 1
            if not (at < len(allowed) and allowed[at][0] <= start and end <= allowed[at][1]):
                return True
        return False


def _merged(spans: Any) -> list[tuple[int, int]]:
    """Overlapping spans joined, in order."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


plugin = PromptGuard()
