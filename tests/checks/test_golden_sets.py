"""Golden set files: the documented format loads, every kind of malformed file is refused with
a message naming the file and the case, a bad file never stops the others, and each assertion
judges answers as documented."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from appliance.checks.golden import GoldenSetInvalid, find_set, load_set, load_sets
from appliance.checks.golden_assertions import Assertions, answer_json, check_answer, compile_schema
from appliance.errors import NotFound

GOOD = """\
target: smollm2-135m-instruct
max_tokens: 64
cases:
  - id: reset-password
    prompt: "How do I reset my password?"
    max_tokens: 48
    assert:
      contains: ["password"]
      not_contains: sorry
      regex: "(?i)settings"
      json_schema: {type: object, required: [name]}
      max_latency_ms: 5000
      similarity: true
  - id: chat
    messages: [{role: system, content: "Be brief."}, {role: user, content: "Hi"}]
    model: auto
    reference: "Hello!"
    source: "feedback:abc"
    assert: {similarity: 0.6, contains: Hello, contains_case: true}
  - id: 3
    kind: completion
    prompt: "Once upon a time"
"""


def write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def test_the_documented_format_loads(tmp_path: Path) -> None:
    gset = load_set(write(tmp_path, "helpdesk.yaml", GOOD), similarity_default=0.75)
    assert (gset.name, gset.target, gset.max_tokens) == ("helpdesk", "smollm2-135m-instruct", 64)
    first, chat, completion = gset.cases
    assert first.id == "reset-password" and first.kind == "chat" and first.max_tokens == 48
    assert first.chat_messages() == [{"role": "user", "content": "How do I reset my password?"}]
    a = first.assertions
    assert a.contains == ("password",) and a.not_contains == ("sorry",) and not a.contains_case
    assert a.regex is not None and a.regex.pattern == "(?i)settings"
    assert a.max_latency_ms == 5000.0 and a.similarity == 0.75  # `true`: the [drift] threshold
    assert gset.target_of(first) == "smollm2-135m-instruct"
    assert gset.target_of(chat) == "auto" and chat.reference == "Hello!" and chat.assertions.contains_case
    assert chat.chat_messages() == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert completion.id == "3" and completion.kind == "completion" and completion.chat_messages() is None


def test_json_files_load_the_same(tmp_path: Path) -> None:
    body = {"name": "api", "target": "m", "cases": [{"id": "a", "prompt": "p", "assert": {"regex": "x+"}}]}
    gset = load_set(write(tmp_path, "api.json", json.dumps(body)), similarity_default=0.8)
    assert gset.name == "api" and gset.cases[0].assertions.regex is not None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("target: m\ncases: [\n  {id: a", "helpdesk.yaml: not valid YAML"),
        (
            "target: m\ncases:\n  - id: a\n    prompt: p\n    assert: {containz: x}\n",
            "case 'a': unknown assertion containz",
        ),
        (
            "target: m\ncases:\n  - {id: a, prompt: p}\n  - {id: a, prompt: q}\n",
            "case 'a': the id is used by an earlier case",
        ),
        ("target: m\ncases:\n  - id: a\n    prompt: p\n    assert: {regex: '(unclosed'}\n", "case 'a': invalid regex"),
        (
            "target: m\ncases:\n  - id: b\n    prompt: p\n    assert: {json_schema: {type: nope}}\n",
            "case 'b': invalid json_schema",
        ),
        (
            "target: m\ncases:\n  - id: b\n    prompt: p\n    assert: {json_schema: {required: name}}\n",
            "case 'b': invalid json_schema",
        ),
        (
            "target: m\ncases:\n  - {id: c, prompt: p, messages: [{role: user, content: x}]}\n",
            "case 'c': give exactly one",
        ),
        ("target: m\ncases:\n  - {id: c, promt: p}\n", "case 'c': unknown key promt"),
        ("target: m\ncases:\n  - {id: c, prompt: p, assert: {similarity: 2}}\n", "case 'c': similarity must be"),
        ("target: m\ncases:\n  - {id: c, prompt: p, max_tokens: 0}\n", "case 'c': max_tokens"),
        ("target: m\ncases:\n  - {prompt: p}\n", "case 1: `id` must be"),
        ("cases:\n  - {id: a, prompt: p}\n", "`target` must name"),
        ("name: other\ntarget: m\ncases:\n  - {id: a, prompt: p}\n", "must equal the file name's stem"),
        ("target: m\ncases: []\n", "`cases` must be a non-empty list"),
        ("- just a list\n", "a golden set is a mapping"),
    ],
)
def test_malformed_files_name_the_file_and_the_case(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, "helpdesk.yaml", text)
    with pytest.raises(GoldenSetInvalid) as caught:
        load_set(path, similarity_default=0.8)
    assert caught.value.message.startswith("helpdesk.yaml: ")
    assert expected in caught.value.message
    assert caught.value.status == 422


def test_a_bad_file_never_stops_the_others(tmp_path: Path) -> None:
    write(tmp_path, "good.yaml", GOOD)
    write(tmp_path, "broken.json", "{not json")
    write(tmp_path, "dupe.yaml", "target: m\ncases:\n  - {id: a, prompt: p}\n")
    write(tmp_path, "dupe.yml", "target: m\ncases:\n  - {id: a, prompt: p}\n")
    write(tmp_path, "notes.txt", "not a set")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00garbage")
    loaded = load_sets(tmp_path, similarity_default=0.8)
    assert list(loaded.sets) == ["good"]
    assert set(loaded.errors) == {"broken", "dupe", "bin"}
    assert loaded.errors["broken"].startswith("broken.json: not valid JSON")
    assert "another file already defines the set 'dupe'" in loaded.errors["dupe"]
    assert "cannot read it" in loaded.errors["bin"]
    assert load_sets(tmp_path / "missing", similarity_default=0.8).sets == {}


def test_find_set_refuses_unknown_and_path_like_names(tmp_path: Path) -> None:
    write(tmp_path, "good.yaml", GOOD)
    assert find_set(tmp_path, "good", similarity_default=0.8).name == "good"
    for name in ("missing", "../good", "good.yaml", "", ".hidden"):
        with pytest.raises(NotFound):
            find_set(tmp_path, name, similarity_default=0.8)


def test_contains_and_not_contains_ignore_case_unless_asked() -> None:
    loose = Assertions(contains=("PASSWORD",), not_contains=("Sorry",))
    assert _passed(check_answer(loose, "Open settings to reset your password.", 10, None)) == [True, True]
    assert _passed(check_answer(loose, "sorry, no", 10, None)) == [False, False]
    strict = Assertions(contains=("Password",), contains_case=True)
    assert _passed(check_answer(strict, "your password", 10, None)) == [False]
    assert _passed(check_answer(strict, "your Password", 10, None)) == [True]


def test_regex_latency_and_similarity_assertions() -> None:
    a = Assertions(regex=re.compile(r"(?i)settings"), max_latency_ms=100, similarity=0.8)
    checks = check_answer(a, "Go to Settings.", 50, 0.85)
    assert _passed(checks) == [True, True, True]
    checks = check_answer(a, "Go away.", 150, 0.5)
    assert _passed(checks) == [False, False, False]
    assert checks[2]["detail"].startswith("0.500 (threshold 0.800)")
    missing = check_answer(a, "Settings", 1, None, similarity_note="no baseline yet")
    assert missing[2] == {"assertion": "similarity", "passed": False, "detail": "no baseline yet"}


def test_json_schema_assertion_reads_the_answer_as_json() -> None:
    a = Assertions(
        json_schema={"type": "object", "required": ["name"]},
        validator=compile_schema({"type": "object", "required": ["name"]}),
    )
    assert _passed(check_answer(a, '{"name": "Ada"}', 1, None)) == [True]
    assert _passed(check_answer(a, '```json\n{"name": "Ada"}\n```', 1, None)) == [True]
    missing = check_answer(a, '{"age": 3}', 1, None)
    assert not missing[0]["passed"] and "name" in missing[0]["detail"]
    prose = check_answer(a, "Sure! Here it is.", 1, None)
    assert not prose[0]["passed"] and prose[0]["detail"].startswith("the answer is not JSON")
    assert answer_json(" [1, 2] ") == [1, 2]


def test_schemas_are_checked_and_never_fetched() -> None:
    for bad in ({"type": "nope"}, "a string", 5):
        with pytest.raises(ValueError):
            compile_schema(bad)
    with pytest.raises(ValueError, match="Retrieval is disabled"):  # offline: a remote $ref is never fetched
        compile_schema({"$ref": "http://10.255.255.1/schema.json"})


def _passed(checks: list[dict[str, object]]) -> list[bool]:
    return [bool(c["passed"]) for c in checks]


def test_a_promoted_case_as_appliance_drift_promote_writes_it(tmp_path: Path) -> None:
    doc = {
        "name": "capitals",
        "target": "smollm2-135m-instruct",
        "cases": [
            {
                "id": "fb-1",
                "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital?"}],
                "model": None,
                "reference": "Paris.",
                "assert": {"similarity": True},
            },
        ],
    }
    path = write(tmp_path, "capitals.yaml", yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=120))
    case = load_set(path, similarity_default=0.8).cases[0]
    assert case.reference == "Paris." and case.model is None and case.assertions.similarity == 0.8
