"""What of a prompt goes into the audit record, by policy:

- `none`: nothing (`retain` returns None; leave `prompt` out of the body);
- `sha256`: `{"sha256": hex}` of the UTF-8 text, enough to prove what was sent;
- `redacted`: `{"redacted": text}` with API keys, e-mail addresses, IBANs (check digits
  verified), card numbers (Luhn checked), IP addresses and phone numbers replaced by
  `[API_KEY]`, `[EMAIL]`, `[IBAN]`, `[CARD]`, `[IPV4]`, `[IPV6]`, `[PHONE]`
  (`appliance.redaction`, linear time). Pattern-based, so best effort: phone numbers need
  10-15 digits, or 7-15 with a `+` or `(area)`;
- `full`: `{"full": text}`.

A key's policy wins over its team's, which wins over `[audit] default_prompt_retention`.
"""

from __future__ import annotations

import hashlib

from appliance.redaction import redact

POLICIES = ("none", "sha256", "redacted", "full")


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
