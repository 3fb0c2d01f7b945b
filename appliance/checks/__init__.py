"""Scheduled health and drift checks, their history, and the alerts they raise."""

from appliance.checks.findings import Finding, Status, fail, ok, warn
from appliance.checks.registry import CheckContext, CheckJob, CheckState

__all__ = ["CheckContext", "CheckJob", "CheckState", "Finding", "Status", "fail", "ok", "warn"]
