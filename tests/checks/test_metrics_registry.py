"""Two appliance apps in one process, each with the real model, keep their metrics apart: each
has its own registry, and a request to one moves only its counters."""

from __future__ import annotations

from pathlib import Path

from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families

from appliance.api.app import create_app
from appliance.checks.metrics import Metrics
from appliance.config import load_settings
from tests.conftest import MODEL_NAME, init_data_dir

BASE = "http://127.0.0.1"  # a Host the app answers for


def requests_ok(text: str, kind: str) -> float:
    labels = {"route": MODEL_NAME, "model": MODEL_NAME, "type": kind, "code": "ok"}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "appliance_requests_total" and s.labels == labels:
                return s.value
    raise AssertionError(f"no appliance_requests_total{labels}")


async def test_two_apps_in_one_process_keep_their_metrics_apart(tmp_path: Path, model_path: Path) -> None:
    keys = {}
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "appliance.toml").write_text("[runtime]\nslots = 2\nctx_per_slot = 256\n")
        keys[name] = {"Authorization": f"Bearer {init_data_dir(tmp_path / name, model_path)}"}
    one = create_app(load_settings(tmp_path / "one", env={}))
    two = create_app(load_settings(tmp_path / "two", env={}))
    async with AsyncTestClient(one, base_url=BASE) as a, AsyncTestClient(two, base_url=BASE) as b:
        assert one.state.services.metrics.registry is not two.state.services.metrics.registry
        Metrics(one.state.services)  # a third, over the same services: no "Duplicated timeseries"
        reply = await a.post(
            "/v1/completions", json={"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4}, headers=keys["one"]
        )
        assert reply.status_code == 200, reply.text
        scraped = {}
        for name, client in (("one", a), ("two", b)):
            response = await client.get("/metrics", headers=keys[name])
            assert response.status_code == 200, response.text
            scraped[name] = response.text
    assert requests_ok(scraped["one"], "completion") == 1
    assert requests_ok(scraped["two"], "completion") == 0
