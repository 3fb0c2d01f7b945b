"""A site's own threshold for the `auto` router: fitted on its labelled requests (a golden
set of easy and hard prompts), saved beside the database, audited, and in force at once."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from appliance.audit.log import Actor, AuditLog
from appliance.errors import InvalidRequest
from appliance.store import Store

MIN_EACH = 10  # fewer of either label cannot place a threshold with any confidence
MAX_EACH = 500  # of each label: enough to place a threshold, and one request body carries it
MAX_PROMPT_CHARS = 8_000


class CalibrationService:
    def __init__(self, store: Store, audit: AuditLog, path: Path, *, on_change: Callable[[], None] = lambda: None) -> None:
        """`on_change` runs after each change (the router drops its scorer, so the next
        `auto` decision uses the new threshold)."""
        self._store = store
        self._audit = audit
        self.path = path
        self._on_change = on_change

    def current(self) -> dict[str, Any]:
        """The threshold in force: the site's calibration, or the packaged one."""
        from appliance.routing.classifier import DifficultyClassifier, load_calibration

        packaged = DifficultyClassifier.load().threshold
        try:
            saved = load_calibration(self.path)
            problem = None
        except ValueError as exc:
            saved, problem = None, str(exc)
        out: dict[str, Any] = {"calibrated": saved is not None, "packaged_threshold": packaged,
                               "threshold": saved.threshold if saved else packaged}
        if saved is not None:
            out |= {"accuracy": saved.accuracy, "hard_recall": saved.hard_recall, "examples": saved.examples}
        if problem:
            out["error"] = problem
        return out

    def calibrate(self, examples: Iterable[Any], *, actor: Actor) -> dict[str, Any]:
        """Fit the threshold on `examples` ({"prompt", "label": "easy"|"hard", optional
        "max_tokens", "json_mode"}); raises `InvalidRequest` naming the first bad one."""
        from appliance.routing.classifier import DifficultyClassifier, best_threshold

        pairs = _checked(examples)
        classifier = DifficultyClassifier.load()
        calibration = best_threshold(
            (classifier.score(p, max_tokens=m, json_mode=j), label) for p, label, m, j in pairs
        )
        before = self.current()
        after = calibration.to_dict()
        self._write(actor, "router.calibrate", before, after, lambda: _save(self.path, after))
        return self.current()

    def reset(self, *, actor: Actor) -> dict[str, Any]:
        """Back to the packaged threshold."""
        before = self.current()
        self._write(actor, "router.reset_calibration", before, None, lambda: self.path.unlink(missing_ok=True))
        return self.current()

    def _write(self, actor: Actor, action: str, before: Any, after: Any, apply: Callable[[], None]) -> None:
        audit = self._audit.admin_fn(actor, action, "auto", before=before, after=after)

        def write(conn: sqlite3.Connection) -> None:
            audit(conn)
            apply()  # last: a failure here rolls the audit record back with it

        self._store.write_sync(write)
        self._on_change()


def _checked(examples: Iterable[Any]) -> list[tuple[str, str, int | None, bool]]:
    out = []
    for number, e in enumerate(examples, 1):
        if not isinstance(e, dict) or not isinstance(e.get("prompt"), str) or e.get("label") not in ("easy", "hard"):
            raise InvalidRequest(f"example {number} needs a string prompt and a label of easy or hard", param="examples")
        if len(e["prompt"]) > MAX_PROMPT_CHARS:
            raise InvalidRequest(f"example {number}: a prompt of at most {MAX_PROMPT_CHARS:,} characters", param="examples")
        max_tokens = e.get("max_tokens")
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
            raise InvalidRequest(f"example {number}: max_tokens must be a positive integer", param="examples")
        out.append((e["prompt"], e["label"], max_tokens, bool(e.get("json_mode", False))))
    counts = {label: sum(1 for _, got, _, _ in out if got == label) for label in ("easy", "hard")}
    if max(counts.values()) > MAX_EACH:
        raise InvalidRequest(f"at most {MAX_EACH} examples of each label (got {counts['easy']} easy, {counts['hard']} hard)",
                             param="examples")
    if min(counts.values()) < MIN_EACH:
        raise InvalidRequest(
            f"calibration needs at least {MIN_EACH} easy and {MIN_EACH} hard examples (got {counts['easy']} easy, "
            f"{counts['hard']} hard)",
            param="examples",
        )
    return out


def _save(path: Path, calibration: dict[str, Any]) -> None:
    from appliance.routing.classifier import Calibration, save_calibration

    path.parent.mkdir(parents=True, exist_ok=True)
    save_calibration(path, Calibration.from_dict(calibration))
    os.chmod(path, 0o640)
