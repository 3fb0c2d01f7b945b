"""What a request costs, and the most it can cost.

Local models: energy x electricity price plus hardware amortisation per second of compute.
The engine already shares each batch step's time and energy among the sequences in it, so
`Finished.compute_seconds` and `Finished.energy_joules` are this request's share.

Remote upstreams: a price per 1,000 prompt and completion tokens.

`worst_case` is the figure a budget reserves before any compute is spent. For a remote model
it is a true bound (the upstream cannot return more than `max_tokens`; the prompt count gets a
10% margin because the upstream's tokenizer may count differently). For a local model it is an
*estimate*, because compute time is not a function of tokens alone (a busy or throttled box is
slower). It is made deliberately generous:

    seconds = (prompt_tokens + max_tokens) x seconds_per_token x safety_factor
    energy  = seconds x watts

- every prompt token is priced like a decoded token, although prefill runs many tokens per
  forward pass and is typically 10x or more cheaper per token;
- `seconds_per_token` is the slowest recent rate observed for the model (`observe`), a
  caller-supplied throughput, or a pessimistic default;
- `watts` is the highest power reading seen so far (NVML), else the configured CPU wattage;
- `safety_factor` (default 2) covers contention and thermal throttling on top of that.

Budgets never rely on this estimate being right: a request whose measured cost exceeds its
reservation is billed at the reservation and the excess is recorded in the usage row as
`unbilled_cost` (see `appliance.metering.budgets` and docs/metering.md).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable

from appliance.config import CostSettings, UpstreamPrice

__all__ = ["CostModel", "DEFAULT_SAFETY_FACTOR", "DEFAULT_TOKENS_PER_SECOND", "REMOTE_PROMPT_MARGIN"]

JOULES_PER_KWH = 3.6e6
DEFAULT_SAFETY_FACTOR = 2.0
DEFAULT_TOKENS_PER_SECOND = 5.0  # pessimistic: used for a local model never observed before
REMOTE_PROMPT_MARGIN = 1.10
_DECAY = 0.98  # how fast the slowest-rate memory forgets a slow outlier, per observation
_POWER_CACHE_SECONDS = 5.0


class CostModel:
    """Prices requests. Thread-safe; cheap to call on every request."""

    def __init__(
        self,
        costs: CostSettings,
        upstream_prices: Iterable[UpstreamPrice] = (),
        *,
        power_watts_source: Callable[[], float | None] | None = None,
        safety_factor: float = DEFAULT_SAFETY_FACTOR,
        default_tokens_per_second: float = DEFAULT_TOKENS_PER_SECOND,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if safety_factor < 1:
            raise ValueError("safety_factor must be at least 1")
        if default_tokens_per_second <= 0:
            raise ValueError("default_tokens_per_second must be positive")
        self.settings = costs
        self.currency = costs.currency
        self._prices = {p.model: p for p in upstream_prices}
        self._power_source = power_watts_source
        self.safety_factor = safety_factor
        self._default_spt = 1.0 / default_tokens_per_second
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._slowest_spt: dict[str, float] = {}  # model -> seconds per token, decaying maximum
        self._peak_watts: float | None = None
        self._power_read_at = -math.inf

    # -- actual cost ------------------------------------------------------------------------
    def local(self, energy_joules: float, compute_seconds: float) -> float:
        """Cost of local compute: energy at the electricity price plus hardware amortisation."""
        c = self.settings
        return (
            max(0.0, energy_joules) / JOULES_PER_KWH * c.electricity_per_kwh
            + max(0.0, compute_seconds) / 3600.0 * c.hardware_per_hour
        )

    def remote(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        """Cost of a remote upstream call at its per-1k-token prices (0 for an unpriced model)."""
        price = self._prices.get(model)
        if price is None:
            return 0.0
        return prompt_tokens / 1000.0 * price.input_per_1k + completion_tokens / 1000.0 * price.output_per_1k

    def set_price(self, model: str, input_per_1k: float, output_per_1k: float) -> None:
        """Price an upstream model per token (the upstream registry keeps these in step)."""
        with self._lock:
            self._prices[model] = UpstreamPrice(model=model, input_per_1k=input_per_1k, output_per_1k=output_per_1k)

    def forget_price(self, model: str) -> None:
        with self._lock:
            self._prices.pop(model, None)

    def estimate(self, model: str, prompt_tokens: int, completion_tokens: int, *, extra_seconds: float = 0.0) -> float:
        """The expected cost of a request, for choosing between candidates (not a bound):
        remote at its prices, local at its recent rate, plus `extra_seconds` of compute (the
        time to load a model that is not resident)."""
        if self.is_remote(model):
            return self.remote(model, prompt_tokens, completion_tokens)
        seconds = (max(0, prompt_tokens) + max(0, completion_tokens)) * self.seconds_per_token(model) + extra_seconds
        return self.local(seconds * self.watts(), seconds)

    def is_remote(self, model: str) -> bool:
        """A model with an `[[upstream_prices]]` entry is priced per token; any other is local."""
        return model in self._prices

    def actual(
        self,
        model: str,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        energy_joules: float = 0.0,
        compute_seconds: float = 0.0,
    ) -> float:
        """The measured cost of a finished request (remote by tokens, local by compute)."""
        if self.is_remote(model):
            return self.remote(model, prompt_tokens, completion_tokens)
        return self.local(energy_joules, compute_seconds)

    # -- worst case -------------------------------------------------------------------------
    def worst_case(
        self,
        model: str,
        prompt_tokens: int,
        max_tokens: int,
        *,
        est_tokens_per_second: float | None = None,
    ) -> float:
        """The most this request should cost; what a budget reserves before compute starts.

        `est_tokens_per_second` is a local model's single-stream decode throughput; when None
        the slowest recently observed rate (see `observe`) or a pessimistic default is used.
        A given estimate is never trusted to be faster than what was observed.
        """
        if self.is_remote(model):
            return self.remote(model, math.ceil(prompt_tokens * REMOTE_PROMPT_MARGIN), max_tokens)
        with self._lock:
            observed = self._slowest_spt.get(model)
        if est_tokens_per_second is not None and est_tokens_per_second > 0:
            spt = max(1.0 / est_tokens_per_second, observed or 0.0)
        else:
            spt = observed if observed is not None else self._default_spt
        seconds = (max(0, prompt_tokens) + max(0, max_tokens)) * spt * self.safety_factor
        return self.local(seconds * self.watts(), seconds)

    def seconds_per_token(self, model: str) -> float:
        """The slowest recent compute seconds per token for `model`, or the default."""
        with self._lock:
            return self._slowest_spt.get(model, self._default_spt)

    def observe(self, model: str, *, tokens: int, compute_seconds: float) -> None:
        """Learn a local model's throughput from a finished request.

        Keeps a decaying maximum of seconds per token, so a slowdown is picked up at once and
        a speed-up only gradually. `tokens` should be the tokens actually computed
        (prompt - cached + completion).
        """
        if tokens <= 0 or compute_seconds <= 0 or self.is_remote(model):
            return
        spt = compute_seconds / tokens
        with self._lock:
            previous = self._slowest_spt.get(model)
            self._slowest_spt[model] = spt if previous is None else max(spt, previous * _DECAY)

    def watts(self) -> float:
        """Power used for worst-case energy: the highest reading seen, else `cpu_watts`.

        The source (NVML) is read at most every few seconds; None from it means unknown.
        """
        now = self._monotonic()
        with self._lock:
            due = self._power_source is not None and now - self._power_read_at >= _POWER_CACHE_SECONDS
            if due:
                self._power_read_at = now
        if due:
            assert self._power_source is not None
            try:
                reading = self._power_source()
            except Exception:  # noqa: BLE001 - a failing driver must not fail requests
                reading = None
            if reading is not None and reading > 0:
                with self._lock:
                    self._peak_watts = max(reading, self._peak_watts or 0.0)
        with self._lock:
            peak = self._peak_watts
        return peak if peak is not None else self.settings.cpu_watts
