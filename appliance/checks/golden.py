"""Golden sets: prompts with the answers' expected properties, kept as files in `<data>/golden/`
and scored on schedule (golden_runs.py) against a baseline. This module loads and checks them;
a malformed file is reported, naming the file and the case, and only that set is skipped.

File format (`<name>.yaml`, `<name>.yml` or `<name>.json`; `appliance drift promote` appends
cases to these files, so keep to it)::

    name: helpdesk            # optional, defaults to the file stem (which it must equal)
    target: smollm2-135m-instruct   # default model or route for the cases
    max_tokens: 64            # optional default
    description: "..."        # optional, free text
    cases:
      - id: reset-password    # unique within the set
        prompt: "How do I reset my password?"   # or `messages: [{role, content}]` for chat
        model: auto           # optional: overrides target (a model or route name)
        kind: chat            # chat (default) | completion (needs `prompt`)
        max_tokens: 48
        reference: "..."      # optional: the expected answer; when present it is the similarity
                              # baseline instead of the first run's answer (promoted corrections)
        source: "feedback:..." # optional free text: where the case came from (also `notes`, `tags`)
        assert:
          contains: ["password"]      # str or list; case-insensitive unless `contains_case: true`
          not_contains: ["sorry"]
          regex: "(?i)settings"       # Python `re`, searched anywhere in the answer
          json_schema: {type: object, required: [name]}   # the answer (``` fences stripped) as JSON
          max_latency_ms: 5000
          similarity: 0.8             # cosine of the answer's and the baseline answer's
                                      # embeddings >= this; `true` = [drift] similarity_threshold

Other keys (in the set, a case or `assert`) are errors, so that a typo is not silently ignored;
keys starting with `x-` are kept for tools and ignored here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from appliance.checks.golden_assertions import Assertions, compile_schema
from appliance.errors import InvalidRequest, NotFound

__all__ = [
    "SET_NAME_PATTERN",
    "SUFFIXES",
    "GoldenCase",
    "GoldenSet",
    "GoldenSetInvalid",
    "LoadedSets",
    "find_set",
    "load_set",
    "load_sets",
]

SET_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # a file stem; promotions write to sets by it too
SUFFIXES = (".yaml", ".yml", ".json")
MAX_FILE_BYTES = 8 * 1024 * 1024
MAX_CASE_TOKENS = 8192
_NAME = re.compile(SET_NAME_PATTERN)
_SET_KEYS = {"name", "target", "max_tokens", "description", "cases"}
_CASE_KEYS = {
    "id",
    "prompt",
    "messages",
    "model",
    "kind",
    "max_tokens",
    "reference",
    "assert",
    "source",
    "notes",
    "tags",
}
_ASSERT_KEYS = {"contains", "contains_case", "not_contains", "regex", "json_schema", "max_latency_ms", "similarity"}
_ROLES = {"system", "developer", "user", "assistant", "tool"}


class GoldenSetInvalid(InvalidRequest):
    """A golden set file cannot be used: bad YAML or JSON, an unknown key or assertion, a
    duplicate case id, an invalid regex or JSON schema. The message names the file and case."""

    status = 422
    code = "invalid_golden_set"


@dataclass(frozen=True, slots=True)
class GoldenCase:
    id: str
    kind: str  # chat | completion
    prompt: str | None
    messages: list[dict[str, str]] | None
    model: str | None
    max_tokens: int | None
    reference: str | None
    assertions: Assertions

    @property
    def text(self) -> str:
        """The prompt as one text (for the router's classifier)."""
        if self.messages is not None:
            return "\n".join(m["content"] for m in self.messages)
        return self.prompt or ""

    def chat_messages(self) -> list[dict[str, str]] | None:
        if self.kind != "chat":
            return None
        return self.messages if self.messages is not None else [{"role": "user", "content": self.prompt or ""}]


@dataclass(frozen=True, slots=True)
class GoldenSet:
    name: str
    path: Path
    target: str
    max_tokens: int | None
    cases: list[GoldenCase]
    description: str = ""

    def target_of(self, case: GoldenCase) -> str:
        """The model or route a case is configured for (whose answers are its baseline)."""
        return case.model or self.target


@dataclass(slots=True)
class LoadedSets:
    """Every set in the directory: the usable ones, and why the others are not."""

    sets: dict[str, GoldenSet] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # set name (file stem) -> message


def load_sets(directory: Path, *, similarity_default: float) -> LoadedSets:
    """Load every `*.yaml|*.yml|*.json` in `directory` (none when it does not exist)."""
    out = LoadedSets()
    for path in _set_files(directory):
        name = path.stem
        try:
            gset = load_set(path, similarity_default=similarity_default)
        except GoldenSetInvalid as exc:
            out.errors.setdefault(name, exc.message)
            continue
        if name in out.sets or name in out.errors:
            out.errors[name] = f"{path.name}: another file already defines the set '{name}'"
            out.sets.pop(name, None)
            continue
        out.sets[name] = gset
    return out


def find_set(directory: Path, name: str, *, similarity_default: float) -> GoldenSet:
    """The set `name`; `NotFound` when no file holds it, `GoldenSetInvalid` when it is malformed."""
    if not _NAME.match(name):
        raise NotFound(f"no golden set named '{name}'", param="set")
    paths = [p for p in _set_files(directory) if p.stem == name]
    if not paths:
        raise NotFound(f"no golden set named '{name}' in {directory}", param="set")
    if len(paths) > 1:
        raise GoldenSetInvalid(f"{', '.join(p.name for p in paths)}: more than one file defines the set '{name}'")
    return load_set(paths[0], similarity_default=similarity_default)


def load_set(path: Path, *, similarity_default: float) -> GoldenSet:
    """Read and check one file. Raises `GoldenSetInvalid` naming the file (and the case)."""
    where = path.name
    if not _NAME.match(path.stem):
        raise GoldenSetInvalid(f"{where}: a set's file name must match {SET_NAME_PATTERN} before its suffix")
    raw = _read(path)
    if not isinstance(raw, dict):
        raise GoldenSetInvalid(f"{where}: a golden set is a mapping with `target` and `cases`")
    _no_unknown(raw, _SET_KEYS, where)
    name = raw.get("name", path.stem)
    if name != path.stem:
        raise GoldenSetInvalid(f"{where}: name {name!r} must equal the file name's stem {path.stem!r}")
    target = raw.get("target")
    if not isinstance(target, str) or not target.strip():
        raise GoldenSetInvalid(f"{where}: `target` must name a model or route")
    max_tokens = _tokens(raw.get("max_tokens"), f"{where}: max_tokens")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise GoldenSetInvalid(f"{where}: description must be a string")
    cases_raw = raw.get("cases")
    if not isinstance(cases_raw, list) or not cases_raw:
        raise GoldenSetInvalid(f"{where}: `cases` must be a non-empty list")
    cases: list[GoldenCase] = []
    seen: set[str] = set()
    for number, item in enumerate(cases_raw, 1):
        case = _case(item, where, number, similarity_default)
        if case.id in seen:
            raise GoldenSetInvalid(f"{where}: case '{case.id}': the id is used by an earlier case")
        seen.add(case.id)
        cases.append(case)
    return GoldenSet(name, path, target.strip(), max_tokens, cases, description)


def _set_files(directory: Path) -> list[Path]:
    try:
        entries = sorted(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [p for p in entries if p.suffix.lower() in SUFFIXES and not p.name.startswith(".") and p.is_file()]


def _read(path: Path) -> Any:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise GoldenSetInvalid(f"{path.name}: larger than {MAX_FILE_BYTES // (1024 * 1024)} MB")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GoldenSetInvalid(f"{path.name}: cannot read it: {exc}") from None
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        raise GoldenSetInvalid(f"{path.name}: not valid {kind}: {exc}") from None
    except RecursionError:
        raise GoldenSetInvalid(f"{path.name}: nested too deeply") from None


def _case(item: Any, file: str, number: int, similarity_default: float) -> GoldenCase:
    if not isinstance(item, dict):
        raise GoldenSetInvalid(f"{file}: case {number}: a case is a mapping with `id` and `prompt` or `messages`")
    ident = item.get("id")
    if isinstance(ident, bool) or not isinstance(ident, str | int) or not str(ident).strip():
        raise GoldenSetInvalid(f"{file}: case {number}: `id` must be a non-empty string")
    ident = str(ident).strip()
    where = f"{file}: case '{ident}'"
    _no_unknown(item, _CASE_KEYS, where)
    kind = item.get("kind", "chat")
    if kind not in ("chat", "completion"):
        raise GoldenSetInvalid(f"{where}: kind must be chat or completion, got {kind!r}")
    prompt, messages = item.get("prompt"), item.get("messages")
    if (prompt is None) == (messages is None):
        raise GoldenSetInvalid(f"{where}: give exactly one of `prompt` and `messages`")
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        raise GoldenSetInvalid(f"{where}: prompt must be a non-empty string")
    if messages is not None:
        if kind != "chat":
            raise GoldenSetInvalid(f"{where}: `messages` is for kind chat; a completion takes `prompt`")
        messages = _messages(messages, where)
    model = item.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise GoldenSetInvalid(f"{where}: model must name a model or route")
    reference = item.get("reference")
    if reference is not None and not isinstance(reference, str):
        raise GoldenSetInvalid(f"{where}: reference must be a string")
    for key in ("source", "notes"):
        if item.get(key) is not None and not isinstance(item[key], str):
            raise GoldenSetInvalid(f"{where}: {key} must be a string")
    assertions = _assertions(item.get("assert", {}), where, similarity_default)
    return GoldenCase(
        ident,
        kind,
        prompt,
        messages,
        model.strip() if model else None,
        _tokens(item.get("max_tokens"), f"{where}: max_tokens"),
        reference,
        assertions,
    )


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise GoldenSetInvalid(f"{where}: messages must be a non-empty list of {{role, content}}")
    out = []
    for m in value:
        if (
            not isinstance(m, dict)
            or set(m) - {"role", "content"}
            or m.get("role") not in _ROLES
            or not isinstance(m.get("content"), str)
        ):
            raise GoldenSetInvalid(f"{where}: each message is {{role: {'|'.join(sorted(_ROLES))}, content: string}}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _assertions(value: Any, where: str, similarity_default: float) -> Assertions:
    if value is None:
        return Assertions()
    if not isinstance(value, dict):
        raise GoldenSetInvalid(f"{where}: `assert` must be a mapping of assertions")
    unknown = sorted(k for k in map(str, value) if k not in _ASSERT_KEYS and not k.startswith("x-"))
    if unknown:
        raise GoldenSetInvalid(
            f"{where}: unknown assertion {', '.join(unknown)} (known: {', '.join(sorted(_ASSERT_KEYS))})"
        )
    contains = _strings(value.get("contains"), f"{where}: contains")
    not_contains = _strings(value.get("not_contains"), f"{where}: not_contains")
    contains_case = value.get("contains_case", False)
    if not isinstance(contains_case, bool):
        raise GoldenSetInvalid(f"{where}: contains_case must be true or false")
    regex = value.get("regex")
    pattern = None
    if regex is not None:
        if not isinstance(regex, str):
            raise GoldenSetInvalid(f"{where}: regex must be a string")
        try:
            pattern = re.compile(regex)
        except re.error as exc:
            raise GoldenSetInvalid(f"{where}: invalid regex {regex!r}: {exc}") from None
    schema = value.get("json_schema")
    validator = None
    if schema is not None:
        try:
            validator = compile_schema(schema)
        except ValueError as exc:
            raise GoldenSetInvalid(f"{where}: invalid json_schema: {exc}") from None
    latency = value.get("max_latency_ms")
    if latency is not None and (isinstance(latency, bool) or not isinstance(latency, int | float) or not latency > 0):
        raise GoldenSetInvalid(f"{where}: max_latency_ms must be a positive number")
    similarity = value.get("similarity")
    if similarity is True:
        similarity = similarity_default
    elif similarity is False:
        similarity = None
    elif similarity is not None and (not isinstance(similarity, int | float) or not 0 <= similarity <= 1):
        raise GoldenSetInvalid(f"{where}: similarity must be true or a number from 0 to 1")
    return Assertions(
        contains=contains,
        contains_case=contains_case,
        not_contains=not_contains,
        regex=pattern,
        json_schema=schema,
        validator=validator,
        max_latency_ms=None if latency is None else float(latency),
        similarity=None if similarity is None else float(similarity),
    )


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise GoldenSetInvalid(f"{where} must be a non-empty string or a list of them")
    return tuple(items)


def _tokens(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CASE_TOKENS:
        raise GoldenSetInvalid(f"{where} must be a whole number from 1 to {MAX_CASE_TOKENS}")
    return value


def _no_unknown(raw: dict[Any, Any], known: set[str], where: str) -> None:
    unknown = sorted(str(k) for k in raw if str(k) not in known and not str(k).startswith("x-"))
    if unknown:
        raise GoldenSetInvalid(f"{where}: unknown key {', '.join(unknown)} (known: {', '.join(sorted(known))})")
