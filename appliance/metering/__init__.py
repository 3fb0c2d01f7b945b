"""Metering: what requests cost, who spent it, budgets that cap it and per-key rate limits.

See docs/metering.md for the request-path sequence and why spend never exceeds a budget.
"""

from appliance.metering.budgets import Bill, Budget, BudgetService, Reservation
from appliance.metering.costs import CostModel
from appliance.metering.ratelimit import RateHeaders, RateLimiter
from appliance.metering.usage import UsageRecord, insert_fn, rollup

__all__ = [
    "Bill",
    "Budget",
    "BudgetService",
    "CostModel",
    "RateHeaders",
    "RateLimiter",
    "Reservation",
    "UsageRecord",
    "insert_fn",
    "rollup",
]
