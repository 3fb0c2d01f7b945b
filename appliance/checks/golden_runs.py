"""Running golden sets: each case at temperature 0 through the appliance's own routing (a case's
model may be a route), checked against its assertions and compared with its baseline answer;
each run kept in `golden_runs` with its per-case results, the baselines in `golden_baselines`.

A case's baseline is the answer of the model or route it is configured for (its `model`, else
the set's `target`), set by that target's first run, or its `reference` when it has one. A
run for another model (`model=`, a candidate release or an arm) is scored against that same
baseline, so it is measured against what the configured target answered; it sets a baseline
only when asked to (`rebaseline`), and then its answers become the baseline.

A run's status: "fail" when its pass rate is at least `[drift] pass_rate_drop` below the
reference pass rate (that of the last run that set the set's baseline; 1.0 for such a run
itself), or when the mean similarity to the baselines is below `[drift] similarity_threshold`;
"warn" when some case failed; else "ok". Its gate fails on "fail".

Golden generations are billed to no one and write no request audit record; setting or
resetting a baseline is a system audit record, written in the same transaction as the run.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.auth import Principal, Role
from appliance.checks.findings import Finding
from appliance.checks.golden import GoldenCase, GoldenSet, LoadedSets, find_set, load_sets
from appliance.checks.golden_assertions import check_answer
from appliance.checks.psi import cosine_distance
from appliance.errors import ApplianceError, ContextLengthExceeded, ServiceUnavailable
from appliance.inference import GenerationInput, generation_failure
from appliance.routing.router import Need
from runtime.engine import Finished, SamplingParams, TokenEvent
from runtime.errors import EngineUnavailable, RuntimeFault

if TYPE_CHECKING:
    from appliance.api.services import Services

__all__ = ["GOLDEN_PRINCIPAL", "GoldenRunner", "embed_texts", "embedding_model", "run_finding", "run_status"]

# Who golden generations run as, for the router: every model and route, billed to no one.
GOLDEN_PRINCIPAL = Principal(key_id="system:golden", name="golden-sets", role=Role.OPERATOR)
GREEDY = SamplingParams(temperature=0.0, top_p=1.0, top_k=1, min_p=0.0, seed=0)
DEFAULT_MAX_TOKENS = 128  # when neither the case nor the set says
KEPT_ANSWER_CHARS = 4000  # of each answer, in the run's results
EMBED_CHARS = 2000


@dataclass(frozen=True, slots=True)
class _Baseline:
    answer: str
    embedding: list[float] | None


@dataclass(slots=True)
class _Generated:
    text: str
    finished: Finished
    model: str
    trail: str
    latency_ms: float


class GoldenRunner:
    """Scores golden sets on the running services; `run` runs on the server's event loop."""

    def __init__(self, services: Services, *, case_timeout: float = 300.0) -> None:
        self.services = services
        self.case_timeout = case_timeout
        self.drift = services.settings.drift

    @property
    def directory(self) -> Path:
        return self.services.settings.paths.golden

    def sets(self) -> LoadedSets:
        return load_sets(self.directory, similarity_default=self.drift.similarity_threshold)

    def find(self, name: str) -> GoldenSet:
        return find_set(self.directory, name, similarity_default=self.drift.similarity_threshold)

    async def run(
        self,
        gset: GoldenSet,
        *,
        model: str | None = None,
        rebaseline: bool = False,
        trigger: str = "manual",
        actor: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Run every case, score the run and store it; the scored run (as `history` gives it,
        with its cases). `model` scores another model or route instead of the configured ones;
        an unknown one raises `ModelNotFound` before anything runs."""
        if model is not None:
            self.services.router.plan(GOLDEN_PRINCIPAL, model, Need(kind="chat"))
        started, clock = time.time(), time.perf_counter()
        baselines = self._baselines(gset.name)
        cases: list[dict[str, Any]] = []
        writes: list[tuple[str, str, str, list[float] | None]] = []
        for case in gset.cases:
            result, new_baseline = await self._case(gset, case, model, baselines, rebaseline)
            cases.append(result)
            if new_baseline is not None:
                writes.append(new_baseline)
        unreferenced = [c for c in gset.cases if c.reference is None]
        is_baseline = bool(unreferenced) and len(writes) == len(unreferenced)
        passed = sum(1 for c in cases if c["passed"])
        measured = [c["similarity"] for c in cases if c.get("similarity") is not None and not c.get("baseline_set")]
        row = {
            "set_name": gset.name,
            "target": model or gset.target,
            "trigger": trigger,
            "started_at": started,
            "duration_ms": round((time.perf_counter() - clock) * 1000, 3),
            "total": len(cases),
            "passed": passed,
            "pass_rate": passed / len(cases),
            "mean_similarity": sum(measured) / len(measured) if measured else None,
            "baseline": int(is_baseline),
            "results": json.dumps(cases),
        }
        event = None
        if writes:
            event = {
                "event": "golden.baseline",
                "set": gset.name,
                "target": row["target"],
                "trigger": trigger,
                "rebaseline": rebaseline,
                "cases": [w[0] for w in writes],
                "actor": actor,
            }
        row["id"] = await self.services.store.write(self._store_fn(row, writes, rebaseline, event))
        reference = 1.0 if is_baseline else self._reference_pass_rate(gset.name)
        return run_dict(row, reference, self.drift.pass_rate_drop, self.drift.similarity_threshold, with_cases=True)

    def history(self, name: str, *, limit: int = 50, target: str | None = None) -> list[dict[str, Any]]:
        """The set's runs, newest first, each scored as it was against its reference run."""
        sql = "SELECT * FROM golden_runs WHERE set_name = ?" + (" AND target = ?" if target else "")
        rows = self.services.store.query(
            sql + " ORDER BY started_at DESC, id DESC LIMIT ?", (name, target, limit) if target else (name, limit)
        )
        refs = self.services.store.query(
            "SELECT id, started_at, pass_rate FROM golden_runs WHERE set_name = ? AND baseline = 1 ORDER BY started_at, id",
            (name,),
        )
        out = []
        for row in rows:
            reference = 1.0
            if not row["baseline"]:
                for ref in refs:
                    if (ref["started_at"], ref["id"]) < (row["started_at"], row["id"]):
                        reference = ref["pass_rate"]
            out.append(run_dict(dict(row), reference, self.drift.pass_rate_drop, self.drift.similarity_threshold))
        return out

    # -- one case ------------------------------------------------------------------------------
    async def _case(
        self,
        gset: GoldenSet,
        case: GoldenCase,
        override: str | None,
        baselines: dict[tuple[str, str], _Baseline],
        rebaseline: bool,
    ) -> tuple[dict[str, Any], tuple[str, str, str, list[float] | None] | None]:
        configured = gset.target_of(case)
        target = override or configured
        out: dict[str, Any] = {"id": case.id, "target": target, "passed": False, "checks": []}
        try:
            async with asyncio.timeout(self.case_timeout):
                made = await self._generate(gset, case, target)
        except TimeoutError:
            out["error"] = f"no answer within {self.case_timeout:g}s"
            return out, None
        except (ApplianceError, RuntimeFault) as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
            return out, None
        out.update(
            model=made.model,
            trail=made.trail,
            answer=made.text[:KEPT_ANSWER_CHARS],
            latency_ms=round(made.latency_ms, 1),
            completion_tokens=made.finished.completion_tokens,
            finish_reason=made.finished.reason,
        )
        base = baselines.get((case.id, configured))
        sets_baseline = case.reference is None and (rebaseline or (base is None and override is None))
        similarity, note, vector = await self._similarity(case, made.text, base, sets_baseline, configured)
        out["similarity"] = None if similarity is None else round(similarity, 4)
        if sets_baseline:
            out["baseline_set"] = True
        checks = check_answer(case.assertions, made.text, made.latency_ms, similarity, similarity_note=note)
        out["checks"] = checks
        out["passed"] = all(c["passed"] for c in checks)
        return out, ((case.id, configured, made.text, vector) if sets_baseline else None)

    async def _similarity(
        self, case: GoldenCase, answer: str, base: _Baseline | None, sets_baseline: bool, configured: str
    ) -> tuple[float | None, str, list[float] | None]:
        """(cosine to the baseline or None, a note on it, the answer's embedding to store)."""
        if not sets_baseline and case.reference is None and base is None:
            return None, f"no baseline yet for {configured}: run the set on it first, or rebaseline", None
        try:
            if sets_baseline:
                return 1.0, "this answer is the new baseline", (await embed_texts(self.services, [answer]))[0]
            if case.reference is not None:
                other_text, kept = case.reference, None
            else:
                assert base is not None
                other_text, kept = base.answer, base.embedding
            vectors = await embed_texts(self.services, [answer] if kept else [answer, other_text])
            if kept is not None and len(kept) != len(vectors[0]):  # the embedding model changed since
                vectors = await embed_texts(self.services, [answer, other_text])
                kept = None
            other = kept if kept is not None else vectors[1]
        except (ApplianceError, RuntimeFault) as exc:
            return None, f"embeddings unavailable: {exc}", None
        return max(0.0, 1.0 - cosine_distance(vectors[0], other)), "", None

    async def _generate(self, gset: GoldenSet, case: GoldenCase, target: str) -> _Generated:
        """The answer of the first candidate of `target`'s plan that gives one."""
        services = self.services
        max_tokens = case.max_tokens or gset.max_tokens or DEFAULT_MAX_TOKENS
        need = Need(kind=case.kind, text=case.text, max_tokens=max_tokens, prompt_tokens_estimate=len(case.text) // 4)
        plan = services.router.plan(GOLDEN_PRINCIPAL, target, need)
        spec = GenerationInput(
            model=target,
            max_tokens=max_tokens,
            sampling=GREEDY,
            messages=case.chat_messages(),
            prompt=case.prompt if case.kind == "completion" else None,
        )
        clock, trail = time.perf_counter(), plan.trail
        last: BaseException | None = None
        for name in plan.names:
            trail += f">{name}"
            try:
                engine = await services.catalog.engine(name)
                prepared = await services.inference.prepare_on(engine, name, spec)
                text, finished = await _collect(engine.generate(prepared.request))
                if finished.reason in ("error", "cancelled"):
                    raise generation_failure(finished)
            except (RuntimeFault, ContextLengthExceeded, ServiceUnavailable) as exc:  # the next candidate may serve
                last = exc
                trail += f"; fallback:{type(exc).__name__}"
                continue
            return _Generated(text, finished, name, trail, (time.perf_counter() - clock) * 1000)
        raise last or ServiceUnavailable(f"no candidate of {target} can serve now")

    # -- storage -------------------------------------------------------------------------------
    def _baselines(self, name: str) -> dict[tuple[str, str], _Baseline]:
        rows = self.services.store.query(
            "SELECT case_id, target, answer, embedding FROM golden_baselines WHERE set_name = ?", (name,)
        )
        return {
            (r["case_id"], r["target"]): _Baseline(r["answer"], json.loads(r["embedding"]) if r["embedding"] else None)
            for r in rows
        }

    def _reference_pass_rate(self, name: str) -> float:
        row = self.services.store.query_one(
            "SELECT pass_rate FROM golden_runs WHERE set_name = ? AND baseline = 1 ORDER BY started_at DESC, id DESC LIMIT 1",
            (name,),
        )
        return float(row["pass_rate"]) if row else 1.0

    def _store_fn(
        self,
        row: dict[str, Any],
        writes: list[tuple[str, str, str, list[float] | None]],
        replace: bool,
        event: dict[str, Any] | None,
    ) -> Any:
        audit, now = self.services.audit, time.time()
        append = audit.append_fn("system", event, key_id=None, team_id=None) if event is not None else None
        columns = [k for k in row if k != "id"]

        def write(conn: Any) -> int:
            verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
            for case_id, target, answer, vector in writes:
                conn.execute(
                    f"{verb} INTO golden_baselines (set_name, case_id, target, answer, embedding, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (row["set_name"], case_id, target, answer, json.dumps(vector) if vector else None, now),
                )
            if append is not None:
                append(conn)
            cur = conn.execute(
                f"INSERT INTO golden_runs ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                [row[k] for k in columns],
            )
            return int(cur.lastrowid)

        return write


def run_status(
    pass_rate: float,
    reference: float,
    mean_similarity: float | None,
    failed: int,
    *,
    drop_limit: float,
    similarity_threshold: float,
) -> tuple[str, str]:
    """A run's status and a one-line summary of why."""
    drop = reference - pass_rate
    parts = [f"pass rate {pass_rate:.0%} (reference {reference:.0%})"]
    if mean_similarity is not None:
        parts.append(f"mean similarity {mean_similarity:.3f}")
    text = ", ".join(parts)
    if drop >= drop_limit - 1e-9 and drop > 0:
        return "fail", f"{text}: dropped {drop:.0%}, at least the {drop_limit:.0%} allowed"
    if mean_similarity is not None and mean_similarity < similarity_threshold:
        return "fail", f"{text}: similarity below {similarity_threshold:.3f}"
    if failed:
        return "warn", f"{text}: {failed} case{'s' if failed != 1 else ''} failed"
    return "ok", text


def run_dict(
    row: dict[str, Any], reference: float, drop_limit: float, similarity_threshold: float, *, with_cases: bool = False
) -> dict[str, Any]:
    """A stored run as the API shows it."""
    cases = json.loads(row["results"]) if row.get("results") else []
    failed = row["total"] - row["passed"]
    status, summary = run_status(
        row["pass_rate"],
        reference,
        row["mean_similarity"],
        failed,
        drop_limit=drop_limit,
        similarity_threshold=similarity_threshold,
    )
    out = {
        "id": row["id"],
        "set": row["set_name"],
        "target": row["target"],
        "trigger": row["trigger"],
        "started_at": row["started_at"],
        "duration_ms": row["duration_ms"],
        "total": row["total"],
        "passed": row["passed"],
        "pass_rate": row["pass_rate"],
        "mean_similarity": row["mean_similarity"],
        "baseline": bool(row["baseline"]),
        "reference_pass_rate": reference,
        "status": status,
        "summary": summary,
        "gate": "fail" if status == "fail" else "pass",
        "failed_cases": [{"id": c["id"], "why": _why(c)} for c in cases if not c["passed"]],
    }
    if with_cases:
        out["cases"] = cases
    return out


def run_finding(run: dict[str, Any]) -> Finding:
    """A scored run as the scheduled check's finding about its set."""
    details = {
        k: run[k]
        for k in (
            "id",
            "target",
            "pass_rate",
            "reference_pass_rate",
            "mean_similarity",
            "total",
            "passed",
            "baseline",
            "failed_cases",
        )
    }
    return Finding(run["status"], f"golden set {run['set']}: {run['summary']}", run["set"], details)  # type: ignore[arg-type]


def embedding_model(services: Services) -> str:
    """`[drift] embedding_model`, else the first local model."""
    name = services.settings.drift.embedding_model
    if name:
        return name
    names = services.catalog.local_names()
    if not names:
        raise EngineUnavailable("no local model to embed with")
    return names[0]


async def embed_texts(services: Services, texts: list[str]) -> list[list[float]]:
    """Embeddings of `texts` by the drift embedding model (each cut to its first characters)."""
    engine = await services.catalog.engine(embedding_model(services))
    limit = min(EMBED_CHARS, max(64, engine.context_length * 2))
    result = await engine.embed([t[:limit] if t.strip() else "(empty)" for t in texts])
    return result.vectors


async def _collect(stream: Any) -> tuple[str, Finished]:
    parts: list[str] = []
    async with aclosing(stream):
        async for event in stream:
            if isinstance(event, TokenEvent):
                parts.append(event.text)
            else:
                return "".join(parts), event
    return "".join(parts), Finished(
        "error", 0, len(parts), error=EngineUnavailable("the model ended without finishing")
    )


def _why(case: dict[str, Any]) -> str:
    if case.get("error"):
        return str(case["error"])
    return "; ".join(f"{c['assertion']}: {c['detail']}" for c in case.get("checks", []) if not c["passed"])
