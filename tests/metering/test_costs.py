"""Cost arithmetic and the worst-case estimate."""

from __future__ import annotations

import pytest

from appliance.config import CostSettings, UpstreamPrice
from appliance.metering.costs import CostModel

SETTINGS = CostSettings(electricity_per_kwh=0.30, hardware_per_hour=0.10, cpu_watts=15.0)
PRICES = [UpstreamPrice(model="gpt-remote", input_per_1k=0.5, output_per_1k=1.5)]


def test_local_cost_is_energy_plus_amortisation() -> None:
    costs = CostModel(SETTINGS, PRICES)
    assert costs.local(3.6e6, 0) == pytest.approx(0.30)  # 1 kWh
    assert costs.local(0, 3600) == pytest.approx(0.10)  # 1 hour of hardware
    assert costs.local(15 * 10, 10) == pytest.approx(150 / 3.6e6 * 0.30 + 10 / 3600 * 0.10)
    assert costs.local(-1, -1) == 0.0


def test_remote_cost_per_1k_tokens() -> None:
    costs = CostModel(SETTINGS, PRICES)
    assert costs.remote("gpt-remote", 2000, 1000) == pytest.approx(1.0 + 1.5)
    assert costs.remote("unpriced", 2000, 1000) == 0.0
    assert costs.is_remote("gpt-remote") and not costs.is_remote("smollm")
    assert costs.actual("gpt-remote", prompt_tokens=1000, completion_tokens=0, energy_joules=99, compute_seconds=99) == pytest.approx(0.5)
    assert costs.actual("smollm", prompt_tokens=1000, completion_tokens=0, energy_joules=0, compute_seconds=36) == pytest.approx(0.001)


def test_remote_worst_case_bounds_max_tokens_with_prompt_margin() -> None:
    costs = CostModel(SETTINGS, PRICES)
    worst = costs.worst_case("gpt-remote", 1000, 500)
    assert worst == pytest.approx(1.1 * 0.5 + 0.5 * 1.5)
    for completion in (0, 1, 250, 500):
        assert costs.remote("gpt-remote", 1050, completion) <= worst


@pytest.mark.parametrize("prompt, max_tokens, completion", [(20, 256, 256), (900, 64, 64), (1500, 500, 3), (1, 1, 1)])
@pytest.mark.parametrize("concurrent", [1, 2, 4, 8])
def test_local_worst_case_covers_realistic_runs(prompt: int, max_tokens: int, completion: int, concurrent: int) -> None:
    """A CPU box decoding at 40 tok/s alone; prefill ~10x faster; batching shares step time,
    so the per-sequence share only falls with concurrency. Add 50% jitter on top."""
    costs = CostModel(SETTINGS, PRICES)
    decode_tps, prefill_tps = 40.0, 400.0
    step = 1 / decode_tps * (1 + 0.15 * (concurrent - 1))  # a step with k sequences is a bit slower...
    share = step / concurrent  # ...but shared among k
    compute = (prompt / prefill_tps + completion * share) * 1.5
    actual = costs.local(compute * SETTINGS.cpu_watts, compute)
    assert costs.worst_case("smollm", prompt, max_tokens, est_tokens_per_second=decode_tps) >= actual


def test_observed_throughput_raises_the_worst_case() -> None:
    costs = CostModel(SETTINGS, PRICES, default_tokens_per_second=50)
    before = costs.worst_case("smollm", 100, 100)
    assert costs.seconds_per_token("smollm") == pytest.approx(1 / 50)
    costs.observe("smollm", tokens=100, compute_seconds=10)  # 10 tok/s: much slower
    assert costs.seconds_per_token("smollm") == pytest.approx(0.1)
    assert costs.worst_case("smollm", 100, 100) == pytest.approx(before * 5)
    # an optimistic caller estimate never undercuts what was observed
    assert costs.worst_case("smollm", 100, 100, est_tokens_per_second=1000) == pytest.approx(before * 5)
    costs.observe("smollm", tokens=100, compute_seconds=1)  # faster: forgotten only gradually
    assert 0.09 < costs.seconds_per_token("smollm") < 0.1
    costs.observe("gpt-remote", tokens=100, compute_seconds=100)  # remote models are not learned
    assert costs.seconds_per_token("gpt-remote") == pytest.approx(1 / 50)


def test_worst_case_uses_peak_gpu_power_and_falls_back_to_cpu_watts() -> None:
    readings: list[float | None] = [None, 120.0, 80.0]
    now = [0.0]
    calls = []

    def source() -> float | None:
        calls.append(now[0])
        return readings.pop(0)

    costs = CostModel(SETTINGS, PRICES, power_watts_source=source, monotonic=lambda: now[0])
    assert costs.watts() == 15.0  # NVML has no reading: configured CPU wattage
    assert costs.watts() == 15.0 and len(calls) == 1  # cached for a few seconds
    now[0] = 10
    assert costs.watts() == 120.0
    now[0] = 20
    assert costs.watts() == 120.0  # the peak, not the idle reading
    seconds = 200 * 0.2 * 2.0  # 200 tokens at the default 5 tok/s, safety factor 2
    assert costs.worst_case("smollm", 100, 100) == pytest.approx(costs.local(seconds * 120.0, seconds))


def test_a_failing_power_source_is_ignored() -> None:
    def broken() -> float | None:
        raise RuntimeError("driver gone")

    assert CostModel(SETTINGS, PRICES, power_watts_source=broken).watts() == 15.0
