"""`keyword_router`: rules that send a request to a route, by regex over the prompt or by tag.

    [[plugins.keyword_router.rules]]
    name = "code"                             # shown in the decision trail
    regex = '(?i)\\b(def|class|select|traceback)\\b'   # RE2: linear time, no lookaround
    to = ["coder"]                            # routes or candidates, best first
    [[plugins.keyword_router.rules]]
    name = "legal"
    tags = ["legal"]                          # every tag given in x-appliance-tags
    to = ["careful"]
    only_for = ["auto"]                       # only when the client asked for these routes

The first rule that matches decides; a request no rule matches keeps the route's own order.
A rule matches when its regex (or literal) is found in any message or prompt and every one of
its tags was sent; a rule needs at least one of the two. `to` names candidates of the
requested route, or other routes the key may use (their candidates are then tried first,
the requested route's after them). Routes here never widen access: the router drops a name
the key may not use, and a local-only request stays local.

Admin endpoints: `GET /admin/plugins/keyword_router/routes/rules`, and
`POST .../routes/check` with `{"text": ..., "tags": [...], "model": "auto"}`, which says which
rule would decide and where it would send the request, without running it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from appliance.hookspecs import AdminRoute, Candidate, PrincipalView, RequestView, hookimpl
from appliance.redaction import compile_pattern

APPLIANCE_HOOKSPEC = "1.0"
_OPTIONS = {"rules"}
_RULE_KEYS = {"name", "regex", "literal", "case_sensitive", "tags", "to", "only_for"}


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    pattern: Any | None  # a compiled RE2 pattern
    tags: frozenset[str]
    to: tuple[str, ...]
    only_for: frozenset[str] | None

    def matches(self, model: str, texts: list[str], tags: frozenset[str]) -> bool:
        if self.only_for is not None and model not in self.only_for:
            return False
        if not self.tags <= tags:
            return False
        return self.pattern is None or any(self.pattern.search(t) for t in texts)


def _names(value: Any, what: str, rule: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"rule {rule!r}: {what} must be a list of names")
    return value


def _rule(entry: Any) -> Rule:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
        raise ValueError("each rule needs a name ([[plugins.keyword_router.rules]] name = ...)")
    name = entry["name"]
    unknown = set(entry) - _RULE_KEYS
    if unknown:
        raise ValueError(f"rule {name!r}: unknown keys {sorted(unknown)}; expected some of {sorted(_RULE_KEYS)}")
    if "regex" in entry and "literal" in entry:
        raise ValueError(f"rule {name!r}: give regex or literal, not both")
    sensitive = entry.get("case_sensitive", False)
    if not isinstance(sensitive, bool):
        raise ValueError(f"rule {name!r}: case_sensitive must be true or false")
    pattern = None
    if "regex" in entry or "literal" in entry:
        source = entry.get("regex", entry.get("literal"))
        if not isinstance(source, str) or not source:
            raise ValueError(f"rule {name!r} has an empty pattern")
        if "literal" in entry:
            source = re.escape(source) if sensitive else f"(?i){re.escape(source)}"
        pattern = compile_pattern(source)
    tags = frozenset(_names(entry.get("tags", []), "tags", name))
    if pattern is None and not tags:
        raise ValueError(f"rule {name!r} needs a regex, a literal or tags to match on")
    to = tuple(_names(entry.get("to"), "to", name))
    if not to:
        raise ValueError(f"rule {name!r}: to must name at least one route or candidate")
    only_for = entry.get("only_for")
    return Rule(name, pattern, tags, to, frozenset(_names(only_for, "only_for", name)) if only_for is not None else None)


class KeywordRouter:
    def __init__(self) -> None:
        self.rules: list[Rule] = []
        self.disabled_hooks: set[str] = {"choose_route"}

    @hookimpl
    def configure(self, config: Mapping[str, Any]) -> None:
        unknown = set(config) - _OPTIONS
        if unknown:
            raise ValueError(f"unknown options {sorted(unknown)}; expected some of {sorted(_OPTIONS)}")
        entries = config.get("rules", [])
        if not isinstance(entries, list):
            raise ValueError("rules must be a list of tables ([[plugins.keyword_router.rules]])")
        rules = [_rule(e) for e in entries]
        names = [r.name for r in rules]
        if len(set(names)) != len(names):
            raise ValueError("rule names must be unique")
        self.rules = rules
        self.disabled_hooks = set() if rules else {"choose_route"}

    @hookimpl
    def register_admin_routes(self, register: Any) -> None:
        register(AdminRoute("rules", self._rules, description="The rules, in the order they are tried."))
        register(AdminRoute("check", self._check, method="POST", description="Which rule would route this text, and where?"))

    @hookimpl
    def choose_route(self, request: RequestView, principal: PrincipalView, candidates: list[Candidate]) -> list[str] | None:
        rule = self._first(request.model, _texts(request), frozenset(request.tags))
        return list(rule.to) if rule is not None else None

    def _first(self, model: str, texts: list[str], tags: frozenset[str]) -> Rule | None:
        for rule in self.rules:
            if rule.matches(model, texts, tags):
                return rule
        return None

    def _rules(self, query: Mapping[str, str], body: Any) -> dict[str, Any]:
        return {
            "rules": [
                {
                    "name": r.name,
                    "pattern": r.pattern is not None,
                    "tags": sorted(r.tags),
                    "to": list(r.to),
                    "only_for": sorted(r.only_for) if r.only_for is not None else None,
                }
                for r in self.rules
            ]
        }

    def _check(self, query: Mapping[str, str], body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            raise ValueError('send {"text": "...", "tags": [...], "model": "auto"} (tags and model optional)')
        tags = body.get("tags", [])
        model = body.get("model", "")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags) or not isinstance(model, str):
            raise ValueError("tags must be a list of strings and model a string")
        rule = self._first(model, [body["text"]], frozenset(tags))
        return {"rule": rule.name if rule else None, "to": list(rule.to) if rule else None}


def _texts(request: RequestView) -> list[str]:
    if request.messages is not None:
        return [m.get("content", "") for m in request.messages]
    return list(request.prompt or [])


plugin = KeywordRouter()
