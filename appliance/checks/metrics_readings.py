"""What a scrape reads from the running services: the engines, the circuit breakers, the
GPUs, the teams' budgets, and the latest check, drift and golden-set results in SQLite.

`Readings.collect` runs in the rendering thread, never on the event loop. Each source is read
on its own: one that fails is logged, shown as `appliance_metrics_source_up{source} 0`, and
leaves the rest of the scrape whole. No label or value holds a secret: names, ids and
numbers only (never an error text, a URL or a key)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance import __version__
from appliance.checks.findings import STATUSES, Finding
from appliance.checks.health.gpu import GpuReading, read_gpus

if TYPE_CHECKING:
    from appliance.api.services import Services

__all__ = ["BREAKER_STATES", "GPU_READING_SECONDS", "Readings"]

log = logging.getLogger(__name__)

BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
CHECK_STATUS = {s: i for i, s in enumerate(STATUSES)}  # ok 0, warn 1, fail 2, error 3
MIB = 1024 * 1024
GPU_READING_SECONDS = 5.0  # NVML is opened for each reading: at most one per this many seconds
_LATEST_CHECKS = (
    "SELECT r.check_name, r.status, r.started_at, r.duration_ms,"
    " CASE WHEN r.check_name = 'drift' THEN r.findings END AS findings FROM check_runs r"
    " JOIN (SELECT check_name, MAX(id) AS id FROM check_runs GROUP BY check_name) m ON m.id = r.id"
)
_LATEST_GOLDEN = (
    "SELECT r.set_name, r.target, r.started_at, r.pass_rate, r.total, r.passed, r.mean_similarity FROM golden_runs r"
    " JOIN (SELECT MAX(id) AS id FROM golden_runs GROUP BY set_name, target) m ON m.id = r.id"
)


class Readings(Collector):
    def __init__(self, services: Services, *, read_gpus: Callable[[], list[GpuReading | Finding]] = read_gpus) -> None:
        self.services = services
        self._read_gpus = read_gpus  # the gpu job's reading: a GpuReading per GPU, or a Finding where none
        self._gpus: list[GpuReading] = []
        self._gpus_read_at = -GPU_READING_SECONDS
        self._gpu_lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "appliance_metrics_source_up", "Whether the last scrape could read this source.", labels=["source"]
        )
        info = GaugeMetricFamily("appliance_build_info", "The appliance's version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        for source, read in (
            ("engines", self._engines),
            ("breakers", self._breakers),
            ("gpus", self._gpu_families),
            ("budgets", self._budgets),
            ("checks", self._checks),
            ("golden", self._golden),
        ):
            try:
                families = list(read())
            except Exception:  # noqa: BLE001 - one source that fails leaves the rest of the scrape whole
                log.exception("metrics: %s could not be read", source)
                up.add_metric([source], 0)
                continue
            up.add_metric([source], 1)
            yield from families
        yield up

    # -- engines ---------------------------------------------------------------------------------
    def _engines(self) -> Iterator[Metric]:
        pool = self.services.pool
        labels = ["model"]
        f = {
            "up": GaugeMetricFamily("appliance_engine_up", "Whether the loaded model reports healthy.", labels=labels),
            "tokens": CounterMetricFamily(
                "appliance_engine_generated_tokens", "Tokens the model has generated (rate: tokens/s).", labels=labels
            ),
            "served": CounterMetricFamily(
                "appliance_engine_served_sequences", "Sequences the model has finished.", labels=labels
            ),
            "cached": CounterMetricFamily(
                "appliance_engine_cached_prompt_tokens", "Prompt tokens reused from the KV cache.", labels=labels
            ),
            "steps": CounterMetricFamily(
                "appliance_engine_decode_steps", "Decode steps (batch size: tokens / steps).", labels=labels
            ),
            "busy": CounterMetricFamily(
                "appliance_engine_decode_busy_seconds", "Time the decode thread spent computing.", labels=labels
            ),
            "queue": GaugeMetricFamily(
                "appliance_engine_queue_depth", "Requests waiting for a free slot.", labels=labels
            ),
            "queue_limit": GaugeMetricFamily(
                "appliance_engine_queue_limit", "The queue's bound (past it: 503).", labels=labels
            ),
            "batch": GaugeMetricFamily(
                "appliance_engine_batch_size", "Sequences decoding together now.", labels=labels
            ),
            "slots": GaugeMetricFamily(
                "appliance_engine_slots", "Sequences the model can decode at once.", labels=labels
            ),
            "kv_used": GaugeMetricFamily("appliance_engine_kv_cells_used", "KV cache cells in use.", labels=labels),
            "kv_total": GaugeMetricFamily("appliance_engine_kv_cells", "KV cache cells in all.", labels=labels),
            "kv_ratio": GaugeMetricFamily(
                "appliance_engine_kv_used_ratio", "Share of the KV cache in use.", labels=labels
            ),
            "memory": GaugeMetricFamily(
                "appliance_engine_memory_bytes", "RAM and VRAM the loaded model takes.", labels=labels
            ),
        }
        for engine in pool.engines():
            s = engine.stats()
            name = [engine.name]
            f["up"].add_metric(name, 1 if engine.health().ok else 0)
            f["tokens"].add_metric(name, s.tokens_generated)
            f["served"].add_metric(name, s.requests_served)
            f["cached"].add_metric(name, _number(s.extra.get("prompt_tokens_cached")))
            f["steps"].add_metric(name, _number(s.extra.get("decode_steps")))
            f["busy"].add_metric(name, _number(s.extra.get("decode_busy_seconds")))
            f["queue"].add_metric(name, s.queue_depth)
            f["queue_limit"].add_metric(name, s.queue_limit)
            f["batch"].add_metric(name, s.active_sequences)
            f["slots"].add_metric(name, s.slots)
            f["kv_used"].add_metric(name, s.kv_cells_used)
            f["kv_total"].add_metric(name, s.kv_cells_total)
            f["kv_ratio"].add_metric(name, s.kv_cells_used / s.kv_cells_total if s.kv_cells_total else 0.0)
            f["memory"].add_metric(name, pool.memory_bytes(engine.name) or 0)
        yield from f.values()

    # -- breakers --------------------------------------------------------------------------------
    def _breakers(self) -> Iterator[Metric]:
        labels = ["candidate"]
        state = GaugeMetricFamily(
            "appliance_breaker_state", "Circuit breaker per candidate: 0 closed, 1 half-open, 2 open.", labels=labels
        )
        opened = CounterMetricFamily("appliance_breaker_opened", "Times the breaker opened.", labels=labels)
        failures = GaugeMetricFamily(
            "appliance_breaker_recent_failures", "Failures in the breaker's current window.", labels=labels
        )
        known = self.services.breakers.states()
        for name in self.services.pool.names():  # a model nothing has failed on yet: closed
            known.setdefault(name, {"state": "closed", "times_opened": 0, "recent_failures": 0})
        for name, b in sorted(known.items()):
            state.add_metric([name], BREAKER_STATES.get(b["state"], 2))
            opened.add_metric([name], b["times_opened"])
            failures.add_metric([name], b["recent_failures"])
        yield from (state, opened, failures)

    # -- GPUs ------------------------------------------------------------------------------------
    def _gpu_families(self) -> Iterator[Metric]:
        labels = ["gpu", "name"]
        count = GaugeMetricFamily("appliance_gpus", "GPUs NVML can see.")
        total = GaugeMetricFamily("appliance_gpu_memory_total_bytes", "GPU memory in all.", labels=labels)
        used = GaugeMetricFamily("appliance_gpu_memory_used_bytes", "GPU memory in use.", labels=labels)
        temp = GaugeMetricFamily("appliance_gpu_temperature_celsius", "GPU temperature.", labels=labels)
        power = GaugeMetricFamily("appliance_gpu_power_watts", "GPU power draw.", labels=labels)
        busy = GaugeMetricFamily("appliance_gpu_utilization_ratio", "Share of time the GPU was busy.", labels=labels)
        throttled = GaugeMetricFamily(
            "appliance_gpu_clocks_throttled", "1 for each reason NVML gives for lowered clocks now.",
            labels=[*labels, "reason"],
        )
        ecc = CounterMetricFamily(
            "appliance_gpu_ecc_errors", "ECC errors since the driver loaded.", labels=[*labels, "kind"]
        )
        gpus = self._gpus_now()
        count.add_metric([], len(gpus))
        for g in gpus:
            ident = [str(g.index), g.name]
            total.add_metric(ident, g.memory_total_mb * MIB)
            used.add_metric(ident, g.memory_used_mb * MIB)
            if g.temperature_c is not None:
                temp.add_metric(ident, g.temperature_c)
            if g.power_watts is not None:
                power.add_metric(ident, g.power_watts)
            if g.utilization_percent is not None:
                busy.add_metric(ident, g.utilization_percent / 100)
            for reason in g.throttle_reasons:
                throttled.add_metric([*ident, reason], 1)
            for kind, n in (("uncorrected", g.ecc_uncorrected), ("corrected", g.ecc_corrected)):
                if n is not None:
                    ecc.add_metric([*ident, kind], n)
        yield from (count, total, used, temp, power, busy, throttled, ecc)

    def _gpus_now(self) -> list[GpuReading]:
        with self._gpu_lock:
            now = time.monotonic()
            if now - self._gpus_read_at >= GPU_READING_SECONDS:
                readings = self._read_gpus()
                self._gpus = [g for g in readings if isinstance(g, GpuReading)]  # "no GPU" and faults: none
                self._gpus_read_at = now
            return self._gpus

    # -- budgets ---------------------------------------------------------------------------------
    def _budgets(self) -> Iterator[Metric]:
        budgets = self.services.budgets
        labels = ["team", "unit", "period"]
        ratio = GaugeMetricFamily(
            "appliance_team_budget_remaining_ratio",
            "Share of the team's budget left (after requests in flight).",
            labels=labels,
        )
        tokens = GaugeMetricFamily(
            "appliance_team_budget_remaining_tokens",
            "Tokens left in the team's token budget.",
            labels=["team", "period"],
        )
        money = GaugeMetricFamily(
            "appliance_team_budget_remaining_money",
            "Money left in the team's budget, in its currency.",
            labels=["team", "period", "currency"],
        )
        for budget in budgets.list_budgets(scope="team"):
            status = budgets.status(budget)
            remaining, limit = float(status["remaining"]), float(budget.amount)
            ratio.add_metric([budget.scope_id, budget.unit, budget.period], remaining / limit if limit > 0 else 0.0)
            if budget.unit == "tokens":
                tokens.add_metric([budget.scope_id, budget.period], remaining)
            else:
                money.add_metric([budget.scope_id, budget.period, budgets.currency], remaining)
        yield from (ratio, tokens, money)

    # -- checks, drift and golden sets -----------------------------------------------------------
    def _checks(self) -> Iterator[Metric]:
        status = GaugeMetricFamily(
            "appliance_check_status", "The check's last result: 0 ok, 1 warn, 2 fail, 3 error.", labels=["check"]
        )
        last = GaugeMetricFamily(
            "appliance_check_last_run_timestamp_seconds", "When the check last ran (Unix time).", labels=["check"]
        )
        took = GaugeMetricFamily(
            "appliance_check_last_duration_seconds", "How long the check's last run took.", labels=["check"]
        )
        psi = GaugeMetricFamily(
            "appliance_drift_psi",
            "Population stability index of the subject, current window against the baseline.",
            labels=["subject"],
        )
        change = GaugeMetricFamily(
            "appliance_drift_change", "Change of the subject's measure against the baseline.", labels=["subject"]
        )
        for row in self.services.store.query(_LATEST_CHECKS):
            name = [row["check_name"]]
            status.add_metric(name, CHECK_STATUS.get(row["status"], CHECK_STATUS["error"]))
            last.add_metric(name, row["started_at"])
            took.add_metric(name, (row["duration_ms"] or 0.0) / 1000)
            if row["findings"]:
                for finding in _findings(row["findings"]):
                    subject, details = str(finding.get("subject") or ""), finding.get("details") or {}
                    if isinstance(details.get("psi"), int | float):
                        psi.add_metric([subject], details["psi"])
                    if isinstance(details.get("change"), int | float):
                        change.add_metric([subject], details["change"])
        yield from (status, last, took, psi, change)

    def _golden(self) -> Iterator[Metric]:
        labels = ["set", "target"]
        rate = GaugeMetricFamily(
            "appliance_golden_pass_ratio", "Share of the golden set's cases the target passed, last run.", labels=labels
        )
        similarity = GaugeMetricFamily(
            "appliance_golden_mean_similarity",
            "Mean embedding similarity to the baseline answers, last run.",
            labels=labels,
        )
        last = GaugeMetricFamily(
            "appliance_golden_last_run_timestamp_seconds", "When the golden set last ran (Unix time).", labels=labels
        )
        for row in self.services.store.query(_LATEST_GOLDEN):
            ident = [row["set_name"], row["target"]]
            passed = row["pass_rate"] if row["pass_rate"] is not None else row["passed"] / max(1, row["total"])
            rate.add_metric(ident, passed)
            last.add_metric(ident, row["started_at"])
            if row["mean_similarity"] is not None:
                similarity.add_metric(ident, row["mean_similarity"])
        yield from (rate, similarity, last)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def _findings(text: str) -> list[dict[str, Any]]:
    try:
        found = json.loads(text)
    except ValueError:
        return []
    return [f for f in found if isinstance(f, dict)] if isinstance(found, list) else []
