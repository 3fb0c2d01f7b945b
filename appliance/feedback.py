"""Users' feedback on answers: a rating (and perhaps a correction) of one response, found by
the response's own id and tied to its request's audit record; the admins' view of it; its
export as prompt, answer and correction triples; and a correction's promotion to a golden-set
case. The loop, and why it is built this way, is described in docs/feedback.md.

Where the texts live: the prompt and the answer beside the request's audit record, under the
key's prompt and answer retention; a correction and a comment beside the feedback's own audit
record (an `admin`-kind record, action `feedback.create`, written in the same transaction as
the `feedback` row), under the answer retention of the key that made the request, since a
correction is an answer written by a person. So every kept text is checked by `appliance
audit verify` and removed by `appliance audit erase`, and the `feedback` table holds none.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

from appliance.audit.log import Actor, AuditLog, admin_body
from appliance.audit.retention import resolve_policy, retain
from appliance.auth.principal import Principal, Role
from appliance.config import Settings
from appliance.errors import InvalidRequest, NotFound
from appliance.feedback_promotion import messages_of, promote
from appliance.redaction import scrub_keys
from appliance.store import Store

__all__ = [
    "RATINGS",
    "MAX_FEEDBACK_CHARS",
    "Feedback",
    "FeedbackService",
    "FeedbackView",
    "current_scores",
    "export_lines",
    "score_of",
]

MAX_FEEDBACK_CHARS = 32 * 1024  # a correction or a comment
RATINGS = ("up", "down", "1", "2", "3", "4", "5")
TEXTS = ("prompt", "answer", "correction")  # what an exported triple is made of
MAX_LIST = 1000

_SELECT = """
SELECT f.id, f.response_id, f.request_idx, f.key_id, f.team_id, f.model, f.rating, f.score, f.created_at,
       f.audit_idx, f.promoted_to, ra.body AS request_body, rc.content AS request_content,
       fa.body AS feedback_body, fc.content AS feedback_content,
       f.id = (SELECT g.id FROM feedback g WHERE g.response_id = f.response_id
               ORDER BY g.created_at DESC, g.rowid DESC LIMIT 1) AS current
FROM feedback f
JOIN audit ra ON ra.idx = f.request_idx
LEFT JOIN audit_content rc ON rc.idx = f.request_idx
LEFT JOIN audit fa ON fa.idx = f.audit_idx
LEFT JOIN audit_content fc ON fc.idx = f.audit_idx
"""


def score_of(rating: str) -> float:
    """0..1: down 0, up 1, n stars (n-1)/4."""
    if rating in ("up", "down"):
        return 1.0 if rating == "up" else 0.0
    return (int(rating) - 1) / 4


def _rating_text(rating: str | int) -> str:
    text = rating if isinstance(rating, str) else str(rating) if type(rating) is int else ""
    if text not in RATINGS:
        raise InvalidRequest("rating must be 'up', 'down' or a whole number of stars from 1 to 5", param="rating")
    return text


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds")


@dataclass(frozen=True, slots=True)
class Feedback:
    id: str
    response_id: str
    request_idx: int
    rating: str  # up | down | 1..5
    score: float
    created_at: float
    key_id: str | None = None  # who gave it
    team_id: str | None = None
    model: str | None = None  # what served the response
    audit_idx: int | None = None
    promoted_to: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "feedback",
            "response_id": self.response_id,
            "rating": int(self.rating) if self.rating.isdigit() else self.rating,
            "score": self.score,
            "created_at": _iso(self.created_at),
        }


@dataclass(frozen=True, slots=True)
class Kept:
    """What the audit log holds of one text: `state` is the policy that kept it (full,
    redacted), sha256 (a digest only), none, erased, or absent (none was given)."""

    state: str
    text: str | None = None
    cut: bool = False  # kept only up to the policy's limit


def _kept(body: dict[str, Any], content: dict[str, str] | None, field: str) -> Kept:
    digest = body.get(field)
    if not isinstance(digest, dict):
        return Kept("none")
    if "kept" not in digest:
        return Kept("sha256")
    text = (content or {}).get(field)
    if text is None:
        return Kept("erased")
    return Kept(str(digest["kept"]), text, cut="full_sha256" in digest)


@dataclass(frozen=True, slots=True)
class FeedbackView:
    """Feedback with what is kept of its request's prompt and answer and of its own texts."""

    feedback: Feedback
    kind: str | None  # chat | completion
    requested: str | None  # the route or model the client asked for
    current: bool  # the newest feedback on its response
    prompt: Kept
    answer: Kept
    correction: Kept
    comment: Kept

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> FeedbackView:
        request = json.loads(row["request_body"])
        own = json.loads(row["feedback_body"]) if row["feedback_body"] else {}
        given = own.get("after") or {}
        request_content = json.loads(row["request_content"]) if row["request_content"] else None
        own_content = json.loads(row["feedback_content"]) if row["feedback_content"] else None
        trail = request.get("route_trail")
        feedback = Feedback(
            row["id"], row["response_id"], row["request_idx"], row["rating"], row["score"], row["created_at"],
            row["key_id"], row["team_id"], row["model"], row["audit_idx"], row["promoted_to"],
        )  # fmt: skip
        return cls(
            feedback,
            kind=request.get("kind"),
            requested=trail.split(">", 1)[0] if trail else request.get("model"),
            current=bool(row["current"]),
            prompt=_kept(request, request_content, "prompt"),
            answer=_kept(request, request_content, "answer"),
            correction=_kept(own, own_content, "correction") if given.get("has_correction") else Kept("absent"),
            comment=_kept(own, own_content, "comment") if given.get("has_comment") else Kept("absent"),
        )

    def to_dict(self) -> dict[str, Any]:
        """The admins' view: never the prompt's or the answer's text (the export has them)."""
        f = self.feedback
        kept = {name: getattr(self, name).state for name in ("prompt", "answer", "correction", "comment")}
        return f.to_dict() | {
            "request_idx": f.request_idx,
            "audit_idx": f.audit_idx,
            "key_id": f.key_id,
            "team_id": f.team_id,
            "model": f.model,
            "kind": self.kind,
            "current": self.current,
            "correction": self.correction.text,
            "comment": self.comment.text,
            "kept": kept,
            "promoted_to": f.promoted_to,
        }

    def example(self) -> dict[str, Any]:
        """One exported line: the triple, with what is missing of it and why."""
        f = self.feedback
        line: dict[str, Any] = {
            "feedback_id": f.id,
            "response_id": f.response_id,
            "model": f.model,
            "kind": self.kind,
            "rating": int(f.rating) if f.rating.isdigit() else f.rating,
            "score": f.score,
            "prompt": self.prompt.text,
        }
        if self.kind == "chat" and self.prompt.text is not None:
            line["messages"] = messages_of(self.prompt.text)
        line |= {
            "answer": self.answer.text,
            "correction": self.correction.text,
            "missing": [name for name in TEXTS if getattr(self, name).text is None],
            "kept": {name: getattr(self, name).state for name in TEXTS},
        }
        cut = [name for name in TEXTS if getattr(self, name).cut]
        if cut:
            line["cut"] = cut
        return line


def _query(
    conn: sqlite3.Connection,
    *,
    model: str | None = None,
    rating: str | None = None,
    since: float | None = None,
    current_only: bool = False,
    newest_first: bool = True,
    limit: int | None = None,
) -> Iterator[FeedbackView]:
    where, params = [], []
    for clause, value in (("f.model = ?", model), ("f.rating = ?", rating), ("f.created_at >= ?", since)):
        if value is not None:
            where.append(clause)
            params.append(value)
    if current_only:
        where.append("current")
    sql = _SELECT + (" WHERE " + " AND ".join(where) if where else "")
    sql += " ORDER BY f.created_at DESC, f.rowid DESC" if newest_first else " ORDER BY f.created_at, f.rowid"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    cursor = conn.execute(sql, params)
    try:
        for row in cursor:
            yield FeedbackView.from_row(row)
    finally:
        cursor.close()


def export_lines(conn: sqlite3.Connection, *, model: str | None = None, since: float | None = None) -> Iterator[str]:
    """JSON lines, oldest first, one per rated response (its newest feedback), then one
    `{"summary": {...}}` line: how many lines, how many are whole triples, and per text what
    was missing, by why (`none`, `sha256`, `erased`, `absent`)."""
    lines = complete = 0
    missing: dict[str, Counter[str]] = {name: Counter() for name in TEXTS}
    for view in _query(conn, model=model, since=since, current_only=True, newest_first=False):
        line = view.example()
        lines += 1
        complete += not line["missing"]
        for name in line["missing"]:
            missing[name][getattr(view, name).state] += 1
        yield json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n"
    summary = {"lines": lines, "complete": complete, "missing": {k: dict(v) for k, v in missing.items() if v}}
    yield json.dumps({"summary": summary}, separators=(",", ":")) + "\n"


def current_scores(conn: sqlite3.Connection, since: float) -> list[tuple[str, float, float]]:
    """(model, score, created_at) of each response's newest feedback since `since`, oldest
    first: the feedback rate per model, counting each rated response once."""
    rows = conn.execute(
        "SELECT f.model, f.score, f.created_at FROM feedback f WHERE f.created_at >= ? AND f.id = (SELECT g.id FROM"
        " feedback g WHERE g.response_id = f.response_id ORDER BY g.created_at DESC, g.rowid DESC LIMIT 1)"
        " ORDER BY f.created_at",
        (since,),
    )
    return [(row[0], row[1], row[2]) for row in rows]


class FeedbackService:
    """Feedback: given by the key that made the request (or an admin), each one written with
    its audit record in one transaction; listed, exported and promoted by admins."""

    def __init__(self, store: Store, audit: AuditLog, settings: Settings) -> None:
        self._store = store
        self._audit = audit
        self._default_policy = settings.audit.default_answer_retention
        self.golden_dir = settings.paths.root / "golden"

    def give(
        self,
        principal: Principal,
        response_id: str,
        rating: str | int,
        *,
        correction: str | None = None,
        comment: str | None = None,
        actor: Actor,
    ) -> Feedback:
        """Raises `NotFound` for an unknown id, and for another key's response unless the
        caller is an admin (so ids cannot be probed), `InvalidRequest` for a bad rating or a
        text over `MAX_FEEDBACK_CHARS`."""
        stored = _rating_text(rating)
        texts = {"correction": _text(correction, "correction"), "comment": _text(comment, "comment")}
        found = self._store.query_one(
            "SELECT r.idx, a.key_id, a.body FROM audit_responses r JOIN audit a ON a.idx = r.idx WHERE r.response_id = ?",
            (response_id,),
        )
        if found is None or not (principal.role is Role.ADMIN or found["key_id"] == principal.key_id):
            raise NotFound(f"No response with id {response_id!r}.", param="id")
        policy = self._answer_policy(found["key_id"])
        feedback = Feedback(
            id=f"fb-{secrets.token_hex(12)}",
            response_id=response_id,
            request_idx=int(found["idx"]),
            rating=stored,
            score=score_of(stored),
            created_at=time.time(),
            key_id=principal.key_id,
            team_id=principal.team_id,
            model=json.loads(found["body"]).get("model"),
        )
        digests, content = {}, {}
        for name, text in texts.items():
            # Scrubbed of key-shaped strings first, as the audit log stores it, so the digest holds.
            kept = retain(
                policy, scrub_keys(text) if text and policy in ("redacted", "full") else text, limit=MAX_FEEDBACK_CHARS
            )
            if kept is not None:
                digests[name] = kept.digest
                if kept.text is not None:
                    content[name] = kept.text
        after = {
            "feedback_id": feedback.id,
            "response_id": response_id,
            "request_idx": feedback.request_idx,
            "model": feedback.model,
            "rating": stored,
            "score": feedback.score,
            "has_correction": texts["correction"] is not None,
            "has_comment": texts["comment"] is not None,
            "retention": policy,
        }
        body = dict(admin_body(actor, "feedback.create", feedback.id, after=after)) | digests
        append = self._audit.append_fn(
            "admin", body, key_id=actor.key_id, team_id=actor.team_id, ts=feedback.created_at, content=content or None
        )
        row = asdict(feedback)

        def write(conn: sqlite3.Connection) -> int:
            idx = append(conn)
            conn.execute(
                "INSERT INTO feedback (id, response_id, request_idx, key_id, team_id, model, rating, score, created_at,"
                " audit_idx) VALUES (:id, :response_id, :request_idx, :key_id, :team_id, :model, :rating, :score,"
                " :created_at, :audit_idx)",
                row | {"audit_idx": idx},
            )
            return idx

        return replace(feedback, audit_idx=self._store.write_sync(write))

    def _answer_policy(self, key_id: str | None) -> str:
        """The answer retention of the key that made the request: its own, its team's, the default."""
        row = self._store.query_one(
            "SELECT k.answer_retention, t.answer_retention FROM api_keys k JOIN teams t ON t.id = k.team_id"
            " WHERE k.id = ?",
            (key_id,),
        )
        return resolve_policy(row[0] if row else None, row[1] if row else None, self._default_policy)

    def list(
        self, *, model: str | None = None, rating: str | None = None, since: float | None = None, limit: int = 100
    ) -> list[FeedbackView]:
        """Newest first."""
        if not 1 <= limit <= MAX_LIST:
            raise InvalidRequest(f"limit must be between 1 and {MAX_LIST}", param="limit")
        if rating is not None:
            rating = _rating_text(rating)
        return list(_query(self._store.reader(), model=model, rating=rating, since=since, limit=limit))

    def get(self, feedback_id: str) -> FeedbackView:
        sql = _SELECT + " WHERE f.id = ?"
        row = self._store.query_one(sql, (feedback_id,))
        if row is None:
            raise NotFound(f"No feedback {feedback_id!r}.")
        return FeedbackView.from_row(row)

    def promote(self, feedback_id: str, set_name: str, case_id: str | None = None, *, actor: Actor) -> dict[str, Any]:
        """`feedback_promotion.promote` on this feedback, into `<data>/golden/`."""
        return promote(self._store, self._audit, self.golden_dir, self.get(feedback_id), set_name, case_id, actor=actor)


def _text(value: str | None, param: str) -> str | None:
    if value is None or not value.strip():
        return None
    if len(value) > MAX_FEEDBACK_CHARS:
        raise InvalidRequest(f"{param} is longer than {MAX_FEEDBACK_CHARS} characters", param=param)
    return value
