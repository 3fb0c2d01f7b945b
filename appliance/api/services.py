"""The services one running appliance is made of, built once and injected into handlers."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.auth import KeyService
from appliance.config import Settings
from appliance.engine_pool import EnginePool
from appliance.inference import InferenceService
from appliance.model_registry import ModelRegistry
from appliance.store import Store


@dataclass(slots=True)
class Services:
    settings: Settings
    store: Store
    keys: KeyService
    models: ModelRegistry
    pool: EnginePool
    inference: InferenceService
