"""Input and output drift: the requests of a current window against a reference (the stored
baseline), measured on what the audit log keeps.

Input: prompt length in tokens and the script mix (PSI), and the cosine distance between the
centroids of the prompts' embeddings by the local model (the method Arize uses), over the
requests whose prompt text was kept (`audit_content`) and sampled; under hash-only retention
only the features stored at request time are used, never the prompt. Output: completion length
and the finish-reason mix (PSI), the rate of refusal-like answers (relative change, either
way), p95 latency and cost per request (relative change, up). And per model, the mean feedback
score (its drop).

The reference is stored in `drift_baselines` as JSON summaries, one row per kind ("input",
"output", "feedback"): the histogram's bin edges (the reference's quantiles) and shares, the
mixes, the rates and the centroid. Only successful chat and completion requests count. A window
with fewer than `min_requests` requests is "not enough traffic", never an alarm. One finding per
feature, its subject the feature's name, its details `psi` or `change` with the reference and
current values and the counts.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from appliance.audit.content import read_content
from appliance.checks.findings import Finding, ok, worst
from appliance.checks.psi import (
    centroid,
    centroid_finding,
    change_finding,
    feedback_findings,
    histogram,
    mix,
    mix_finding,
    numeric_finding,
    percentile,
    proportion_z,
)
from appliance.config import DriftSettings
from appliance.errors import ConfigError, Conflict

__all__ = [
    "DriftOptions",
    "DriftReport",
    "Embed",
    "Window",
    "baseline_fn",
    "build_baseline",
    "drift_report",
    "load_baseline",
    "read_window",
]

Embed = Callable[[list[str]], list[list[float]]]  # texts -> vectors, from a worker thread
KINDS = ("input", "output", "feedback")
REQUEST_FEATURES = (
    "prompt_tokens",
    "script",
    "embedding_centroid",
    "completion_tokens",
    "finish_reason",
    "refusal_rate",
    "latency_p95_ms",
    "cost_per_request",
)
_EMBED_BATCH = 16
_REQUESTS = """
SELECT json_extract(body, '$.tokens.prompt'), json_extract(body, '$.tokens.completion'),
       json_extract(body, '$.finish_reason'), json_extract(body, '$.features.script'),
       json_extract(body, '$.features.refusal'), json_extract(body, '$.latency_ms'), json_extract(body, '$.cost')
FROM audit
WHERE kind = 'request' AND ts >= ? AND ts < ?
  AND json_extract(body, '$.kind') IN ('chat', 'completion') AND json_extract(body, '$.outcome') = 'ok'
ORDER BY idx DESC LIMIT ?
"""
_KEPT = """
SELECT a.idx FROM audit a JOIN audit_content c ON c.idx = a.idx
WHERE a.kind = 'request' AND a.ts >= ? AND a.ts < ? AND c.content IS NOT NULL
  AND json_extract(a.body, '$.kind') IN ('chat', 'completion') AND json_extract(a.body, '$.outcome') = 'ok'
ORDER BY a.idx DESC LIMIT ?
"""


@dataclass(frozen=True, slots=True)
class DriftOptions:
    """`[drift]` and the `[check.drift]` options."""

    window_hours: float = 24.0
    psi_warn: float = 0.1
    psi_fail: float = 0.25
    bins: int = 10
    min_shift: float = 0.1  # a length's mean, median or p95 must move this share for its PSI to alarm
    min_requests: int = 50
    max_requests: int = 100_000  # the newest of a window, at most
    centroid_sample: int = 200  # prompts embedded per window, at most
    min_centroid_prompts: int = 20
    centroid_warn: float = 0.03  # cosine distance between the centroids
    centroid_fail: float = 0.1
    refusal_warn: float = 0.5  # relative change of the refusal rate (floored at 5%), either way
    refusal_fail: float = 1.0
    latency_warn: float = 0.5  # relative rise of p95 latency
    latency_fail: float = 1.0
    cost_warn: float = 0.5  # relative rise of the mean cost per request
    cost_fail: float = 1.0
    feedback_warn: float = 0.1  # drop of a model's mean feedback score (0..1)
    feedback_fail: float = 0.2
    min_feedback: int = 20
    auto_baseline: bool = True  # the first scheduled run with enough traffic sets the baseline

    @classmethod
    def from_settings(cls, drift: DriftSettings, options: Mapping[str, Any] | None = None) -> DriftOptions:
        values: dict[str, Any] = {
            "window_hours": drift.window_hours,
            "psi_warn": drift.psi_warn,
            "psi_fail": drift.psi_fail,
        }
        for f in dataclasses.fields(cls):
            if options and f.name in options:
                value, kind = options[f.name], type(f.default)
                if kind is bool and not isinstance(value, bool):
                    raise ConfigError(f"check.drift.{f.name}: expected true or false, got {value!r}")
                try:
                    values[f.name] = value if kind is bool else kind(value)
                except (TypeError, ValueError):
                    raise ConfigError(f"check.drift.{f.name}: expected a number, got {value!r}") from None
                if kind is not bool and not values[f.name] > 0:
                    raise ConfigError(f"check.drift.{f.name}: must be positive, got {value!r}")
        return cls(**values)

    @property
    def window_seconds(self) -> float:
        return self.window_hours * 3600.0


@dataclass(slots=True)
class Window:
    """The requests of one window, as the audit log holds them."""

    start: float
    end: float
    prompt_tokens: list[float] = field(default_factory=list)
    completion_tokens: list[float] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    scripts: list[str] = field(default_factory=list)
    refusals: list[bool] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    costs: list[float] = field(default_factory=list)
    count: int = 0
    kept: list[int] = field(default_factory=list)  # records whose prompt text is kept

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "count": self.count, "kept_prompts": len(self.kept)}


def read_window(conn: sqlite3.Connection, start: float, end: float, options: DriftOptions) -> Window:
    """The window's requests (the newest `max_requests`), in one pass with json_extract."""
    w = Window(start, end)
    for prompt, completion, finish, script, refusal, latency, cost in conn.execute(
        _REQUESTS, (start, end, options.max_requests)
    ):
        w.count += 1
        if prompt is not None:
            w.prompt_tokens.append(float(prompt))
        if completion is not None:
            w.completion_tokens.append(float(completion))
        if finish is not None:
            w.finish_reasons.append(str(finish))
        if script is not None:
            w.scripts.append(str(script))
        if refusal is not None:
            w.refusals.append(bool(refusal))
        if latency is not None:
            w.latency_ms.append(float(latency))
        if cost is not None:
            w.costs.append(float(cost))
    w.kept = [row[0] for row in conn.execute(_KEPT, (start, end, options.max_requests))]
    return w


def prompt_centroid(
    conn: sqlite3.Connection, window: Window, options: DriftOptions, embed: Embed | None, model: str
) -> dict[str, Any]:
    """The centroid of a sample of the window's kept prompts: `{"vector", "count", "model"}`,
    or `{"vector": None, "reason"}` when there are too few or nothing to embed them with."""
    if len(window.kept) < options.min_centroid_prompts:
        return {"vector": None, "count": len(window.kept), "reason": "not available (prompts not kept)"}
    if embed is None:
        return {"vector": None, "count": len(window.kept), "reason": "not available (no embedding model)"}
    step = max(1.0, len(window.kept) / options.centroid_sample)
    chosen = sorted({window.kept[int(i * step)] for i in range(min(options.centroid_sample, len(window.kept)))})
    texts = [
        c["content"]["prompt"]
        for c in read_content(conn, chosen).values()
        if c["content"] and c["content"].get("prompt")
    ]
    if len(texts) < options.min_centroid_prompts:
        return {"vector": None, "count": len(texts), "reason": "not available (prompts not kept)"}
    try:
        vectors = [v for i in range(0, len(texts), _EMBED_BATCH) for v in embed(texts[i : i + _EMBED_BATCH])]
    except Exception as exc:  # noqa: BLE001 - an engine's failure is a reading, not the check's
        return {"vector": None, "count": len(texts), "reason": f"not available (embedding failed: {exc})"}
    return {"vector": [round(x, 6) for x in centroid(vectors)], "count": len(vectors), "model": model}


def summarize(
    conn: sqlite3.Connection, window: Window, options: DriftOptions, embed: Embed | None, model: str
) -> dict[str, dict[str, Any]]:
    """A window's reference summaries, by kind."""
    return {
        "input": {
            "count": window.count,
            "prompt_tokens": histogram(window.prompt_tokens, options.bins),
            "script": mix(window.scripts),
            "embedding_centroid": prompt_centroid(conn, window, options, embed, model),
        },
        "output": {
            "count": window.count,
            "completion_tokens": histogram(window.completion_tokens, options.bins),
            "finish_reason": mix(window.finish_reasons),
            "refusal_rate": _rate(window.refusals),
            "refusal_count": len(window.refusals),
            "latency_p95_ms": percentile(window.latency_ms, 95),
            "cost_per_request": sum(window.costs) / len(window.costs) if window.costs else 0.0,
        },
        "feedback": {"models": feedback_scores(conn, window.start, window.end)},
    }


def feedback_scores(conn: sqlite3.Connection, start: float, end: float) -> dict[str, dict[str, float]]:
    rows = conn.execute(
        "SELECT model, AVG(score), COUNT(*) FROM feedback WHERE created_at >= ? AND created_at < ? AND model IS NOT NULL"
        " GROUP BY model ORDER BY model",
        (start, end),
    )
    return {model: {"mean": float(mean), "count": int(n)} for model, mean, n in rows}


def build_baseline(
    conn: sqlite3.Connection,
    options: DriftOptions,
    *,
    start: float,
    end: float,
    embed: Embed | None = None,
    model: str = "",
) -> dict[str, dict[str, Any]]:
    """The reference summaries of [start, end). `Conflict` when the window has fewer than
    `min_requests` requests (a baseline of a handful would alarm at every run)."""
    window = read_window(conn, start, end, options)
    if window.count < options.min_requests:
        raise Conflict(
            f"only {window.count} requests between the window's start and end; a baseline needs at least "
            f"{options.min_requests} ([check.drift] min_requests)"
        )
    return summarize(conn, window, options, embed, model)


def baseline_fn(
    audit: Any,
    summaries: dict[str, dict[str, Any]],
    *,
    start: float,
    end: float,
    actor: Any = None,
    trigger: str = "manual",
) -> Callable[[sqlite3.Connection], dict[str, Any]]:
    """A write function storing the summaries as the baseline, with its audit record: an admin
    record of `actor` (an `Actor`), else a system record."""
    now = time.time()
    about = {
        "window_start": start,
        "window_end": end,
        "requests": summaries["input"]["count"],
        "trigger": trigger,
        "kept_prompts": summaries["input"]["embedding_centroid"].get("count", 0),
    }
    if actor is not None:
        record = audit.admin_fn(actor, "drift.baseline", None, after=about)
    else:
        record = audit.append_fn("system", {"event": "drift.baseline", **about}, key_id=None, team_id=None)

    def write(conn: sqlite3.Connection) -> dict[str, Any]:
        for kind, summary in summaries.items():
            conn.execute(
                "INSERT OR REPLACE INTO drift_baselines (kind, window_start, window_end, summary, created_at) VALUES (?, ?, ?, ?, ?)",
                (kind, start, end, json.dumps(summary), now),
            )
        return {"created_at": now, "audit_idx": record(conn), **about}

    return write


def load_baseline(conn: sqlite3.Connection) -> dict[str, Any] | None:
    """The stored reference: `{"window_start", "window_end", "created_at", kind: summary...}`."""
    rows = conn.execute("SELECT kind, window_start, window_end, summary, created_at FROM drift_baselines").fetchall()
    found = {r[0]: r for r in rows}
    if not all(k in found for k in KINDS):
        return None
    first = found["input"]
    return {"window_start": first[1], "window_end": first[2], "created_at": first[4]} | {
        k: json.loads(found[k][3]) for k in KINDS
    }


def drift_report(
    conn: sqlite3.Connection,
    options: DriftOptions,
    *,
    since: float | None = None,
    until: float | None = None,
    embed: Embed | None = None,
    model: str = "",
    now: float | None = None,
) -> DriftReport:
    """The current window ([since or now - window_hours, until or now)) against the baseline
    (an empty window, since after until, is too little traffic like any other)."""
    end = until if until is not None else (now if now is not None else time.time())
    start = since if since is not None else end - options.window_seconds
    baseline = load_baseline(conn)
    window = read_window(conn, start, end, options)
    if baseline is None:
        finding = ok(
            "no drift baseline yet: `appliance drift baseline` sets one", "baseline", current_count=window.count
        )
        return DriftReport(None, window.to_dict(), [finding])
    if baseline["input"]["embedding_centroid"].get("vector"):
        centroid_now = prompt_centroid(conn, window, options, embed, model)
    else:
        centroid_now = {"vector": None, "reason": "not available (the baseline has no centroid)"}
    meta = {k: baseline[k] for k in ("window_start", "window_end", "created_at")} | {
        "count": baseline["input"]["count"]
    }
    return DriftReport(
        meta, window.to_dict(), compare(baseline, window, centroid_now, feedback_scores(conn, start, end), options)
    )


@dataclass(slots=True)
class DriftReport:
    baseline: dict[str, Any] | None  # its window, when it was set, its requests
    window: dict[str, Any]
    findings: list[Finding]

    def to_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "window": self.window,
            "status": worst([f.status for f in self.findings]),
            "findings": [f.to_dict() for f in self.findings],
        }


def compare(
    baseline: dict[str, Any],
    window: Window,
    centroid_now: dict[str, Any],
    feedback_now: dict[str, dict[str, float]],
    options: DriftOptions,
) -> list[Finding]:
    """One finding per feature: the window against the baseline's summaries."""
    ref_in, ref_out = baseline["input"], baseline["output"]
    counts = {"reference_count": ref_in["count"], "current_count": window.count}
    out: list[Finding] = []
    if min(ref_in["count"], window.count) < options.min_requests:
        out += [
            ok(f"not enough traffic (at least {options.min_requests} requests a window)", name, **counts)
            for name in REQUEST_FEATURES
        ]
    else:
        o, refusal_rate = options, _rate(window.refusals)
        psi_limits = (o.psi_warn, o.psi_fail)
        cost = sum(window.costs) / len(window.costs) if window.costs else 0.0
        z = proportion_z(ref_out["refusal_rate"], ref_out["refusal_count"], refusal_rate, len(window.refusals))
        out += [
            numeric_finding(
                "prompt_tokens", ref_in["prompt_tokens"], window.prompt_tokens, o.bins, psi_limits, counts,
                min_shift=o.min_shift,
            ),
            mix_finding("script", ref_in["script"], mix(window.scripts), psi_limits, counts),
            centroid_finding(ref_in["embedding_centroid"], centroid_now, (o.centroid_warn, o.centroid_fail)),
            numeric_finding(
                "completion_tokens", ref_out["completion_tokens"], window.completion_tokens, o.bins, psi_limits, counts,
                min_shift=o.min_shift,
            ),
            mix_finding("finish_reason", ref_out["finish_reason"], mix(window.finish_reasons), psi_limits, counts),
            # A refusal rate within what chance gives (|z| under 3.09) is no alarm, however it moved.
            change_finding(
                "refusal_rate",
                ref_out["refusal_rate"],
                refusal_rate,
                0.05,
                (o.refusal_warn, o.refusal_fail),
                counts,
                either_way=True,
                z=z,
            ),
            change_finding(
                "latency_p95_ms",
                ref_out["latency_p95_ms"],
                percentile(window.latency_ms, 95),
                1.0,
                (o.latency_warn, o.latency_fail),
                counts,
            ),
            change_finding(
                "cost_per_request", ref_out["cost_per_request"], cost, 1e-9, (o.cost_warn, o.cost_fail), counts
            ),
        ]
    return out + feedback_findings(
        baseline["feedback"]["models"],
        feedback_now,
        options.min_feedback,
        (options.feedback_warn, options.feedback_fail),
    )


def _rate(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0
