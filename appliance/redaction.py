"""Finding secrets and personal data in text, in linear time: the one redactor behind the
audit log's `redacted` retention, the key scrubbing of logs and audit records, and the
`pii_redact` plugin.

Every pattern is compiled with RE2 (google-re2), which guarantees time linear in the text,
so hostile input cannot stall the server (Python's `re` took about a second on 40k
characters of an e-mail-like run). RE2 has no lookaround; where context matters, a check of
the match and its neighbours decides instead. Candidate patterns take whole runs (a dotted
digit run, a run of digit groups), so a hostile megabyte of "1.1.1.1..." is one candidate
to refuse, not a quarter of a million. Checksums keep false positives out: card numbers
must pass the Luhn check and IBANs their mod-97 check digits.

Placeholders: `[API_KEY]`, `[EMAIL]`, `[IBAN]`, `[CARD]`, `[IPV6]`, `[IPV4]`, `[PHONE]`, and
`[<NAME>]` for a site's own patterns (national IDs, say).
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import re2

__all__ = ["KINDS", "Redaction", "Redactor", "compile_pattern", "may_hold_key", "redact", "scrub_keys"]

# google-re2's own `sub` decodes UTF-8 offsets in Python for every match (5 us each); the
# scanner below calls RE2's Match on the encoded bytes instead (under 1 us).
_UNANCHORED = re2._Anchor.UNANCHORED

# API keys: this appliance's, OpenAI-style, AWS access key ids, GitHub and Slack tokens.
_KEYS = re2.compile(
    r"apl_[0-9a-f]{12}_[A-Za-z0-9_\-]+"
    r"|\bsk-[A-Za-z0-9_\-]{16,}"
    r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"
    r"|\b(?:ghp|gho|ghs|ghu|github_pat)_[A-Za-z0-9_]{20,}"
    r"|\bxox[abprs]-[A-Za-z0-9\-]{10,}"
)
# Literal text every match of `_KEYS` contains: a text holding none of them holds no key.
_KEY_HINTS = ("apl_", "sk-", "AKIA", "ASIA", "ghp_", "gho_", "ghs_", "ghu_", "github_pat_", "xox")
_DIGITS = b"0123456789"

Accept = Callable[[bytes, int, int], bool]  # (UTF-8 text, start, end): is the candidate really one?


def compile_pattern(pattern: str) -> re2._Regexp:  # type: ignore[name-defined]
    """Compile an admin-supplied pattern with RE2. Raises `ValueError` naming the problem
    (RE2 refuses backreferences and lookaround, which cannot run in linear time)."""
    try:
        return re2.compile(pattern)
    except re2.error as exc:
        raise ValueError(f"pattern {pattern!r} is not valid RE2 syntax: {exc}") from None


def _n_digits(chunk: bytes) -> int:
    return len(chunk) - len(chunk.translate(None, _DIGITS))


def _luhn(digits: bytes) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ch - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(data: bytes, start: int, end: int) -> bool:
    digits = data[start:end].translate(None, b" -")
    if not (13 <= len(digits) <= 19 and _luhn(digits)):
        return False
    # The digits of an IBAN whose check failed ("DE89 3704 ...") are not a card either.
    head = data[max(0, start - 5) : start].rstrip(b" ")
    return not (len(head) == 4 and head[:2].isupper() and head[:2].isalpha() and head[2:].isdigit())


def _iban(data: bytes, start: int, end: int) -> bool:
    """ISO 13616: the first four characters moved to the end, letters as 10..35, mod 97 == 1."""
    compact = data[start:end].replace(b" ", b"")
    if not 15 <= len(compact) <= 34:
        return False
    remainder = 0
    for ch in compact[4:] + compact[:4]:
        if 48 <= ch <= 57:
            remainder = (remainder * 10 + ch - 48) % 97
        else:
            remainder = (remainder * 100 + ch - 55) % 97  # "A" is 65 -> 10
    return remainder == 1


def _ipv4(data: bytes, start: int, end: int) -> bool:
    parts = data[start:end].split(b".")
    return len(parts) == 4 and data[start - 1 : start] != b"." and all(len(p) <= 3 and int(p) <= 255 for p in parts)


def _ipv6(data: bytes, start: int, end: int) -> bool:
    if data[start - 1 : start].isalnum() or _n_digits(data[start:end]) == 0:
        return False
    try:
        ipaddress.IPv6Address(data[start:end].decode("ascii"))
    except ValueError:
        return False
    return True


def _phone(data: bytes, start: int, end: int) -> bool:
    before = data[start - 1 : start]
    if before and (before.isalnum() or before in b"+_"):
        return False
    match = data[start:end]
    international = match.startswith(b"+") or b"(" in match
    looks_like_date = len(match) >= 10 and match[4:5] == b"-" and match[7:8] == b"-" and match[:4].isdigit()
    return not looks_like_date and (7 if international else 10) <= _n_digits(match) <= 15


@dataclass(frozen=True, slots=True)
class _Detector:
    name: str
    pattern: re2._Regexp  # type: ignore[name-defined]
    accept: Accept | None = None
    needs: bytes | None = None  # a byte every match contains: a memchr skips texts without it

    def apply(self, data: bytes, counts: Counter[str]) -> bytes:
        """`data` with every accepted match replaced by the placeholder."""
        if self.needs is not None and self.needs not in data:
            return data
        match = self.pattern._regexp.Match
        placeholder = f"[{self.name.upper()}]".encode()
        pieces: list[bytes] = []
        pos = last = 0
        end = len(data)
        while pos <= end:
            s, e = match(_UNANCHORED, data, pos, end)[0]
            if s < 0:
                break
            if self.accept is None or self.accept(data, s, e):
                pieces += (data[last:s], placeholder)
                last = e
                counts[self.name] += 1
            pos = e if e > s else e + 1
        if not pieces:
            return data
        pieces.append(data[last:])
        return b"".join(pieces)


_H16 = r"[0-9A-Fa-f]{0,4}"
_BUILT_IN: tuple[_Detector, ...] = (
    _Detector("api_key", _KEYS),
    _Detector(
        "email",
        re2.compile(
            r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?"
            r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}"
        ),
        needs=b"@",
    ),
    _Detector("iban", re2.compile(r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"), _iban),
    # Contiguous, or in the groups cards are printed in (4-4-4-4[-3], 4-6-5, 4-6-4).
    _Detector(
        "card",
        re2.compile(
            r"\b(?:[0-9]{13,19}|[0-9]{4}(?:[ \-][0-9]{4}){2,3}(?:[ \-][0-9]{1,4})?|[0-9]{4}[ \-][0-9]{6}[ \-][0-9]{4,5})\b"
        ),
        _card,
    ),
    _Detector("ipv6", re2.compile(rf"{_H16}(?::{_H16}){{2,}}"), _ipv6, needs=b":"),
    _Detector("ipv4", re2.compile(r"\b[0-9]+(?:\.[0-9]+){3,}\b"), _ipv4),
    _Detector(
        "phone",
        re2.compile(r"(?:\+[0-9]{1,3}[ .\-]?)?(?:\([0-9]{1,4}\)[ .\-]?)?[0-9]{2,5}(?:[ .\-]?[0-9]{2,5})+\b"),
        _phone,
    ),
)
KINDS: tuple[str, ...] = tuple(d.name for d in _BUILT_IN)


@dataclass(frozen=True, slots=True)
class Redaction:
    """Redacted text and how many of each kind were replaced (never the values)."""

    text: str
    counts: Mapping[str, int]


class Redactor:
    """Replaces each kind of value by its placeholder, kind after kind (keys first, so a key
    that contains digits is not half-taken for a phone number).

    `kinds` limits the built-in detectors; `extra` adds a site's own, name -> RE2 pattern (a
    national ID format, say), applied after the built-ins. Raises `ValueError` for an unknown
    kind or a pattern RE2 refuses.
    """

    def __init__(self, kinds: Iterable[str] | None = None, extra: Mapping[str, str] | None = None) -> None:
        wanted = set(KINDS if kinds is None else kinds)
        unknown = wanted - set(KINDS)
        if unknown:
            raise ValueError(f"unknown kinds {sorted(unknown)}: expected some of {', '.join(KINDS)}")
        self._detectors = [d for d in _BUILT_IN if d.name in wanted]
        for name, pattern in (extra or {}).items():
            if not name or not name.replace("_", "").isalnum() or name in KINDS:
                raise ValueError(f"pattern name {name!r} must be letters, digits and underscores, and not a built-in kind")
            self._detectors.append(_Detector(name, compile_pattern(pattern)))

    def redact(self, text: str) -> Redaction:
        data = text.encode("utf-8", "surrogatepass")
        counts: Counter[str] = Counter()
        for detector in self._detectors:
            data = detector.apply(data, counts)
        return Redaction(data.decode("utf-8", "surrogatepass") if counts else text, dict(counts))


_DEFAULT = Redactor()
_KEY_DETECTOR = _BUILT_IN[0]


def redact(text: str) -> str:
    """`text` with secrets and personal data replaced by placeholders (every built-in kind)."""
    return _DEFAULT.redact(text).text


def may_hold_key(text: str) -> bool:
    """False when `text` certainly holds no API-key-shaped substring (it has none of the
    literal text every one contains); True when it may."""
    return any(hint in text for hint in _KEY_HINTS)


def scrub_keys(text: str) -> str:
    """`text` with API-key-shaped substrings replaced by `[API_KEY]`; cheap when there are none."""
    if not may_hold_key(text):
        return text
    data = text.encode("utf-8", "surrogatepass")
    scrubbed = _KEY_DETECTOR.apply(data, Counter())
    return text if scrubbed is data else scrubbed.decode("utf-8", "surrogatepass")
