"""The services one running appliance is made of, built once and injected into handlers."""

from __future__ import annotations

from dataclasses import dataclass

from litestar.di import NamedDependency

from appliance.api.network import TrustedProxies
from appliance.audit import AuditLog
from appliance.auth import KeyService
from appliance.auth.failures import FailedAuthCounter
from appliance.checks.alerts import AlertEngine
from appliance.checks.audit_forward import AuditForwarder
from appliance.checks.metrics import Metrics
from appliance.checks.scheduler import CheckScheduler
from appliance.config import Settings
from appliance.governance import Governance
from appliance.inference import InferenceService
from appliance.metering import BudgetService
from appliance.model_pool import ModelPool
from appliance.model_registry import ModelRegistry
from appliance.plugin_manager import PluginManager
from appliance.routing.breakers import Breakers
from appliance.routing.calibration import CalibrationService
from appliance.routing.catalog import Catalog
from appliance.routing.dispatch import Dispatcher
from appliance.routing.prober import CanaryProber
from appliance.routing.router import Router
from appliance.routing.upstream_registry import UpstreamRegistry
from appliance.routing.upstreams import UpstreamEngines
from appliance.store import Store
from appliance.teams import TeamService


@dataclass(slots=True)
class Services:
    settings: Settings
    store: Store
    keys: KeyService
    models: ModelRegistry
    pool: ModelPool
    inference: InferenceService
    teams: TeamService
    budgets: BudgetService
    audit: AuditLog
    governance: Governance
    auth_failures: FailedAuthCounter
    trusted_proxies: TrustedProxies
    local_uids: frozenset[int]  # who may use the local admin socket
    plugins: PluginManager
    catalog: Catalog
    upstreams: UpstreamRegistry
    remote: UpstreamEngines
    breakers: Breakers
    router: Router
    calibration: CalibrationService
    prober: CanaryProber
    dispatcher: Dispatcher
    # Set by the lifespan once the loop runs (appliance/checks/wiring.py).
    checks: CheckScheduler | None = None
    alerts: AlertEngine | None = None
    forwarder: AuditForwarder | None = None
    metrics: Metrics | None = None  # set by the lifespan (appliance/checks/metrics.py)


ServicesDep = NamedDependency[Services]  # how handlers ask for the services
