"""A correction's promotion to a golden-set case: the case a feedback makes (or why it cannot
make one), added to `<data>/golden/<set>.yaml` in the same transaction as its audit record."""

from __future__ import annotations

import os
import re
import sqlite3
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from appliance.audit.log import Actor, AuditLog
from appliance.checks.golden import SET_NAME_PATTERN
from appliance.errors import Conflict, InvalidRequest
from appliance.store import Store

if TYPE_CHECKING:
    from appliance.feedback import FeedbackView, Kept

__all__ = ["CASE_ID", "messages_of", "promote"]

CASE_ID = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
_ROLE_LINE = re.compile(r"^(system|developer|user|assistant|tool): ?(.*)$")


def promote(
    store: Store, audit: AuditLog, golden_dir: Path, view: FeedbackView, set_name: str, case_id: str | None, *,
    actor: Actor,
) -> dict[str, Any]:
    """Add the feedback's correction, as the reference answer to its prompt, to the golden
    set `<golden_dir>/<set_name>.yaml` (created when missing), audited. Raises `Conflict`
    when the prompt or the correction was not kept, or the case exists already."""
    if not re.fullmatch(SET_NAME_PATTERN, set_name):
        raise InvalidRequest("set must be 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'", param="set")
    feedback_id = view.feedback.id
    case_id = case_id or feedback_id
    if not re.fullmatch(CASE_ID, case_id):
        raise InvalidRequest("case_id must be letters, digits, '.', '_', ':' or '-'", param="case_id")
    case = _case(view, case_id)
    path = golden_dir / f"{set_name}.yaml"
    after = {"set": set_name, "case_id": case_id, "path": str(path)}
    record = audit.admin_fn(actor, "feedback.promote", feedback_id, after=after)

    def write(conn: sqlite3.Connection) -> None:
        changed = conn.execute(
            "UPDATE feedback SET promoted_to = ? WHERE id = ? AND promoted_to IS NULL", (set_name, feedback_id)
        ).rowcount
        if not changed:
            raise Conflict(f"feedback {feedback_id} was promoted already")
        record(conn)
        _add_case(path, set_name, view.feedback.model or view.requested or "", case)  # last: a failure rolls back

    store.write_sync(write)
    return {"feedback_id": feedback_id, "set": set_name, "case_id": case_id, "path": str(path), "case": case}


def messages_of(text: str) -> list[dict[str, str]]:
    """A chat's messages from the "role: content" lines the audit log keeps (a line that
    starts with no role continues the message before it)."""
    messages: list[dict[str, str]] = []
    for line in text.split("\n"):
        match = _ROLE_LINE.match(line)
        if match:
            messages.append({"role": match[1], "content": match[2]})
        elif messages:
            messages[-1]["content"] += "\n" + line
        else:
            messages.append({"role": "user", "content": line})
    return messages


def _why(kept: Kept, what: str) -> str:
    return {
        "absent": f"it has no {what}",
        "none": f"its {what} was not kept (retention policy none)",
        "sha256": f"only a digest of its {what} was kept (retention policy sha256)",
        "erased": f"its {what} was erased",
    }.get(kept.state, f"its {what} was kept only in part (cut at the policy's limit)")


def _case(view: FeedbackView, case_id: str) -> dict[str, Any]:
    """The golden case a feedback makes, or `Conflict` saying what is missing."""
    f = view.feedback
    if f.promoted_to is not None:
        raise Conflict(f"feedback {f.id} was promoted already, to golden set {f.promoted_to!r}")
    for kept, what in ((view.correction, "correction"), (view.prompt, "prompt")):
        if kept.text is None or kept.cut:
            hint = " (a key's or team's prompt retention must be redacted or full)" if what == "prompt" else ""
            raise Conflict(f"feedback {f.id} cannot become a golden case: {_why(kept, what)}{hint}.")
    assert view.prompt.text is not None
    case: dict[str, Any] = {"id": case_id}
    if view.kind == "chat":
        case["messages"] = messages_of(view.prompt.text)
    else:
        case["prompt"] = view.prompt.text
    case |= {"model": view.requested, "reference": view.correction.text, "assert": {"similarity": True}}
    return case


def _add_case(path: Path, set_name: str, target: str, case: dict[str, Any]) -> None:
    """Append `case` to the golden set at `path` (rewritten whole, atomically)."""
    if path.exists():
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise Conflict(f"{path} is not a readable golden set: {exc}") from None
        if not isinstance(doc, dict) or not isinstance(doc.setdefault("cases", []), list):
            raise Conflict(f"{path} is not a golden set (a mapping with a list of cases)")
    else:
        doc = {"name": set_name, "target": target, "cases": []}
    if any(isinstance(c, dict) and c.get("id") == case["id"] for c in doc["cases"]):
        raise Conflict(f"golden set {set_name!r} already has a case {case['id']!r}", param="case_id")
    doc["cases"].append(case)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            yaml.safe_dump(doc, fh, sort_keys=False, allow_unicode=True, width=120)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
