"""What can serve a request: the local models (registered, and the engines this process
runs) and the models remote upstreams serve, as the router and the dispatcher see them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from appliance.model_registry import ModelRegistry
from runtime.engine import Engine
from runtime.errors import EngineUnavailable

if TYPE_CHECKING:  # the pool loads llama.cpp, which the CLI must not import to explain a route
    from appliance.engine_pool import EnginePool

ALL_CAPABILITIES = frozenset({"chat", "completion", "embeddings", "json"})
LOAD_BYTES_PER_SECOND = 400e6  # reading and repacking a GGUF file, roughly, on this class of box


class Catalog:
    def __init__(
        self,
        pool: EnginePool,
        models: ModelRegistry,
        *,
        remote: Callable[[str], Engine | None] = lambda name: None,
        remote_names: Callable[[], list[str]] = list,
        load: Callable[[str], Awaitable[Engine]] | None = None,
        loadable: Callable[[str], bool] | None = None,
    ) -> None:
        """`remote(name)`: the engine of an upstream model ("<upstream>/<model>"), or None;
        `load(name)`: loads a registered local model that is not resident (the model pool);
        `loadable(name)`: whether it may (registered, enabled, its last load did not fail)."""
        self.pool = pool
        self.models = models
        self._remote = remote
        self._remote_names = remote_names
        self._load = load
        self._loadable = loadable or (lambda name: self.models.find(name) is not None)

    def known(self, name: str) -> bool:
        """Something that can serve now or on demand: a resident engine, an upstream model, or
        a registered model the pool can load."""
        if name in self.pool or self.is_remote(name):
            return True
        return self._load is not None and self._loadable(name)

    def registered(self, name: str) -> bool:
        """A name a route may name: a local model (registered or running) or an upstream model."""
        return name in self.pool or self.models.find(name) is not None or self.is_remote(name)

    def is_remote(self, name: str) -> bool:
        return "/" in name and name in self._remote_names()

    def resident(self, name: str) -> bool:
        return name in self.pool or self.is_remote(name)

    def load_seconds(self, name: str) -> float:
        record = self.models.find(name)
        return record.size_bytes / LOAD_BYTES_PER_SECOND if record else 0.0

    def capabilities(self, name: str) -> frozenset[str]:
        if self.is_remote(name):
            return ALL_CAPABILITIES
        record = self.models.find(name)
        if record is None:  # an engine without a registered file (a stand-in): it says nothing
            return ALL_CAPABILITIES
        return ALL_CAPABILITIES if record.has_chat_template else ALL_CAPABILITIES - {"chat"}

    def local_names(self) -> list[str]:
        """The local models a request may name: those running, then those the pool can load
        (a model unloaded for idleness is still offered, and `/v1/models` still lists it)."""
        names = self.pool.names()
        if self._load is not None:
            names += [m.name for m in self.models.list() if m.name not in names and self._loadable(m.name)]
        return names

    async def engine(self, name: str) -> Engine:
        """The engine that serves `name` now; raises `EngineUnavailable` when there is none."""
        engine = self.pool.get(name)
        if engine is not None:
            return engine
        remote = self._remote(name) if "/" in name else None
        if remote is not None:
            return remote
        if self._load is not None and self.models.find(name) is not None:
            return await self._load(name)
        reason = self.pool.failures.get(name)
        raise EngineUnavailable(f"the model {name} is not loaded" + (f": {reason}" if reason else ""))
