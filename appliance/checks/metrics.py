"""Prometheus metrics of one running appliance: each request's count, latency and tokens, fed
by `Governance.request_listeners`, and everything else read at scrape time (`metrics_readings`).

Every `Metrics` has a `CollectorRegistry` of its own, so two apps in one process never share
a series. A labelled series exports nothing until its label set exists, so the series the
dashboard (packaging/grafana/appliance.json) draws are created up front for every model.

A scrape renders off the event loop (`render`); the readings it takes there are in-memory
snapshots (engines, breakers, the budget ledger) and small SQLite reads."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from appliance.checks.metrics_readings import Readings
from appliance.governance import CLIENT_CLOSED, RequestContext

if TYPE_CHECKING:
    from appliance.api.services import Services

__all__ = ["CONTENT_TYPE", "KINDS", "Metrics", "code_of", "route_of"]

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # text/plain; version=0.0.4; charset=utf-8 (what generate_latest writes)
KINDS = ("chat", "completion", "embeddings")
_KIND_OF_PATH = {
    "POST /v1/chat/completions": "chat",
    "POST /v1/completions": "completion",
    "POST /v1/embeddings": "embeddings",
}
NONE = "none"  # the label value when nothing served the request, or no route was chosen
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
REQUEST_LABELS = ("route", "model", "type")


def route_of(ctx: RequestContext) -> str:
    """The route the client asked for: the head of the decision trail (`auto>score=0.81>m`
    -> `auto`; a model asked for by name heads its own trail), else the model, else "none"."""
    if ctx.route_trail:
        return ctx.route_trail.split(">", 1)[0].split(";", 1)[0].strip() or NONE
    return ctx.model or NONE


def code_of(ctx: RequestContext, status: int) -> str:
    """`ok`, `cancelled`, the error's OpenAI code, or `http_<status>` for an error without one.
    Failed the way the audit record's outcome says: an error status, an error code (a stream
    that ended with an error event answers 200) or a generation that finished with an error."""
    finished = ctx.finished
    if status == CLIENT_CLOSED or (finished is not None and finished.reason == "cancelled"):
        return "cancelled"
    if ctx.error_code:
        return ctx.error_code
    if status >= 400:
        return f"http_{status}"
    if finished is not None and finished.reason == "error":
        return "generation_failed"
    return "ok"


@dataclass(slots=True)
class _Series:
    """The labelled children one (route, model, type) feeds, looked up once."""

    latency: Any
    ttft: Any
    prompt_tokens: Any
    completion_tokens: Any


class Metrics:
    """`observe` is the request listener (connected to `services.governance` here); `render`
    is one scrape."""

    def __init__(self, services: Services, *, clock: Callable[[], float] = time.perf_counter) -> None:
        self.services = services
        self._clock = clock
        self.registry = CollectorRegistry()
        r = self.registry
        self._requests = Counter(
            "appliance_requests",
            "Inference requests by the route asked for, the model that served, the type "
            "(chat, completion, embeddings) and the outcome code (ok, cancelled, or the error's code).",
            (*REQUEST_LABELS, "code"),
            registry=r,
        )
        self._latency = Histogram(
            "appliance_request_duration_seconds",
            "Inference request latency, from arrival to its recorded end.",
            REQUEST_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._ttft = Histogram(
            "appliance_time_to_first_token_seconds",
            "Time from a generation request's arrival to its first token.",
            REQUEST_LABELS,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self._prompt_tokens = Counter(
            "appliance_prompt_tokens", "Prompt tokens of finished inference requests.", REQUEST_LABELS, registry=r
        )
        self._completion_tokens = Counter(
            "appliance_completion_tokens",
            "Completion tokens of finished inference requests.",
            REQUEST_LABELS,
            registry=r,
        )
        self._scrapes = Counter("appliance_metrics_scrapes", "Renderings of /metrics.", registry=r)
        self._render_seconds = Counter(
            "appliance_metrics_render_seconds", "Wall time spent rendering /metrics (off the event loop).", registry=r
        )
        self._render_cpu = Counter(
            "appliance_metrics_render_cpu_seconds", "CPU time of the threads that rendered /metrics.", registry=r
        )
        ProcessCollector(registry=r)
        r.register(Readings(services))
        self._series: dict[tuple[str, str, str], _Series] = {}
        self._counts: dict[tuple[str, str, str, str], Any] = {}
        self._lock = asyncio.Lock()  # one rendering at a time: a scrape storm queues, not piles up threads
        for name in self._model_names():
            self.prepare(name)
        services.governance.request_listeners.append(self.observe)

    # -- the request path ------------------------------------------------------------------------
    def observe(self, ctx: RequestContext, status: int) -> None:
        """One inference request, recorded (called on the loop: a few dict lookups). Never raises."""
        kind = ctx.kind or _KIND_OF_PATH.get(ctx.route, "")
        if kind not in KINDS:
            return  # the rest of the API
        try:
            route, model = route_of(ctx), ctx.model or NONE
            key = (route, model, kind, code_of(ctx, status))
            counter = self._counts.get(key)
            if counter is None:
                counter = self._counts[key] = self._requests.labels(*key)
            counter.inc()
            series = self._series_for(route, model, kind)
            series.latency.observe(self._clock() - ctx.started)
            if ctx.first_token_at is not None and kind != "embeddings":
                series.ttft.observe(max(0.0, ctx.first_token_at - ctx.started))
            if ctx.finished is not None:
                series.prompt_tokens.inc(ctx.finished.prompt_tokens)
                series.completion_tokens.inc(ctx.finished.completion_tokens)
        except Exception:  # a metric is never worth failing a request over
            log.exception("request %s: metrics not recorded", ctx.request_id)

    def prepare(self, model: str, route: str | None = None) -> None:
        """Create `model`'s series (asked for by name, or through `route`) at zero, so they are
        exported before its first request."""
        route = route or model
        for kind in KINDS:
            self._series_for(route, model, kind)
            key = (route, model, kind, "ok")
            if key not in self._counts:
                self._counts[key] = self._requests.labels(*key)

    def _series_for(self, route: str, model: str, kind: str) -> _Series:
        key = (route, model, kind)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series(
                self._latency.labels(*key),
                self._ttft.labels(*key),
                self._prompt_tokens.labels(*key),
                self._completion_tokens.labels(*key),
            )
        return series

    # -- a scrape --------------------------------------------------------------------------------
    async def render(self) -> bytes:
        """The exposition (text format 0.0.4), rendered in a worker thread."""
        for name in self.services.pool.names():  # models loaded since: their series exist from now
            if (name, name, KINDS[0]) not in self._series:
                self.prepare(name)
        async with self._lock:
            return await asyncio.to_thread(self._render)

    def _render(self) -> bytes:
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return generate_latest(self.registry)
        finally:
            self._scrapes.inc()
            self._render_seconds.inc(time.perf_counter() - wall)
            self._render_cpu.inc(time.thread_time() - cpu)

    def _model_names(self) -> Iterable[str]:
        names = dict.fromkeys(self.services.pool.names())
        try:
            names.update(dict.fromkeys(m.name for m in self.services.models.list()))
        except Exception:  # noqa: BLE001 - the registered models only add series up front
            log.exception("registered models not read for metrics")
        return names
