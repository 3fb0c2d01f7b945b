"""The built-in health checks, one small module per job: `health_checks(ctx)` lists them
all with their default schedules (`[check.<name>]` may change each, and holds its options)."""

from appliance.checks.health.audit_chain import audit_chain_job
from appliance.checks.health.backups import backup_job
from appliance.checks.health.canary import canary_job
from appliance.checks.health.database import sqlite_job
from appliance.checks.health.gpu import gpu_job
from appliance.checks.health.host import host_job
from appliance.checks.health.model_files import model_files_job
from appliance.checks.health.upstreams import upstreams_job
from appliance.checks.registry import CheckContext, CheckJob

__all__ = [
    "audit_chain_job",
    "backup_job",
    "canary_job",
    "gpu_job",
    "health_checks",
    "host_job",
    "model_files_job",
    "sqlite_job",
    "upstreams_job",
]


def health_checks(ctx: CheckContext) -> list[CheckJob]:
    """Every health job: canary 300 s, gpu 60 s, host 60 s, sqlite 300 s, audit_chain 300 s,
    model_files 3600 s, backup daily at 03:00 (cron; 86400 s as its interval), upstreams 300 s."""
    return [
        canary_job(ctx),
        gpu_job(ctx),
        host_job(ctx),
        sqlite_job(ctx),
        audit_chain_job(ctx),
        model_files_job(ctx),
        backup_job(ctx),
        upstreams_job(ctx),
    ]
