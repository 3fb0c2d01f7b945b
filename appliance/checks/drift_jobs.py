"""The scheduled drift checks: "golden" scores every golden set in `<data>/golden/` against its
baseline, "drift" measures input, output and feedback drift against the stored baseline.

`[check.golden]` options: `case_timeout_seconds` (300). `[check.drift]` options: those of
`DriftOptions` (drift.py), with `[drift]` window_hours, psi_warn and psi_fail."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from appliance.checks.drift import DriftOptions, Embed, baseline_fn, build_baseline, drift_report, load_baseline
from appliance.checks.findings import Finding, fail, ok
from appliance.checks.golden_runs import GoldenRunner, embed_texts, embedding_model, run_finding
from appliance.checks.registry import CheckContext, CheckJob
from appliance.errors import ApplianceError, Conflict
from runtime.errors import RuntimeFault

if TYPE_CHECKING:
    from appliance.api.services import Services

__all__ = ["drift_checks", "golden_runner", "loop_embedder", "run_drift", "run_golden", "threadsafe_call"]

EMBED_TIMEOUT = 300.0


def drift_checks(ctx: CheckContext) -> list[CheckJob]:
    return [
        CheckJob(
            "golden",
            lambda: run_golden(ctx),
            3600.0,
            "Golden sets scored against their baselines",
            timeout_seconds=3600.0,
        ),
        CheckJob(
            "drift",
            lambda: run_drift(ctx),
            3600.0,
            "Input, output and feedback drift against the baseline",
            timeout_seconds=900.0,
        ),
    ]


def golden_runner(services: Services, options: dict[str, object] | None = None) -> GoldenRunner:
    timeout = float((options or {}).get("case_timeout_seconds", 300.0))  # type: ignore[arg-type]
    return GoldenRunner(services, case_timeout=timeout)


def run_golden(ctx: CheckContext) -> list[Finding]:
    """Every set (a worker thread's call; the generations run on the loop). A malformed set is
    a "fail" finding of its own; the other sets still run."""
    runner = golden_runner(ctx.services, ctx.options.get("golden"))
    loaded = runner.sets()
    findings = [
        fail(f"golden set {name} cannot be used: {message}", name, error=message)
        for name, message in sorted(loaded.errors.items())
    ]
    for gset in loaded.sets.values():
        try:
            run = ctx.on_loop(runner.run(gset, trigger="schedule"), runner.case_timeout * len(gset.cases) + 60)
        except (ApplianceError, RuntimeFault, TimeoutError) as exc:
            findings.append(Finding("error", f"golden set {gset.name} could not run: {exc}", gset.name))
            continue
        findings.append(run_finding(run))
    return findings or [ok(f"no golden sets in {runner.directory}", "golden")]


def run_drift(ctx: CheckContext) -> list[Finding]:
    """The current window against the baseline. With none stored yet (and `auto_baseline`),
    a window with enough traffic becomes the baseline."""
    services = ctx.services
    options = DriftOptions.from_settings(services.settings.drift, ctx.options.get("drift"))
    embed, model = loop_embedder(services, lambda coro: ctx.on_loop(coro, EMBED_TIMEOUT))
    with services.store.snapshot() as conn:
        missing = load_baseline(conn) is None
        if not (missing and options.auto_baseline):
            return drift_report(conn, options, embed=embed, model=model).findings
        end = time.time()
        try:
            summaries = build_baseline(
                conn, options, start=end - options.window_seconds, end=end, embed=embed, model=model
            )
        except Conflict as exc:
            return [ok(f"no drift baseline yet, and not enough traffic to set one: {exc.message}", "baseline")]
    stored = services.store.write_sync(
        baseline_fn(services.audit, summaries, start=end - options.window_seconds, end=end, trigger="schedule")
    )
    return [
        ok(
            f"drift baseline set from the last {options.window_hours:g} h ({stored['requests']} requests)",
            "baseline",
            **stored,
        )
    ]


def loop_embedder(services: Services, call: Callable[..., list[list[float]]]) -> tuple[Embed | None, str]:
    """A blocking embedder for worker threads (`call` runs a coroutine on the server's loop and
    waits), and the embedding model's name; (None, "") when there is no model to embed with."""
    try:
        model = embedding_model(services)
    except RuntimeFault:
        return None, ""

    def embed(texts: list[str]) -> list[list[float]]:
        return call(embed_texts(services, texts))

    return embed, model


def threadsafe_call(
    loop: asyncio.AbstractEventLoop, timeout: float = EMBED_TIMEOUT
) -> Callable[..., list[list[float]]]:
    """`call` for `loop_embedder` from a thread that is not the loop's (an API worker thread)."""
    return lambda coro: asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)
