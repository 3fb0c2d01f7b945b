"""What of a prompt goes into the audit record, by policy:

- `none`: nothing (`retain` returns None; leave `prompt` out of the body);
- `sha256`: the body holds `{"sha256": hex}` of the UTF-8 text, enough to prove what was sent;
- `redacted`: the text with API keys, e-mail addresses, IBANs (check digits verified), card
  numbers (Luhn checked), IP addresses and phone numbers replaced by `[API_KEY]`, `[EMAIL]`,
  `[IBAN]`, `[CARD]`, `[IPV4]`, `[IPV6]`, `[PHONE]` (`appliance.redaction`, linear time).
  Pattern-based, so best effort: phone numbers need 10-15 digits, or 7-15 with a `+` or
  `(area)`;
- `full`: the text as sent.

Kept text (redacted or full) never enters the hashed record body, which holds only
`{"kept": policy, "sha256": hex of the kept text}`: the text itself is stored beside the
record (`audit_content`), so it can be erased (`appliance audit erase`) and the chain still
verifies, while any edit of kept text is detected against its digest.

A key's policy wins over its team's, which wins over `[audit] default_prompt_retention`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

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


@dataclass(frozen=True, slots=True)
class Retained:
    """What a policy keeps of a text: `digest` goes into the hashed body, `text` (the kept
    text, for `redacted` and `full`) beside it."""

    digest: dict[str, str]
    text: str | None = None


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


# Redaction looks this far past the cut, so that a value straddling it is still found whole.
_CUT_MARGIN = 256


def retain(policy: str, text: str | None, *, limit: int | None = None) -> Retained | None:
    """What to store of `text` under `policy` (see the module docstring). Kept text is cut
    after `limit` characters: the body then also holds the full text's length and sha256, so
    a huge prompt costs neither the audit log's space nor a redaction pass over all of it.
    Raises `ValueError` for an unknown policy."""
    check_policy(policy)
    if policy == "none" or text is None:
        return None
    if policy == "sha256":
        return Retained({"sha256": sha256_text(text)})
    cut = limit is not None and len(text) > limit
    source = text[: limit + _CUT_MARGIN] if cut else text
    kept = redact(source) if policy == "redacted" else source
    if cut:
        kept = kept[:limit]
    digest = {"kept": policy, "sha256": sha256_text(kept)}
    if cut:
        digest |= {"chars": str(len(text)), "full_sha256": sha256_text(text)}
    return Retained(digest, kept)
