"""Prompt retention: the four policies, what redaction replaces (and leaves alone), and how a
key's, team's and default policy combine."""

from __future__ import annotations

import hashlib

import pytest

from appliance.audit import resolve_policy, retain
from appliance.audit.retention import POLICIES, Retained, redact
from appliance.config import RETENTION_POLICIES


def test_the_policies_match_the_config() -> None:
    assert POLICIES == RETENTION_POLICIES


def test_each_policy() -> None:
    text = "Résumé for jane@example.com"
    assert retain("none", text) is None
    assert retain("sha256", text) == Retained({"sha256": hashlib.sha256(text.encode()).hexdigest()})
    # Kept text goes beside the record; the hashed body holds what was kept and its digest.
    redacted = "Résumé for [EMAIL]"
    assert retain("redacted", text) == Retained(
        {"kept": "redacted", "sha256": hashlib.sha256(redacted.encode()).hexdigest()}, redacted
    )
    assert retain("full", text) == Retained({"kept": "full", "sha256": hashlib.sha256(text.encode()).hexdigest()}, text)
    assert retain("full", None) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mail john.doe+tag@mail.example.co.uk today", "mail [EMAIL] today"),
        ("call +1 415 555 2671, (020) 7946 0958 or 555-123-4567", "call [PHONE], [PHONE] or [PHONE]"),
        ("+49 30 1234567", "[PHONE]"),
        ("visa 4111 1111 1111 1111, amex 378282246310005, mc 5555-5555-5555-4444", "visa [CARD], amex [CARD], mc [CARD]"),
        ("host 192.168.1.20 and 10.0.0.1.", "host [IPV4] and [IPV4]."),
        ("pay DE89 3704 0044 0532 0130 00 or GB82WEST12345698765432", "pay [IBAN] or [IBAN]"),
        ("key apl_0123456789ab_AbC-d_efGhijk-lmnop", "key [API_KEY]"),
        ("OPENAI_API_KEY=sk-proj-abcdefghijklmnop1234", "OPENAI_API_KEY=[API_KEY]"),
        ("aws AKIAIOSFODNN7EXAMPLE", "aws [API_KEY]"),
    ],
)
def test_redaction_replaces_personal_data_and_secrets(text: str, expected: str) -> None:
    assert redact(text) == expected
    kept = retain("redacted", text)
    assert kept is not None and kept.text == expected


@pytest.mark.parametrize(
    "text",
    [
        "on 2024-01-15 10:30 we sold 1234 items for 99.95 in 2023 and 2024",
        "python 3.11.4, order 12345, not a card 4111 1111 1111 1112",
        "256.1.1.1 is not an address; neither is 1.2.3",
        "a@b is not an email; sk-short is not a key",
        "日本語のテキスト — naïve café",
    ],
)
def test_redaction_leaves_ordinary_text_alone(text: str) -> None:
    assert redact(text) == text


def test_resolve_policy_prefers_key_then_team_then_default() -> None:
    assert resolve_policy("full", "none", "sha256") == "full"
    assert resolve_policy(None, "redacted", "sha256") == "redacted"
    assert resolve_policy(None, None, "none") == "none"
    assert resolve_policy("", None, "sha256") == "sha256"


def test_an_unknown_policy_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="none, sha256, redacted, full"):
        retain("everything", "x")
    with pytest.raises(ValueError, match="'hashed'"):
        resolve_policy("hashed", None, "sha256")
    with pytest.raises(ValueError):
        resolve_policy(None, None, "bogus")


def test_kept_text_is_cut_at_the_limit_with_the_whole_texts_digest() -> None:
    text = "mail a@b.co " * 10_000  # 120,000 characters
    kept = retain("redacted", text, limit=1000)
    assert kept is not None and kept.text is not None
    assert len(kept.text) == 1000 and "a@b.co" not in kept.text and kept.text.startswith("mail [EMAIL]")
    assert kept.digest["chars"] == str(len(text))
    assert kept.digest["full_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert kept.digest["sha256"] == hashlib.sha256(kept.text.encode()).hexdigest()
    short = retain("full", "short", limit=1000)
    assert short is not None and short.text == "short" and "chars" not in short.digest
