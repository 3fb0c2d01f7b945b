"""The built-in plugins on their own: `pii_redact` finds each kind and leaves look-alikes,
`prompt_guard` refuses by rule, and both refuse bad configuration with a clear reason."""

from __future__ import annotations

import pytest

from appliance.hookspecs import PrincipalView, Rejection, RequestView, ResponseView
from plugins.pii_redact import PiiRedact
from plugins.prompt_guard import PromptGuard

PRINCIPAL = PrincipalView(key_id="k1", key_name="app", role="user", team="default")


def _pii(**config: object) -> PiiRedact:
    plugin = PiiRedact()
    plugin.configure(config)
    return plugin


def _chat(*contents: str, keeps_text: bool = False) -> RequestView:
    return RequestView(kind="chat", model="m", messages=[{"role": "user", "content": c} for c in contents],
                       audit_keeps_text=keeps_text)


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("write to jane.doe+work@mail.example.co.uk today", "email"),
        ("call +44 20 7946 0958 after lunch", "phone"),
        ("or (030) 1234-5678", "phone"),
        ("pay to DE89 3704 0044 0532 0130 00 now", "iban"),
        ("GB82WEST12345698765432", "iban"),
        ("card 4111 1111 1111 1111 exp 12/29", "card"),
        ("amex 3782-822463-10005", "card"),
        ("from 192.168.10.254 at noon", "ipv4"),
        ("via 2001:db8::8a2e:370:7334 too", "ipv6"),
        ("key sk-abcdefghijklmnopqrstuvwx here", "api_key"),
    ],
)
def test_pii_redact_finds_each_kind_and_counts_it(text: str, kind: str) -> None:
    request = _chat(text)
    _pii(prompts=True).prepare_request(request, PRINCIPAL)
    content = request.messages[0]["content"]  # type: ignore[index]
    assert f"[{kind.upper()}]" in content
    assert request.notes["pii_redact"] == {"prompt": {kind: 1}}


@pytest.mark.parametrize(
    "text",
    [
        "card 4111 1111 1111 1112 fails Luhn",
        "DE89 3704 0044 0532 0130 01 has bad check digits",
        "version 1.2.3.4.5 and 300.1.1.1",
        "meeting on 2026-12-02 at 10:30",
        "order number 12345",
        "an email-like word@ with no domain",
    ],
)
def test_pii_redact_leaves_look_alikes_alone(text: str) -> None:
    request = _chat(text)
    _pii(prompts=True).prepare_request(request, PRINCIPAL)
    assert request.messages[0]["content"] == text  # type: ignore[index]
    assert "pii_redact" not in request.notes


def test_pii_redact_site_patterns_kinds_and_audit_only_mode() -> None:
    assert _pii().disabled_hooks == {"prepare_request", "check_response"}  # nothing until a site asks
    plugin = _pii(audit=True, kinds=["email"], national_ids={"ssn": r"\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b"})
    request = _chat("ssn 078-05-1120, mail a@b.io, card 4111111111111111", keeps_text=True)
    plugin.prepare_request(request, PRINCIPAL)
    # Prompts go to the model as they are; only what the audit log keeps is redacted.
    assert request.messages[0]["content"].startswith("ssn 078-05-1120")  # type: ignore[index]
    assert request.audit_text == "user: ssn [SSN], mail [EMAIL], card 4111111111111111"
    assert request.notes["pii_redact"] == {"audit": {"email": 1, "ssn": 1}}
    # Where the log keeps no text, there is nothing to do.
    quiet = _chat("mail a@b.io")
    plugin.prepare_request(quiet, PRINCIPAL)
    assert quiet.audit_text is None and quiet.notes == {}
    assert plugin.disabled_hooks == {"check_response"}


def test_pii_redact_rewrites_answers_and_notes_counts_only() -> None:
    plugin = _pii(responses=True)
    assert plugin.disabled_hooks == {"prepare_request"}
    request = _chat("hi")
    verdict = plugin.check_response(request, ResponseView("Reach bob@example.org or 10.0.0.7.", True, False, "m"))
    assert verdict is not None and verdict.action == "accept"
    assert verdict.text == "Reach [EMAIL] or [IPV4]."
    assert request.notes["pii_redact"] == {"response": {"email": 1, "ipv4": 1}}
    assert plugin.check_response(request, ResponseView("Nothing here.", True, False, "m")) is None


def test_pii_redact_is_linear_on_hostile_input() -> None:
    hostile = "a" * 300_000 + "@" + "b." * 200_000 + " 1" * 100_000 + "1.1." * 50_000
    request = _chat(hostile)
    _pii(prompts=True).prepare_request(request, PRINCIPAL)  # quadratic patterns would run into the test timeout
    assert len(hostile) > 1_000_000
    assert request.messages[0]["content"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("config", "complaint"),
    [
        ({"kinds": ["email", "dna"]}, "dna"),
        ({"national_ids": {"ssn": "(?<=x)[0-9]+"}}, "not valid RE2"),
        ({"national_ids": {"email": "x"}}, "built-in kind"),
        ({"prompt": True}, "unknown options"),
        ({"prompts": "yes"}, "true or false"),
    ],
)
def test_pii_redact_refuses_bad_configuration(config: dict[str, object], complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        PiiRedact().configure(config)


def _guard(**config: object) -> PromptGuard:
    plugin = PromptGuard()
    plugin.configure(config)
    return plugin


def test_prompt_guard_without_rules_implements_nothing() -> None:
    assert _guard().disabled_hooks == {"prepare_request"}
    assert _guard(max_prompt_chars=10).disabled_hooks == set()


def test_prompt_guard_blocks_by_literal_and_regex_and_never_quotes_the_match() -> None:
    guard = _guard(block=[{"name": "no-falcon", "literal": "Project Falcon"},
                          {"name": "no-credentials", "regex": r"(?i)\bpassword\s*[:=]"}])
    refused = guard.prepare_request(_chat("tell me about PROJECT falcon"), PRINCIPAL)
    assert refused == Rejection("no-falcon")
    assert "falcon" not in refused.message.lower()
    assert guard.prepare_request(_chat("my Password = hunter2"), PRINCIPAL) == Rejection("no-credentials")
    assert guard.prepare_request(_chat("passwords are long"), PRINCIPAL) is None
    case = _guard(block=[{"name": "exact", "literal": "Falcon", "case_sensitive": True}])
    assert case.prepare_request(_chat("falcon"), PRINCIPAL) is None


def test_prompt_guard_allow_rules_are_exceptions_for_what_they_cover() -> None:
    guard = _guard(block=[{"name": "no-password", "literal": "password"}],
                   allow=[{"name": "policy", "literal": "password policy"}])
    assert guard.prepare_request(_chat("what is our password policy?"), PRINCIPAL) is None
    # An allowed phrase elsewhere does not excuse a blocked word it does not cover.
    assert guard.prepare_request(_chat("password policy aside, what is the admin password?"), PRINCIPAL) == Rejection("no-password")
    hostile = "password policy " * 70_000  # a million characters of covered matches: still linear
    assert guard.prepare_request(_chat(hostile), PRINCIPAL) is None


def test_prompt_guard_limits_prompt_size_per_team() -> None:
    guard = _guard(max_prompt_chars=100, teams={"interns": {"max_prompt_chars": 10}})
    interns = PrincipalView(key_id="k2", key_name="intern-app", role="user", team="interns")
    assert guard.prepare_request(_chat("x" * 50), PRINCIPAL) is None
    refused = guard.prepare_request(_chat("x" * 50), interns)
    assert refused is not None and refused.rule == "max_prompt_chars" and "10" in refused.message
    assert guard.prepare_request(_chat("x" * 101), PRINCIPAL).rule == "max_prompt_chars"  # type: ignore[union-attr]
    completion = RequestView(kind="completion", model="m", prompt=["x" * 6, "y" * 6])
    assert guard.prepare_request(completion, interns).rule == "max_prompt_chars"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("config", "complaint"),
    [
        ({"block": [{"name": "x", "regex": "(?<=a)b"}]}, "not valid RE2"),
        ({"block": [{"name": "x", "regex": "a", "literal": "b"}]}, "exactly one"),
        ({"block": [{"regex": "a"}]}, "needs a name"),
        ({"block": [{"name": "x", "literal": "a"}, {"name": "x", "literal": "b"}]}, "unique"),
        ({"block": {"name": "x"}}, "list of rules"),
        ({"max_prompt_chars": 0}, "positive"),
        ({"teams": {"a": {"max_chars": 3}}}, "teams must be"),
        ({"blocks": []}, "unknown options"),
    ],
)
def test_prompt_guard_refuses_bad_configuration(config: dict[str, object], complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        PromptGuard().configure(config)
