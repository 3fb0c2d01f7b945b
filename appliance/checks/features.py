"""Features of a request kept in its audit record at request time, so that drift can be
measured whatever the prompt retention policy (hash-only keeps no text to measure later):
the script the prompt is written in, and whether the answer reads like a refusal."""

from __future__ import annotations

import re
import unicodedata

# Enough text to tell a script or a refusal; never the whole of a long prompt.
_SAMPLE_CHARS = 2000
_SCRIPTS = ("LATIN", "CYRILLIC", "GREEK", "ARABIC", "HEBREW", "CJK", "HIRAGANA", "KATAKANA", "HANGUL", "DEVANAGARI", "THAI")
_REFUSAL = re.compile(
    r"(?i)^\W*(?:i'?m sorry|i am sorry|sorry,|i apologi[sz]e|unfortunately,? i|as an ai\b|"
    r"i (?:can(?:no|')t|cannot|am unable to|'m unable to|won'?t|will not|am not able to) "
    r"(?:help|assist|provide|comply|do that|answer|fulfil|share|give))"
)


def script_of(text: str) -> str:
    """The script most of the letters in `text` are written in (lower case: "latin",
    "cyrillic", "cjk"...), "other" for letters of none of those, "none" without letters."""
    sample = text[:_SAMPLE_CHARS]
    if sample.isascii():  # most prompts: every ASCII letter is Latin, no per-character lookup
        return "latin" if sample.lower() != sample.upper() else "none"
    counts: dict[str, int] = {}
    for ch in sample:
        if not ch.isalpha():
            continue
        name = unicodedata.name(ch, "")
        script = next((s for s in _SCRIPTS if name.startswith(s)), "OTHER")
        counts[script] = counts.get(script, 0) + 1
    if not counts:
        return "none"
    return max(counts, key=lambda s: counts[s]).lower()


def looks_like_refusal(answer: str) -> bool:
    """Whether an answer opens as a refusal ("I'm sorry, I can't help with that")."""
    return bool(_REFUSAL.match(answer[:200]))
