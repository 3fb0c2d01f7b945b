"""`keyword_router`'s rules: what they match, and the configurations it refuses (the plugin
manager then reports the plugin as failed and the server keeps serving; see
tests/extensions/test_plugin_containment.py)."""

from __future__ import annotations

from typing import Any

import pytest

from appliance.hookspecs import Candidate, PrincipalView, RequestView
from plugins.keyword_router import KeywordRouter

WHO = PrincipalView("k1", "staff-app", "user", "default")
CANDIDATES = [Candidate("a"), Candidate("b")]


def router(*rules: dict[str, Any]) -> KeywordRouter:
    r = KeywordRouter()
    r.configure({"rules": list(rules)})
    return r


def chat(text: str, *, model: str = "auto", tags: tuple[str, ...] = ()) -> RequestView:
    return RequestView(kind="chat", model=model, messages=[{"role": "user", "content": text}], tags=tags)


def test_first_matching_rule_decides() -> None:
    r = router(
        {"name": "code", "regex": r"(?i)\bdef\s+\w+\(", "to": ["coder"]},
        {"name": "sql", "literal": "select", "to": ["sql", "coder"]},
    )
    assert r.choose_route(chat("def main(): pass"), WHO, CANDIDATES) == ["coder"]
    assert r.choose_route(chat("SELECT * FROM t"), WHO, CANDIDATES) == ["sql", "coder"]  # literal: case-insensitive
    assert r.choose_route(chat("hello"), WHO, CANDIDATES) is None


def test_tags_and_only_for() -> None:
    r = router(
        {"name": "legal", "tags": ["legal"], "to": ["careful"]},
        {"name": "urgent-helpdesk", "literal": "urgent", "tags": ["helpdesk"], "to": ["fast"], "only_for": ["helpdesk"]},
    )
    assert r.choose_route(chat("anything", tags=("legal", "hr")), WHO, CANDIDATES) == ["careful"]
    assert r.choose_route(chat("urgent!", model="helpdesk", tags=("helpdesk",)), WHO, CANDIDATES) == ["fast"]
    assert r.choose_route(chat("urgent!", model="auto", tags=("helpdesk",)), WHO, CANDIDATES) is None
    assert r.choose_route(chat("urgent!", model="helpdesk"), WHO, CANDIDATES) is None  # tag missing


def test_completion_prompts_are_matched_too() -> None:
    r = router({"name": "case", "literal": "Case", "case_sensitive": True, "to": ["x"]})
    assert r.choose_route(RequestView(kind="completion", model="m", prompt=["a Case"]), WHO, CANDIDATES) == ["x"]
    assert r.choose_route(RequestView(kind="completion", model="m", prompt=["a case"]), WHO, CANDIDATES) is None


def test_no_rules_implements_nothing() -> None:
    assert KeywordRouter().disabled_hooks == {"choose_route"}
    assert router({"name": "x", "literal": "y", "to": ["z"]}).disabled_hooks == set()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"rules": [{"name": "x", "regex": "(?=look)ahead", "to": ["a"]}]}, "RE2"),
        ({"rules": [{"name": "x", "to": ["a"]}]}, "needs a regex, a literal or tags"),
        ({"rules": [{"name": "x", "literal": "y", "to": []}]}, "at least one"),
        ({"rules": [{"name": "x", "literal": "y"}]}, "list of names"),
        ({"rules": [{"name": "x", "literal": "y", "to": ["a"], "colour": "red"}]}, "unknown keys"),
        ({"rules": [{"name": "x", "literal": "y", "regex": "y", "to": ["a"]}]}, "not both"),
        ({"rules": [{"literal": "y", "to": ["a"]}]}, "needs a name"),
        ({"rules": [{"name": "x", "literal": "y", "to": ["a"]}, {"name": "x", "literal": "z", "to": ["b"]}]}, "unique"),
        ({"rules": {"name": "x"}}, "list of tables"),
        ({"rule": []}, "unknown options"),
    ],
)
def test_bad_configurations_are_refused_with_a_reason(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KeywordRouter().configure(config)


def test_admin_check_says_where_a_text_would_go() -> None:
    r = router({"name": "code", "literal": "traceback", "to": ["coder"]})
    assert r._check({}, {"text": "here is my Traceback"}) == {"rule": "code", "to": ["coder"]}
    assert r._check({}, {"text": "hello"}) == {"rule": None, "to": None}
    with pytest.raises(ValueError):
        r._check({}, {"text": 3})
