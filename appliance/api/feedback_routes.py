"""`POST /v1/feedback` for any key, on its own responses; `/admin/feedback` to list, show,
export and promote feedback (appliance/feedback.py)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, get, post
from litestar.params import FromPath, FromQuery, JSONBody, Parameter
from litestar.response import Stream

from appliance.api.context import change, epoch
from appliance.api.export_stream import export_stream
from appliance.api.responses import FeedbackInfo, FeedbackList, FeedbackOut, PromotionOut, errors
from appliance.api.schemas import FeedbackRequest, PromoteRequest
from appliance.api.security import ANY_ROLE, roles
from appliance.api.services import Services, ServicesDep
from appliance.auth import Principal, Role
from appliance.feedback import MAX_LIST, FeedbackService, export_lines

READ_FEEDBACK = roles(Role.AUDITOR, Role.OPERATOR)
CURATE = roles(Role.OPERATOR)  # golden sets are checks: the operator's
READ_TEXT = roles(Role.AUDITOR)  # prompts and answers, as the audit log's own export
Time = Annotated[
    str | None, Parameter(schema_extra={"format": "date-time"}, description="RFC 3339; UTC without an offset")
]
Rating = Literal["up", "down", "1", "2", "3", "4", "5"]


def _service(services: Services) -> FeedbackService:
    return FeedbackService(services.store, services.audit, services.settings)


@post("/v1/feedback", opt=ANY_ROLE, name="feedback:give", status_code=201, responses=errors(404))
async def give_feedback(
    request: Request[Principal, Any, Any], data: JSONBody[FeedbackRequest], services: ServicesDep
) -> FeedbackOut:
    """Rate one of your own responses by its id (an admin may rate any). Several ratings of one
    response are all kept; the newest is the response's rating. 404 for an id that is unknown
    or not yours."""
    feedback = await change(
        request,
        _service(services).give,
        request.user,
        data.id,
        data.rating,
        correction=data.correction,
        comment=data.comment,
    )
    return msgspec.convert(feedback.to_dict(), FeedbackOut)


@get("/admin/feedback", opt=READ_FEEDBACK, name="feedback:list", responses=errors())
async def list_feedback(
    services: ServicesDep,
    model: FromQuery[str | None] = None,
    rating: FromQuery[Rating | None] = None,
    since: FromQuery[Time] = None,
    limit: FromQuery[Annotated[int, Parameter(ge=1, le=MAX_LIST)]] = 100,
) -> FeedbackList:
    """Newest first, with what the audit log kept of each text (never the prompt's or the
    answer's text: the export has them)."""
    start = epoch(since, "since") if since is not None else None
    views = await asyncio.to_thread(_service(services).list, model=model, rating=rating, since=start, limit=limit)
    return FeedbackList(object="list", data=[msgspec.convert(v.to_dict(), FeedbackInfo) for v in views])


@get(
    "/admin/feedback/export",
    opt=READ_TEXT,
    name="feedback:export",
    media_type="application/x-ndjson",
    responses=errors(),
    response_description="JSON lines: per rated response its prompt, answer and correction (null where not kept, "
    'named in `missing`), then one `{"summary": ...}` line.',
)
async def export_feedback(
    services: ServicesDep,
    format: FromQuery[Literal["jsonl"]] = "jsonl",
    model: FromQuery[str | None] = None,
    since: FromQuery[Time] = None,
) -> Stream:
    """The fine-tuning dataset: one line per rated response (its newest feedback)."""
    start = epoch(since, "since") if since is not None else None
    lines = export_stream(services.store, lambda conn: export_lines(conn, model=model, since=start), batch=200)
    return Stream(
        lines, media_type="application/x-ndjson", headers={"content-disposition": "attachment; filename=feedback.jsonl"}
    )


@get("/admin/feedback/{feedback_id:str}", opt=READ_FEEDBACK, name="feedback:get", responses=errors(404))
async def get_feedback(feedback_id: FromPath[str], services: ServicesDep) -> FeedbackInfo:
    view = await asyncio.to_thread(_service(services).get, feedback_id)
    return msgspec.convert(view.to_dict(), FeedbackInfo)


@post(
    "/admin/feedback/{feedback_id:str}/promote",
    opt=CURATE,
    name="feedback:promote",
    status_code=201,
    responses=errors(404, 409),
)
async def promote_feedback(
    request: Request[Principal, Any, Any],
    feedback_id: FromPath[str],
    data: JSONBody[PromoteRequest],
    services: ServicesDep,
) -> PromotionOut:
    """Make the correction the reference answer of a golden-set case (`<data>/golden/<set>.yaml`).
    409 when the prompt or the correction was not kept, or the case exists."""
    done = await change(request, _service(services).promote, feedback_id, data.set, data.case_id)
    return msgspec.convert(done, PromotionOut)


ROUTES = [give_feedback, list_feedback, export_feedback, get_feedback, promote_feedback]
