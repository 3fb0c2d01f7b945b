"""Admin endpoints for drift: golden sets (list, run on demand, history), the input and output
drift baseline, and the drift report. Operators only. Reports and baselines read the audit log
in a worker thread on a read connection of their own."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Body, FromPath, FromQuery, Parameter
from msgspec import UNSET, Meta, UnsetType

from appliance.api.checks_routes import FindingOut
from appliance.api.context import admin_actor, epoch, request_context
from appliance.api.responses import ErrorResponse, Out, errors
from appliance.api.security import roles
from appliance.api.services import Services, ServicesDep
from appliance.auth import Principal, Role
from appliance.checks.drift import DriftOptions, baseline_fn, build_baseline, drift_report
from appliance.checks.drift_jobs import golden_runner, loop_embedder, threadsafe_call
from appliance.checks.golden import SET_NAME_PATTERN

OPERATE = roles(Role.OPERATOR)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
SetName = Annotated[str, Parameter(pattern=SET_NAME_PATTERN, max_length=64, description="a golden set's name")]
Time = Annotated[
    str | None, Parameter(schema_extra={"format": "date-time"}, description="RFC 3339; UTC without an offset")
]
Limit = Annotated[int, Parameter(ge=1, le=1000, description="most runs to return, newest first")]
# msgspec decodes these strictly (`forbid_unknown_fields`); the document says so too.
STRICT = Body(schema_extra={"additionalProperties": False})
INVALID_SET = {
    422: ResponseSpec(
        data_container=ErrorResponse,
        generate_examples=False,
        description="The golden set's file is malformed; the message names the file and the case.",
    )
}


class AssertionOut(Out):
    assertion: str
    passed: bool
    detail: str


class GoldenCaseOut(Out):
    id: str
    target: str
    passed: bool
    checks: list[AssertionOut]
    model: str | UnsetType = UNSET
    trail: str | UnsetType = UNSET
    answer: str | UnsetType = UNSET
    latency_ms: float | UnsetType = UNSET
    completion_tokens: int | UnsetType = UNSET
    finish_reason: str | UnsetType = UNSET
    similarity: float | None | UnsetType = UNSET
    baseline_set: bool | UnsetType = UNSET
    error: str | UnsetType = UNSET


class FailedCase(Out):
    id: str
    why: str


class GoldenRunOut(Out):
    id: int
    set: str
    target: str
    trigger: str
    started_at: float
    duration_ms: float
    total: int
    passed: int
    pass_rate: float
    mean_similarity: float | None
    baseline: bool
    reference_pass_rate: float
    status: str
    summary: str
    gate: str  # pass | fail
    failed_cases: list[FailedCase]
    cases: list[GoldenCaseOut] | UnsetType = UNSET


class GoldenRunList(Out):
    object: str
    data: list[GoldenRunOut]


class GoldenSetOut(Out):
    name: str
    target: str | None
    cases: int
    description: str
    error: str | None
    last_run: GoldenRunOut | None


class GoldenSetList(Out):
    object: str
    directory: str
    data: list[GoldenSetOut]


class GoldenRunRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`model`: score this model or route instead of the configured targets (against their
    baselines); `rebaseline`: this run's answers become the baseline."""

    model: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    rebaseline: bool = False


class BaselineRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The reference window: [since, until), by default the last `[drift] window_hours`
    (RFC 3339 times, UTC without an offset)."""

    since: datetime | None = None
    until: datetime | None = None


class BaselineOut(Out):
    created_at: float
    audit_idx: int
    window_start: float
    window_end: float
    requests: int
    kept_prompts: int
    trigger: str


class DriftBaselineInfo(Out):
    window_start: float
    window_end: float
    created_at: float
    count: int


class DriftWindowOut(Out):
    start: float
    end: float
    count: int
    kept_prompts: int


class DriftReportOut(Out):
    baseline: DriftBaselineInfo | None
    window: DriftWindowOut
    status: str
    findings: list[FindingOut]


@get("/admin/drift/golden", opt=OPERATE, name="drift:golden:list", responses=errors())
async def list_golden_sets(services: ServicesDep) -> GoldenSetList:
    """Every golden set in `<data>/golden/` with its last run; a malformed one with its error."""
    runner = golden_runner(services, services.settings.check.get("golden"))

    def collect() -> list[dict[str, Any]]:
        loaded = runner.sets()
        out: list[dict[str, Any]] = []
        for name in sorted({*loaded.sets, *loaded.errors}):
            gset = loaded.sets.get(name)
            last = runner.history(name, limit=1)
            out.append(
                {
                    "name": name,
                    "target": gset.target if gset else None,
                    "cases": len(gset.cases) if gset else 0,
                    "description": gset.description if gset else "",
                    "error": loaded.errors.get(name),
                    "last_run": last[0] if last else None,
                }
            )
        return out

    data = await asyncio.to_thread(collect)
    return GoldenSetList(object="list", directory=str(runner.directory), data=msgspec.convert(data, list[GoldenSetOut]))


@post(
    "/admin/drift/golden/{name:str}/run",
    opt=OPERATE,
    name="drift:golden:run",
    status_code=200,
    responses=errors(404) | INVALID_SET,
)
async def run_golden_set(
    request: Request[Principal, Any, Any],
    name: FromPath[SetName],
    data: Annotated[GoldenRunRequest, STRICT],
    services: ServicesDep,
) -> GoldenRunOut:
    """Run the set now, at temperature 0, and score it (stored in its history); `gate` says
    whether it passes. 404 for an unknown set or model, 422 for a malformed set file."""
    runner = golden_runner(services, services.settings.check.get("golden"))
    gset = await asyncio.to_thread(runner.find, name)
    run = await runner.run(
        gset, model=data.model, rebaseline=data.rebaseline, trigger="manual", actor=request.user.actor_info()
    )
    return msgspec.convert(run, GoldenRunOut)


@get("/admin/drift/golden/{name:str}/history", opt=OPERATE, name="drift:golden:history", responses=errors())
async def golden_history(
    name: FromPath[SetName],
    services: ServicesDep,
    limit: FromQuery[Limit] = 50,
    target: Annotated[str | None, Parameter(max_length=256, description="only runs of this model or route")] = None,
) -> GoldenRunList:
    """The set's stored runs, newest first (also of a set whose file is gone)."""
    runner = golden_runner(services)
    runs = await asyncio.to_thread(runner.history, name, limit=limit, target=target)
    return GoldenRunList(object="list", data=msgspec.convert(runs, list[GoldenRunOut]))


@post("/admin/drift/baseline", opt=OPERATE, name="drift:baseline", status_code=200, responses=errors(409))
async def set_drift_baseline(
    request: Request[Principal, Any, Any], data: Annotated[BaselineRequest, STRICT], services: ServicesDep
) -> BaselineOut:
    """Compute the reference distributions of [since, until) (default: the last `[drift]
    window_hours`) from the audit log and store them as the baseline (audited). 409 when the
    window has too few requests (an empty one included)."""
    options = _options(services)
    end = _seconds(data.until) if data.until is not None else time.time()
    start = _seconds(data.since) if data.since is not None else end - options.window_seconds
    embed, model = loop_embedder(services, threadsafe_call(asyncio.get_running_loop()))

    def compute() -> dict[str, dict[str, Any]]:
        with services.store.snapshot() as conn:
            return build_baseline(conn, options, start=start, end=end, embed=embed, model=model)

    summaries = await asyncio.to_thread(compute)
    stored = await services.store.write(
        baseline_fn(services.audit, summaries, start=start, end=end, actor=admin_actor(request))
    )
    request_context(request.scope).recorded = True
    return msgspec.convert(stored, BaselineOut)


@get("/admin/drift/report", opt=OPERATE, name="drift:report", responses=errors())
async def get_drift_report(
    services: ServicesDep, since: FromQuery[Time] = None, until: FromQuery[Time] = None
) -> DriftReportOut:
    """The current window [since, until) (default: the last `[drift] window_hours`) against the
    baseline: one finding per feature, as the scheduled "drift" check gives them."""
    options = _options(services)
    start = epoch(since, "since") if since is not None else None
    end = epoch(until, "until") if until is not None else None
    embed, model = loop_embedder(services, threadsafe_call(asyncio.get_running_loop()))

    def compute() -> dict[str, Any]:
        with services.store.snapshot() as conn:
            return drift_report(conn, options, since=start, until=end, embed=embed, model=model).to_dict()

    return msgspec.convert(await asyncio.to_thread(compute), DriftReportOut)


def _seconds(when: datetime) -> float:
    aware = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    return (aware - _EPOCH).total_seconds()  # timestamp() would fail on year 1 with an offset


def _options(services: Services) -> DriftOptions:
    return DriftOptions.from_settings(services.settings.drift, services.settings.check.get("drift"))


ROUTES = [list_golden_sets, run_golden_set, golden_history, set_drift_baseline, get_drift_report]
