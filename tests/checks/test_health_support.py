"""Shared by the health-check tests (`open_site`): real services on a real data directory,
the real default model registered and loaded by the real pool, and a `CheckContext` on the
test's own loop; and the test that `health_checks` lists every job with its schedule."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.api.app import build_services
from appliance.api.services import Services
from appliance.audit import cli_actor
from appliance.checks.findings import Finding
from appliance.checks.health import health_checks
from appliance.checks.registry import CheckContext, CheckJob, CheckState
from appliance.config import load_settings
from runtime.engine import Engine
from tests.conftest import MODEL_NAME, init_data_dir

CONFIG = """
[runtime]
slots = 2
ctx_per_slot = 256
"""
_ENCODED: dict[str, Path] = {}


def encoded_cache(factory: pytest.TempPathFactory, model_path: Path) -> Path:
    """The default model's CPU re-encoding, built once per session (by `appliance init`), for
    each site to hard-link instead of building its own."""
    if "dir" not in _ENCODED:
        data = factory.mktemp("health-template")
        init_data_dir(data, model_path)
        _ENCODED["dir"] = data / "models" / "encoded"
    return _ENCODED["dir"]


@dataclass
class Site:
    services: Services
    ctx: CheckContext
    data: Path

    def job(self, name: str) -> CheckJob:
        (job,) = [j for j in health_checks(self.ctx) if j.name == name]
        return job

    async def run(self, name: str, **options: Any) -> list[Finding]:
        """One run of the job `name`, in a worker thread as the scheduler runs it; `options` are
        added to its `[check.<name>]` table, for this run and the next."""
        if options:
            self.ctx.options[name] = self.ctx.options.get(name, {}) | options
        return await asyncio.to_thread(self.job(name).run)

    def state(self, check: str, subject: str = "") -> dict[str, Any] | None:
        return self.ctx.state.get(check, subject)

    def audit_bodies(self, kind: str = "system") -> list[dict[str, Any]]:
        rows = self.services.store.query("SELECT body FROM audit WHERE kind = ? ORDER BY idx", (kind,))
        return [json.loads(r["body"]) for r in rows]


def by_subject(findings: list[Finding]) -> dict[str, Finding]:
    out = {f.subject: f for f in findings}
    assert len(out) == len(findings), findings
    return out


def replace_changed(path: Path) -> None:
    """Give `path` other bytes (one flipped in the middle) by writing a new file over it: model
    files are hard links of the shared test model, which must never be written in place."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tmp = path.with_name(path.name + ".tampered")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def restore_link(source: Path, path: Path) -> None:
    tmp = path.with_name(path.name + ".restored")
    os.link(source, tmp)
    os.replace(tmp, path)


@asynccontextmanager
async def open_site(
    data: Path,
    model_path: Path,
    encoded: Path,
    *,
    config: str = "",
    extra_models: Iterable[str] = (),
    engines: Iterable[Engine] = (),
) -> AsyncIterator[Site]:
    data.mkdir(parents=True, exist_ok=True)
    (data / "appliance.toml").write_text(CONFIG + config)
    settings = load_settings(data, env={})
    settings.paths.ensure()
    settings.paths.encoded_models.mkdir(parents=True, exist_ok=True)
    for cached in encoded.iterdir():
        os.link(cached, settings.paths.encoded_models / cached.name)
    services = build_services(settings)
    try:
        for name in (MODEL_NAME, *extra_models):
            services.models.add(model_path, name, actor=cli_actor())
        await services.pool.start()
        for engine in engines:
            services.pool.add(engine)
        ctx = CheckContext(services, asyncio.get_running_loop(), CheckState(services.store), {})
        yield Site(services, ctx, data)
    finally:
        await services.pool.close()
        await services.remote.client.aclose()
        services.store.close()
        shutil.rmtree(data / "models", ignore_errors=True)  # 200 MB of links and copies per site


def test_every_health_job_is_listed_with_its_schedule() -> None:
    ctx = CheckContext(None, asyncio.new_event_loop(), None, {})  # type: ignore[arg-type]
    try:
        jobs = {job.name: job for job in health_checks(ctx)}
    finally:
        ctx.loop.close()
    intervals = {name: job.interval_seconds for name, job in jobs.items()}
    assert intervals == {
        "canary": 300,
        "gpu": 60,
        "host": 60,
        "sqlite": 300,
        "audit_chain": 300,
        "model_files": 3600,
        "backup": 86400,
        "upstreams": 300,
    }
    assert jobs["backup"].cron == "0 3 * * *"
    assert [name for name, job in jobs.items() if job.cron] == ["backup"]
    assert all(job.description and job.timeout_seconds > 0 and job.source == "built-in" for job in jobs.values())
