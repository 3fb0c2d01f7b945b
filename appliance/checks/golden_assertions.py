"""A golden case's assertions and how an answer is checked against them: each gives a named
result (passed, and a short detail saying what was expected and what came), never raising."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import jsonschema_rs

__all__ = ["Assertions", "answer_json", "check_answer", "compile_schema"]

_FENCE = re.compile(r"^\s*```[A-Za-z0-9_-]*\s*\n(.*?)\n?```\s*$", re.DOTALL)
_DETAIL_CHARS = 160


@dataclass(frozen=True, slots=True)
class Assertions:
    contains: tuple[str, ...] = ()
    contains_case: bool = False
    not_contains: tuple[str, ...] = ()
    regex: re.Pattern[str] | None = None
    json_schema: Any = None
    validator: Any = field(default=None, compare=False, repr=False)
    max_latency_ms: float | None = None
    similarity: float | None = None  # the threshold, when the case asserts similarity

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.contains:
            out["contains"] = list(self.contains)
            out["contains_case"] = self.contains_case
        if self.not_contains:
            out["not_contains"] = list(self.not_contains)
        if self.regex is not None:
            out["regex"] = self.regex.pattern
        if self.json_schema is not None:
            out["json_schema"] = self.json_schema
        if self.max_latency_ms is not None:
            out["max_latency_ms"] = self.max_latency_ms
        if self.similarity is not None:
            out["similarity"] = self.similarity
        return out


def compile_schema(schema: Any) -> Any:
    """A validator for a JSON schema (a mapping or a boolean), checked against its meta-schema;
    remote `$ref`s are never fetched. Raises `ValueError` saying what is wrong."""
    if not isinstance(schema, dict | bool):
        raise ValueError("a JSON schema is a mapping (or true/false)")
    try:
        return jsonschema_rs.validator_for(schema, offline=True)
    except (jsonschema_rs.ValidationError, ValueError, TypeError) as exc:
        raise ValueError(str(exc).splitlines()[0]) from None


def answer_json(answer: str) -> Any:
    """The answer as JSON: the whole text, or the inside of one ``` fence around it.
    Raises `ValueError` when it is not JSON."""
    text = answer.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    return json.loads(text)


def check_answer(
    assertions: Assertions, answer: str, latency_ms: float, similarity: float | None, *, similarity_note: str = ""
) -> list[dict[str, Any]]:
    """One `{"assertion", "passed", "detail"}` per assertion the case makes. `similarity` is the
    cosine to the baseline answer; None with a `similarity_note` saying why when it could not be
    had (the note is added to the detail otherwise)."""
    out: list[dict[str, Any]] = []
    folded = answer if assertions.contains_case else answer.casefold()
    for needle in assertions.contains:
        hit = (needle if assertions.contains_case else needle.casefold()) in folded
        out.append(_result("contains", hit, f"{needle!r} {'found' if hit else 'not found'}"))
    for needle in assertions.not_contains:
        hit = (needle if assertions.contains_case else needle.casefold()) in folded
        out.append(_result("not_contains", not hit, f"{needle!r} {'found' if hit else 'absent'}"))
    if assertions.regex is not None:
        hit = assertions.regex.search(answer) is not None
        out.append(_result("regex", hit, f"/{assertions.regex.pattern}/ {'matched' if hit else 'did not match'}"))
    if assertions.validator is not None:
        out.append(_schema_result(assertions.validator, answer))
    if assertions.max_latency_ms is not None:
        fast = latency_ms <= assertions.max_latency_ms
        out.append(_result("max_latency_ms", fast, f"{latency_ms:.0f} ms (limit {assertions.max_latency_ms:.0f})"))
    if assertions.similarity is not None:
        if similarity is None:
            out.append(_result("similarity", False, similarity_note or "no similarity could be measured"))
        else:
            good = similarity >= assertions.similarity
            detail = f"{similarity:.3f} (threshold {assertions.similarity:.3f})"
            out.append(_result("similarity", good, f"{detail}: {similarity_note}" if similarity_note else detail))
    return out


def _schema_result(validator: Any, answer: str) -> dict[str, Any]:
    try:
        value = answer_json(answer)
    except ValueError as exc:
        return _result("json_schema", False, f"the answer is not JSON: {exc}")
    error = next(iter(validator.iter_errors(value)), None)
    if error is None:
        return _result("json_schema", True, "valid")
    path = "/".join(map(str, error.instance_path)) or "(root)"
    return _result("json_schema", False, f"at {path}: {error.message}")


def _result(name: str, passed: bool, detail: str) -> dict[str, Any]:
    if len(detail) > _DETAIL_CHARS:
        detail = detail[: _DETAIL_CHARS - 1] + "…"
    return {"assertion": name, "passed": bool(passed), "detail": detail}
