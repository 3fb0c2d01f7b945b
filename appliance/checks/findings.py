"""What a check run finds: one `Finding` per subject it looked at (a model, a disk, a
table), each ok, warn or fail, and the plain-JSON form plugins return them in."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

Status = Literal["ok", "warn", "fail", "error"]
STATUSES: tuple[Status, ...] = ("ok", "warn", "fail", "error")  # rising severity; "error": the check itself broke
_RANK = {s: i for i, s in enumerate(STATUSES)}


def rank(status: str) -> int:
    return _RANK.get(status, _RANK["error"])


def worst(statuses: list[str] | tuple[str, ...]) -> Status:
    return cast(Status, max(statuses, key=rank)) if statuses else "ok"


@dataclass(frozen=True, slots=True)
class Finding:
    """`subject` names what was looked at, so that alerts on two disks are two alerts;
    `details` holds the readings, plain JSON values (never a secret)."""

    status: Status
    summary: str
    subject: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"subject": self.subject, "status": self.status, "summary": self.summary, "details": self.details}


def ok(summary: str, subject: str = "", **details: Any) -> Finding:
    return Finding("ok", summary, subject, details)


def warn(summary: str, subject: str = "", **details: Any) -> Finding:
    return Finding("warn", summary, subject, details)


def fail(summary: str, subject: str = "", **details: Any) -> Finding:
    return Finding("fail", summary, subject, details)


def to_mapping(findings: list[Finding]) -> dict[str, Any]:
    """The form a `Check.run` returns (hookspecs): `{"findings": [...]}`."""
    return {"findings": [f.to_dict() for f in findings]}


def from_mapping(result: Any) -> list[Finding]:
    """Read what a `Check.run` returned: `{"findings": [{subject, status, summary, details}]}`,
    or one finding as `{"status", "summary", ...readings}`. Raises `ValueError` otherwise."""
    if result is None:
        return [Finding("ok", "no findings")]
    if isinstance(result, Finding):
        return [result]
    if isinstance(result, list) and all(isinstance(f, Finding) for f in result):
        return list(result)
    if not isinstance(result, Mapping):
        raise ValueError(f"a check must return a mapping, got {type(result).__name__}")
    if "findings" in result:
        items = result["findings"]
        if not isinstance(items, list) or not all(isinstance(i, Mapping) for i in items):
            raise ValueError("findings must be a list of mappings")
        return [_one(item) for item in items] or [Finding("ok", "no findings")]
    return [_one(result)]


def _one(item: Mapping[str, Any]) -> Finding:
    status = item.get("status", "ok")
    if status not in STATUSES:
        raise ValueError(f"finding status must be one of {', '.join(STATUSES)}, got {status!r}")
    summary = item.get("summary", "")
    subject = item.get("subject", "")
    if not isinstance(summary, str) or not isinstance(subject, str):
        raise ValueError("a finding's summary and subject must be strings")
    details = item.get("details")
    if details is None:
        details = {k: v for k, v in item.items() if k not in ("status", "summary", "subject")}
    if not isinstance(details, Mapping):
        raise ValueError("a finding's details must be a mapping")
    return Finding(cast(Status, status), summary or status, subject, dict(details))
