"""What of a prompt goes into the audit record, by policy:

- `none`: nothing (`retain` returns None; leave `prompt` out of the body);
- `sha256`: `{"sha256": hex}` of the UTF-8 text, enough to prove what was sent;
- `redacted`: `{"redacted": text}` with API keys, e-mail addresses, IBANs, card numbers (Luhn
  checked), IPv4 addresses and phone numbers replaced by `[API_KEY]`, `[EMAIL]`, `[IBAN]`,
  `[CARD]`, `[IPV4]`, `[PHONE]`. Pattern-based, so best effort: card numbers are 13-19 digit
  runs passing the Luhn check; phone numbers need 10-15 digits, or 7-15 with a `+` or `(area)`;
- `full`: `{"full": text}`.

A key's policy wins over its team's, which wins over `[audit] default_prompt_retention`.
"""

from __future__ import annotations

import hashlib
import re

POLICIES = ("none", "sha256", "redacted", "full")

_API_KEY = re.compile(
    r"apl_[0-9a-f]{12}_[A-Za-z0-9_\-]+"  # this appliance's keys
    r"|\bsk-[A-Za-z0-9_\-]{16,}"  # OpenAI-style keys (sk-..., sk-proj-..., sk-ant-...)
    r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"  # AWS access key ids
    r"|\b(?:ghp|gho|ghs|ghu|github_pat)_[A-Za-z0-9_]{20,}"  # GitHub tokens
    r"|\bxox[abprs]-[A-Za-z0-9\-]{10,}"  # Slack tokens
)
_EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")
_CARD = re.compile(r"(?<![\d\w])\d(?:[ \-]?\d){12,18}(?![\d\w])")
_IPV4 = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.]*\d)")
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .\-]?)?(?:\(\d{1,4}\)[ .\-]?)?\d{2,5}(?:[ .\-]?\d{2,5}){1,5}(?!\w)")
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group())
    return "[CARD]" if 13 <= len(digits) <= 19 and _luhn(digits) else match.group()


def _phone(match: re.Match[str]) -> str:
    text = match.group()
    digits = re.sub(r"\D", "", text)
    international = text.startswith("+") or "(" in text
    if _ISO_DATE.match(text) or not (7 if international else 10) <= len(digits) <= 15:
        return text
    return "[PHONE]"


def redact(text: str) -> str:
    """`text` with secrets and personal data replaced by placeholders."""
    text = _API_KEY.sub("[API_KEY]", text)
    text = _EMAIL.sub("[EMAIL]", text)
    text = _IBAN.sub("[IBAN]", text)
    text = _CARD.sub(_card, text)
    text = _IPV4.sub("[IPV4]", text)
    return _PHONE.sub(_phone, text)


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"unknown prompt retention policy {policy!r}: expected one of {', '.join(POLICIES)}")
    return policy


def resolve_policy(key_policy: str | None, team_policy: str | None, default: str) -> str:
    """The key's policy if set, else the team's, else `default`. Raises `ValueError` for an
    unknown policy."""
    for policy in (key_policy, team_policy):
        if policy:
            return check_policy(policy)
    return check_policy(default)


def retain(policy: str, text: str | None) -> dict[str, str] | None:
    """What to store of `text` under `policy` (see the module docstring). Raises `ValueError`
    for an unknown policy."""
    check_policy(policy)
    if policy == "none" or text is None:
        return None
    if policy == "sha256":
        return {"sha256": hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()}
    if policy == "redacted":
        return {"redacted": redact(text)}
    return {"full": text}
