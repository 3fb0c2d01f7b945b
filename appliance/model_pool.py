"""The model pool: the local models loaded at once, within a memory budget (RAM and VRAM,
appliance/memory_budget.py).

- A registered model loads on first use; concurrent requests for it share the one load,
  which runs off the event loop.
- A load that does not fit evicts the least recently used idle, unpinned models, if that
  makes room; otherwise it is refused with `ModelDoesNotFit` (needed and free MB).
- An unpinned model unused for its `idle_unload_seconds` is unloaded by `run_idle_unloads`.
- Pinned models (appliance/model_pins.py; the default model unless unpinned) stay.
"Used" means a request got the engine from the pool (`get`); a model is idle when its engine
has no active or queued sequence and nothing got it within `grace_seconds`. Every change is
audited: an admin's as an admin record, the pool's own (on-demand loads, evictions, idle
unloads) as a system record.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from appliance.audit.log import Actor, AuditLog
from appliance.config import Settings
from appliance.engine_pool import EnginePool, plan_load, prepare_backend, start_engine
from appliance.errors import AuditUnavailable, Conflict, ModelDoesNotFit, ModelNotFound, StoreError
from appliance.memory_budget import OVERHEAD_BYTES, Budget, MemoryBudget, Need
from appliance.model_pins import Pins, default_model
from appliance.model_registry import ModelRegistry
from runtime.engine import Engine
from runtime.errors import EngineUnavailable, RuntimeFault

__all__ = ["POOL_ACTOR", "Loaded", "ModelPool"]

log = logging.getLogger(__name__)
POOL_ACTOR = Actor({"kind": "pool"})
GRACE_SECONDS = 5.0  # an engine handed out this recently may still be preparing its request


def mb(n: int) -> int:
    return round(n / (1 << 20))


@dataclass(slots=True)
class Resident:
    need: Need  # Need() for an engine the pool did not load (a stand-in)
    last_used: float  # monotonic


@dataclass(frozen=True, slots=True)
class Loaded:
    engine: Engine
    evicted: list[str] = field(default_factory=list)


class ModelPool(EnginePool):
    """`on_demand=False`: serve `engines` only (stand-ins), load nothing, unload nothing by itself."""

    def __init__(
        self,
        settings: Settings,
        models: ModelRegistry,
        pins: Pins,
        audit: AuditLog,
        *,
        budget: MemoryBudget | None = None,
        engines: Iterable[Engine] = (),
        on_demand: bool = True,
        grace_seconds: float = GRACE_SECONDS,
    ) -> None:
        self._resident: dict[str, Resident] = {}
        super().__init__(engines)
        for engine in self.engines():
            self._resident[engine.name] = Resident(Need(), time.monotonic())
        self.settings = settings
        self.models = models
        self.pins = pins
        self.audit = audit
        self.budget = budget or MemoryBudget(settings.runtime.memory_budget_mb)
        self.on_demand = on_demand
        self.grace_seconds = grace_seconds
        self._loading: dict[str, asyncio.Task[Loaded]] = {}
        self._reserved: dict[str, Need] = {}  # loads past the budget check, not resident yet
        self._estimates: dict[str, Need] = {}  # the last plan of each model, for the status
        self._broken: set[str] = set()  # its last load failed (the file, llama.cpp): see `failures`
        self._room = asyncio.Lock()  # one budget check (and its evictions) at a time
        self._closed = False

    # -- EnginePool, with use counted ----------------------------------------------------------
    def get(self, name: str) -> Engine | None:
        engine = super().get(name)
        if engine is not None:
            self._resident[name].last_used = time.monotonic()
        return engine

    def peek(self, name: str) -> Engine | None:
        """The engine of `name`, without counting as a use (for status pages)."""
        return super().get(name)

    def add(self, engine: Engine, *, need: Need | None = None) -> None:
        super().add(engine)
        self._resident[engine.name] = Resident(need or Need(), time.monotonic())

    def remove(self, name: str) -> Engine | None:
        self._resident.pop(name, None)
        return super().remove(name)

    async def close(self) -> None:
        self._closed = True
        await super().close()
        self._resident.clear()

    # -- what is where -------------------------------------------------------------------------
    def pinned(self, name: str) -> bool:
        return self.pins.pinned(name, default=default_model(self.models))

    def idle_unload_seconds(self, name: str) -> float:
        own = self.settings.model_settings(name).idle_unload_seconds
        return self.settings.runtime.idle_unload_seconds if own is None else own

    def memory_bytes(self, name: str) -> int | None:
        """What the model takes resident (or, not resident, took when last planned)."""
        resident = self._resident.get(name)
        need = resident.need if resident is not None and resident.need != Need() else self._estimates.get(name)
        return need.total_bytes if need is not None else None

    def last_used(self, name: str) -> float | None:
        """Seconds since the epoch when a request last got the engine; None when not resident."""
        resident = self._resident.get(name)
        return None if resident is None else time.time() - (time.monotonic() - resident.last_used)

    def loadable(self, name: str) -> bool:
        """Whether a request for `name` may load it: registered, enabled, and its last load did
        not fail (an admin's `load` retries those)."""
        return (
            self.on_demand and name not in self._broken and self.settings.model_settings(name).enabled
            and self.models.find(name) is not None
        )

    def loading(self, name: str) -> bool:
        return name in self._loading

    def used(self) -> Need:
        total = Need()
        for need in [*(r.need for r in self._resident.values()), *self._reserved.values()]:
            total += need
        return total

    async def measure(self) -> Budget:
        return await asyncio.to_thread(self.budget.measure, self.used())

    def _busy(self, name: str) -> int:
        engine = self.peek(name)
        if engine is None:
            return 0
        stats = engine.stats()
        return stats.active_sequences + stats.queue_depth

    def _idle(self, name: str) -> bool:
        resident = self._resident[name]
        recent = time.monotonic() - resident.last_used < self.grace_seconds
        return not recent and self._busy(name) == 0 and name not in self._loading

    def _reloadable(self, name: str) -> bool:
        return self.on_demand and self.models.find(name) is not None

    def _evictable(self) -> list[str]:
        """Idle, unpinned models the pool can load again, least recently used first."""
        names = [n for n in self._resident if self._reloadable(n) and not self.pinned(n) and self._idle(n)]
        return sorted(names, key=lambda n: self._resident[n].last_used)

    def _known(self, name: str) -> None:
        if name not in self and self.models.find(name) is None:
            raise ModelNotFound(f"There is no model named '{name}'.", param="name")

    # -- loading ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """At start-up: the pinned models first, then the others while they fit (nothing is
        evicted). A pinned model that does not fit or fails is listed in `failures`."""
        await prepare_backend(self.settings)
        records = [r for r in self.models.list() if self.settings.model_settings(r.name).enabled]
        for record in sorted(records, key=lambda r: not self.pinned(r.name)):
            try:
                await self._load(record.name, actor=None, evict=False)
            except ModelDoesNotFit as exc:
                if self.pinned(record.name):
                    self.failures[record.name] = exc.message
                    log.error("pinned model %s not loaded: %s", record.name, exc.message)
                else:
                    log.info("model %s not loaded at start (it loads on demand): %s", record.name, exc.message)
            except EngineUnavailable as exc:
                log.error("model %s not loaded: %s", record.name, exc)

    async def acquire(self, name: str) -> Engine:
        """The engine of `name`, loaded now if it is not resident (the catalog's `load`).
        Raises `ModelNotFound`, `ModelDoesNotFit` or `EngineUnavailable`."""
        engine = self.get(name)
        if engine is not None:
            return engine
        if not self.settings.model_settings(name).enabled:
            raise EngineUnavailable(f"the model {name} is disabled ([[models]] enabled = false)")
        if name in self._broken:  # not retried on every request: each try hashes the whole file
            raise EngineUnavailable(
                f"the model {name} could not be loaded: {self.failures.get(name)} (retry: appliance models load {name})"
            )
        return (await self._shared_load(name, POOL_ACTOR)).engine

    async def load(self, name: str, *, actor: Actor) -> Loaded:
        """An admin's load (idempotent; audited). Raises as `acquire`, and `Conflict` for a
        model disabled in the config or a pool that loads nothing."""
        self._known(name)
        engine = self.get(name)
        if engine is not None:
            await self._record(actor, "models.load", name, loaded=True, before=True)
            return Loaded(engine)
        if not self.on_demand:
            raise Conflict("this server serves a fixed set of engines and loads no model")
        if not self.settings.model_settings(name).enabled:
            raise Conflict(f"the model {name} is disabled in the config ([[models]] enabled = false)")
        self._broken.discard(name)  # an admin's load tries again
        return await self._shared_load(name, actor)

    async def _shared_load(self, name: str, actor: Actor) -> Loaded:
        task = self._loading.get(name)
        if task is None:
            task = asyncio.create_task(self._load(name, actor=actor), name=f"load {name}")
            self._loading[name] = task
            task.add_done_callback(functools.partial(self._loaded, name))
        return await asyncio.shield(task)  # a request that gives up does not cancel the others' load

    def _loaded(self, name: str, task: asyncio.Task[Loaded]) -> None:
        self._loading.pop(name, None)
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have given up

    async def _load(self, name: str, *, actor: Actor | None, evict: bool = True) -> Loaded:
        record = self.models.find(name)
        if record is None:
            raise ModelNotFound(f"There is no model named '{name}'.", param="name")
        if name in self._estimates:  # refuse what cannot fit before hashing its file again
            self._victims(name, self._estimates[name], await self.measure(), evict=evict)
        try:
            gpus = await asyncio.to_thread(self.budget.gpus)
            plan = await asyncio.to_thread(plan_load, self.settings, record, gpus)
            self._estimates[name] = plan.need
            async with self._room:
                evicted = await self._make_room(name, plan.need, evict=evict)
                self._reserved[name] = plan.need
            try:
                started = await asyncio.to_thread(start_engine, self.settings, plan)
            finally:
                self._reserved.pop(name, None)
        except RuntimeFault as exc:
            self.failures[name] = str(exc)
            self._broken.add(name)
            raise EngineUnavailable(f"the model {name} could not be loaded: {exc}") from exc
        if self._closed:
            await started.engine.close()
            raise EngineUnavailable("the server is shutting down")
        self.add(started.engine, need=started.need)
        self.failures.pop(name, None)
        self._broken.discard(name)
        log.info("model %s loaded (%d MB)%s", name, mb(started.need.total_bytes), f"; evicted {', '.join(evicted)}" if evicted else "")
        await self._record(actor, "models.load", name, loaded=True, before=False, memory_bytes=started.need.total_bytes, evicted=evicted)
        return Loaded(started.engine, evicted)

    async def _make_room(self, name: str, need: Need, *, evict: bool) -> list[str]:
        """Evict the fewest idle unpinned models, least recently used first, that let `need`
        fit; none when it fits already. Raises `ModelDoesNotFit` when even all would not do."""
        victims = self._victims(name, need, await self.measure(), evict=evict)
        for victim in victims:
            await self._unload(victim, POOL_ACTOR, reason=f"evicted to make room for {name}")
        return victims

    def _victims(self, name: str, need: Need, budget: Budget, *, evict: bool) -> list[str]:
        if budget.fits(need):
            return []
        victims: list[str] = []
        freed = Need()
        for victim in self._evictable() if evict else []:
            victims.append(victim)
            freed += self._resident[victim].need
            if budget.fits(need, freed=freed):
                return victims
        raise ModelDoesNotFit(self._refusal(name, need, budget, victims, freed))

    def _refusal(self, name: str, need: Need, budget: Budget, evictable: list[str], freed: Need) -> str:
        ram, vram = budget.ram, budget.vram
        wants = f"{mb(need.ram_bytes)} MB of RAM" + (f" and {mb(need.vram_bytes)} MB of VRAM" if need.vram_bytes else "")
        free = f"{mb(ram.free_bytes)} MB of RAM is free (budget {mb(ram.total_bytes)} MB, models use {mb(ram.used_bytes)} MB)"
        if need.vram_bytes:
            free += f" and {mb(vram.free_bytes)} MB of VRAM"
        if evictable:
            room = f"evicting every idle unpinned model ({', '.join(evictable)}) would free only {mb(freed.total_bytes)} MB"
        else:
            room = "no idle unpinned model can be evicted"
        others = [n for n in self._resident if n != name]
        held = [f"{n} ({'pinned' if self.pinned(n) else 'in use'})" for n in others if n not in evictable]
        return (
            f"Loading the model {name} needs {wants} (weights, KV cache and {mb(OVERHEAD_BYTES)} MB overhead), but only "
            f"{free}; {room}" + (f"; kept: {', '.join(held)}" if held else "") + ". Unload or unpin a model, or raise "
            "[runtime] memory_budget_mb."
        )

    # -- unloading -------------------------------------------------------------------------------
    async def unload(self, name: str, *, actor: Actor) -> None:
        """An admin's unload (idempotent; audited). `Conflict` for a pinned model, one being
        loaded, or one with requests running or queued."""
        self._known(name)
        if name in self._loading:
            raise Conflict(f"The model {name} is being loaded; unload it once it is.")
        if name not in self:
            await self._record(actor, "models.unload", name, loaded=False, before=False)
            return
        if not self._reloadable(name):
            raise Conflict(f"The engine {name} cannot be loaded again once unloaded, so it is not unloaded.")
        if self.pinned(name):
            raise Conflict(f"The model {name} is pinned: unpin it first (appliance models unpin {name}).")
        busy = self._busy(name)
        if busy:
            raise Conflict(f"The model {name} has {busy} request(s) running or queued; unload it once they finish.")
        await self._unload(name, actor, reason="unloaded by an admin")

    async def _unload(self, name: str, actor: Actor, *, reason: str) -> None:
        resident = self._resident.get(name)
        engine = self.remove(name)
        if engine is None:
            return
        await engine.close()
        log.info("model %s unloaded: %s", name, reason)
        freed = resident.need.total_bytes if resident else 0
        await self._record(actor, "models.unload", name, loaded=False, before=True, reason=reason, memory_bytes=freed)

    async def reload(self, name: str, *, reason: str) -> Loaded:
        """Unload `name` (when resident) and load it again, as the pool's own act (system
        records "model.unloaded" and "model.loaded"): auto-recovery. Raises what `load` raises,
        and `Conflict` while it is being loaded."""
        self._known(name)
        if name in self._loading:
            raise Conflict(f"The model {name} is being loaded.")
        await self._unload(name, POOL_ACTOR, reason=reason)
        return await self.load(name, actor=POOL_ACTOR)

    async def unload_idle(self) -> list[str]:
        """Unload every unpinned model idle for longer than its `idle_unload_seconds`."""
        now = time.monotonic()
        done = []
        for name in self._evictable():
            ttl = self.idle_unload_seconds(name)
            if ttl and now - self._resident[name].last_used >= ttl:
                await self._unload(name, POOL_ACTOR, reason=f"idle for {ttl:g}s")
                done.append(name)
        return done

    def sweep_seconds(self) -> float:
        """How often `run_idle_unloads` looks: a quarter of the shortest idle time, 0.25 to 30 s."""
        ttls = [self.settings.runtime.idle_unload_seconds, *(m.idle_unload_seconds or 0 for m in self.settings.models)]
        shortest = min((t for t in ttls if t > 0), default=120.0)
        return min(30.0, max(0.25, shortest / 4))

    async def run_idle_unloads(self) -> None:
        """The periodic task of the app's lifespan."""
        while True:
            await asyncio.sleep(self.sweep_seconds())
            if not self.on_demand:
                continue
            try:
                await self.unload_idle()
            except Exception:
                log.exception("idle model unload failed")

    # -- pins ------------------------------------------------------------------------------------
    async def pin(self, name: str, pinned: bool, *, actor: Actor) -> None:
        """Pin or unpin `name` (kept across restarts; audited). Pinning does not load it."""
        self._known(name)
        await asyncio.to_thread(self.pins.set, name, pinned, default=default_model(self.models), actor=actor)

    # -- audit -----------------------------------------------------------------------------------
    async def _record(self, actor: Actor | None, action: str, name: str, *, loaded: bool, before: bool, **extra: Any) -> None:
        """An admin's load or unload: an admin record, and the admin learns when it cannot be
        written. The pool's own (`POOL_ACTOR`): a system record ("model.loaded", "model.unloaded"),
        logged when it cannot be written. At start-up (`actor` None): none."""
        if actor is None:
            return
        if actor is POOL_ACTOR:
            event = "model.loaded" if loaded else "model.unloaded"
            fn = self.audit.append_fn("system", {"event": event, "model": name, **extra}, key_id=None, team_id=None)
        else:
            fn = self.audit.admin_fn(actor, action, name, before={"loaded": before}, after={"loaded": loaded, **extra})
        try:
            await self.audit.store.write(fn)
        except StoreError as exc:
            if actor is POOL_ACTOR:
                log.error("the audit record of %s %s could not be written: %s", action, name, exc.message)
                return
            raise AuditUnavailable(f"the model was changed but its audit record could not be written: {exc.message}") from exc
