"""Loading plugins and calling their hooks, with containment.

pluggy validates what a plugin implements against `appliance.hookspecs`, but it is not used
to call them: it calls hooks synchronously, stops at the first implementation that raises,
and `load_setuptools_entrypoints` raises on one bad import. Here each entry point is loaded
on its own (an import error refuses that plugin only), and each hook implementation is
called by the manager, in its plugin's own thread pool, with a time limit. A plugin that
raises or runs over is failed: reported, audited, and no longer called. If it fails closed
(the default for `prepare_request` and `check_response`), requests it would have judged are
refused until an admin re-enables it; if it fails open, they go on without it. Observers
(`on_usage`, `on_audit_event`) are handed their values after commit and run off the request
path, so a slow one slows nothing but itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import importlib.metadata
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pluggy

from appliance import hookspecs
from appliance.hookspecs import ACCEPT, AdminRoute, Check, PrincipalView, Rejection, RequestView, ResponseView, Verdict

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "appliance.plugins"
GUARDRAIL_HOOKS = ("prepare_request", "check_response")
OBSERVER_HOOKS = ("on_usage", "on_audit_event")
HOST_KEYS = ("enabled", "fail", "timeout_seconds", "workers")
_OBSERVER_BACKLOG = 1000  # values waiting for one plugin's observer before newer ones are dropped
_BUILT_IN_DIST = "appliance"

Notify = Callable[[str, dict[str, Any]], None]  # (action, details) -> an audit event


class PluginError(Exception):
    """A plugin cannot be loaded (bad import, wrong hookspec version, refused configuration)."""


@dataclass(slots=True)
class Plugin:
    """One plugin as the host keeps it."""

    name: str
    version: str
    source: str  # "built-in", or the distribution it came from
    module: Any = None
    hooks: list[str] = field(default_factory=list)
    enabled: bool = True
    status: str = "active"  # active | disabled | failed | refused
    last_error: str | None = None
    fail: str | None = None  # "open" | "closed" | None: the hook's default
    timeout_seconds: float = 2.0
    streaming: bool | None = False  # check_response on streams: False blocking, True streaming, None cannot
    dropped: int = 0  # observer values dropped because the plugin could not keep up
    pending: int = 0
    pool: concurrent.futures.ThreadPoolExecutor | None = None

    def fails_closed(self, hook: str) -> bool:
        return self.fail == "closed" if self.fail else hook in GUARDRAIL_HOOKS

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "source": self.source,
            "hooks": self.hooks,
            "enabled": self.enabled,
            "status": self.status,
            "last_error": self.last_error,
            "fail": self.fail or "default",
            "timeout_seconds": self.timeout_seconds,
            "observer_values_dropped": self.dropped,
        }


class GuardrailUnavailable(Exception):
    """A plugin that fails closed has failed: requests it would judge are refused (503)."""

    def __init__(self, plugin: str) -> None:
        super().__init__(f"The '{plugin}' guardrail is unavailable, and requests it would check are refused until it works again.")
        self.plugin = plugin


@dataclass(frozen=True, slots=True)
class CheckOutcome:
    """What the guardrails decided on a response: the verdict, and per plugin what happened
    (for the audit record)."""

    verdict: Verdict
    outcomes: dict[str, str]


class PluginManager:
    def __init__(
        self,
        config: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        only: Iterable[str] | None = None,
        entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
    ) -> None:
        """`config`: the `[plugins]` tables by plugin name. `only`: load just these (the
        `APPLIANCE_PLUGINS` variable, for debugging). `entry_points`: default, the installed
        `appliance.plugins` group."""
        self._config = {k: dict(v) for k, v in (config or {}).items()}
        self._only = set(only) if only is not None else None
        self._entry_points = entry_points
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs.Specs)
        self.plugins: dict[str, Plugin] = {}
        self.checks: dict[str, tuple[str, Check]] = {}
        self.alert_channels: dict[str, tuple[str, Callable[[Mapping[str, Any]], None]]] = {}
        self.admin_routes: dict[tuple[str, str, str], AdminRoute] = {}
        self._notify: Notify = lambda action, details: None
        self._early: list[tuple[str, dict[str, Any]]] = []  # events before an audit log exists
        self._lock = threading.Lock()

    # -- loading ----------------------------------------------------------------------------
    def load(self) -> PluginManager:
        points = self._entry_points
        if points is None:
            points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        for point in sorted(points, key=lambda p: p.name):
            if self._only is not None and point.name not in self._only:
                continue
            self._load_one(point)
        return self

    def _load_one(self, point: importlib.metadata.EntryPoint) -> None:
        dist = getattr(point, "dist", None)
        dist_name = dist.metadata["Name"] if dist is not None else ""
        source = "built-in" if dist_name == _BUILT_IN_DIST else (dist_name or point.value)
        config = self._config.get(point.name, {})
        plugin = Plugin(name=point.name, version=dist.version if dist is not None else "", source=source)
        plugin.enabled = bool(config.get("enabled", True))
        plugin.fail = config.get("fail")
        plugin.timeout_seconds = float(config.get("timeout_seconds", 2.0))
        self.plugins[point.name] = plugin
        if plugin.fail not in (None, "open", "closed"):
            self._refuse(plugin, f"[plugins.{point.name}] fail must be \"open\" or \"closed\", got {plugin.fail!r}")
            return
        if not plugin.enabled:
            plugin.status = "disabled"
            return
        try:
            module = point.load()
        except BaseException as exc:  # an import error, a SystemExit at import: that plugin only
            self._refuse(plugin, f"import failed: {type(exc).__name__}: {exc}")
            return
        try:
            _check_version(module)
            self._pm.register(module, name=point.name)
        except (PluginError, pluggy.PluginValidationError, ValueError) as exc:
            self._refuse(plugin, str(exc))
            return
        plugin.module = module
        plugin.hooks = sorted(impl for impl in _hook_names(self._pm, point.name))
        plugin.streaming = getattr(module, "STREAMING", False)
        plugin.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=int(config.get("workers", 4)), thread_name_prefix=f"plugin-{point.name}"
        )
        own = {k: v for k, v in config.items() if k not in HOST_KEYS}
        try:
            self._call_sync(plugin, "configure", own)
            self._collect_registrations(plugin)
        except Exception as exc:  # noqa: BLE001 - a plugin's refusal or bug, reported
            self._pm.unregister(name=point.name)
            self._refuse(plugin, f"configuration refused: {exc}")

    def _refuse(self, plugin: Plugin, reason: str) -> None:
        plugin.status, plugin.last_error = "refused", reason
        log.error("plugin %s not loaded: %s", plugin.name, reason)
        self._event("plugin.refused", {"plugin": plugin.name, "reason": reason})

    def _collect_registrations(self, plugin: Plugin) -> None:
        def add_check(check: Check) -> None:
            if not isinstance(check, Check) or not callable(check.run):
                raise TypeError(f"{plugin.name} registered {check!r}, not a Check")
            if check.name in self.checks:
                raise ValueError(f"check {check.name!r} is already registered by {self.checks[check.name][0]}")
            self.checks[check.name] = (plugin.name, check)

        def add_channel(name: str, send: Callable[[Mapping[str, Any]], None]) -> None:
            if not isinstance(name, str) or not name or not callable(send):
                raise TypeError(f"{plugin.name} registered an alert channel without a name or a callable")
            if name in self.alert_channels:
                raise ValueError(f"alert channel {name!r} is already registered by {self.alert_channels[name][0]}")
            self.alert_channels[name] = (plugin.name, send)

        def add_route(route: AdminRoute) -> None:
            if not isinstance(route, AdminRoute) or not callable(route.handler):
                raise TypeError(f"{plugin.name} registered {route!r}, not an AdminRoute")
            path = route.path.strip("/")
            if not path or any(not part.replace("-", "").replace("_", "").isalnum() for part in path.split("/")):
                raise ValueError(f"admin route path {route.path!r} must be words separated by slashes")
            key = (plugin.name, route.method, path)
            if key in self.admin_routes:
                raise ValueError(f"{route.method} {route.path} is already registered by {plugin.name}")
            self.admin_routes[key] = route

        for hook, register in (("register_checks", add_check), ("register_alert_channels", add_channel),
                               ("register_admin_routes", add_route)):
            self._call_sync(plugin, hook, register)

    # -- state ------------------------------------------------------------------------------
    def attach(self, notify: Notify) -> None:
        """Route plugin events (failures, refusals) to the audit log from now on."""
        self._notify = notify
        for action, details in self._early:
            notify(action, details)
        self._early.clear()

    def _event(self, action: str, details: dict[str, Any]) -> None:
        if self._notify is None:
            return
        try:
            self._notify(action, details)
        except Exception:  # the audit log refused: the failure is logged already
            log.exception("could not record plugin event %s", action)

    def states(self) -> list[dict[str, Any]]:
        return [p.to_dict() for p in self.plugins.values()]

    def enable(self, name: str) -> Plugin:
        """Clear a failure (or turn a disabled plugin on, if it was loaded)."""
        plugin = self._get(name)
        if plugin.module is None:
            raise PluginError(f"plugin {name!r} is {plugin.status}: {plugin.last_error or 'not loaded'}; restart to load it")
        plugin.enabled, plugin.status, plugin.last_error = True, "active", None
        return plugin

    def disable(self, name: str) -> Plugin:
        plugin = self._get(name)
        plugin.enabled, plugin.status = False, "disabled"
        return plugin

    def _get(self, name: str) -> Plugin:
        try:
            return self.plugins[name]
        except KeyError:
            raise PluginError(f"no plugin named {name!r}") from None

    def _implementing(self, hook: str) -> list[tuple[Plugin, Callable[..., Any]]]:
        found = []
        for impl in getattr(self._pm.hook, hook).get_hookimpls():
            plugin = self.plugins.get(impl.plugin_name)
            if plugin is not None and plugin.status in ("active", "failed") and plugin.enabled:
                found.append((plugin, impl.function))
        return found

    def active(self, hook: str) -> bool:
        """Whether any plugin implements `hook` (the request path skips the rest if none does)."""
        return bool(self._implementing(hook))

    # -- calling ----------------------------------------------------------------------------
    def _call_sync(self, plugin: Plugin, hook: str, *args: Any) -> list[Any]:
        """At load, on the loading thread: the plugin's own implementation of `hook`, if any."""
        results = []
        for impl in getattr(self._pm.hook, hook).get_hookimpls():
            if impl.plugin_name == plugin.name:
                results.append(impl.function(*args))
        return results

    async def _call(self, plugin: Plugin, hook: str, fn: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
        """(ok, result) of one implementation, in the plugin's pool, within its time limit."""
        assert plugin.pool is not None
        started = time.perf_counter()
        try:
            future = plugin.pool.submit(fn, *args)
            return True, await asyncio.wait_for(asyncio.wrap_future(future), plugin.timeout_seconds)
        except TimeoutError:
            self._failed(plugin, hook, f"timed out after {time.perf_counter() - started:.1f}s (limit {plugin.timeout_seconds:g}s)")
        except Exception as exc:  # noqa: BLE001 - any bug in a plugin is that plugin's failure
            self._failed(plugin, hook, f"{type(exc).__name__}: {exc}")
        return False, None

    def _failed(self, plugin: Plugin, hook: str, reason: str) -> None:
        plugin.status, plugin.last_error = "failed", f"{hook}: {reason}"
        log.error("plugin %s failed in %s: %s", plugin.name, hook, reason)
        self._event("plugin.failed", {"plugin": plugin.name, "hook": hook, "reason": reason,
                                      "fails": "closed" if plugin.fails_closed(hook) else "open"})

    def _usable(self, plugin: Plugin, hook: str) -> bool:
        """Whether to call `plugin` now; raises `GuardrailUnavailable` for a failed one that fails closed."""
        if plugin.status != "failed":
            return True
        if plugin.fails_closed(hook):
            raise GuardrailUnavailable(plugin.name)
        return False

    async def prepare(self, request: RequestView, principal: PrincipalView) -> Rejection | None:
        """Run every `prepare_request`, in order; the first `Rejection` stops the request."""
        for plugin, fn in self._implementing("prepare_request"):
            if not self._usable(plugin, "prepare_request"):
                continue
            ok, result = await self._call(plugin, "prepare_request", fn, request, principal)
            if not ok:
                self._usable(plugin, "prepare_request")  # raises if it fails closed
                continue
            if isinstance(result, Rejection):
                request.notes.setdefault("rejected_by", f"{plugin.name}:{result.rule}")
                return result
        return None

    async def choose(self, request: RequestView, principal: PrincipalView, candidates: list[hookspecs.Candidate]) -> list[str] | None:
        for plugin, fn in self._implementing("choose_route"):
            if not self._usable(plugin, "choose_route"):
                continue
            ok, result = await self._call(plugin, "choose_route", fn, request, principal, candidates)
            if ok and result is not None:
                return [str(name) for name in result]
        return None

    def guardrails_for(self, *, streaming: bool) -> tuple[list[str], list[str], list[str]]:
        """Names of the `check_response` plugins that (block, stream along, cannot run)."""
        blocking, along, unable = [], [], []
        for plugin, _ in self._implementing("check_response"):
            if not streaming or plugin.streaming is False:
                blocking.append(plugin.name)
            elif plugin.streaming:
                along.append(plugin.name)
            else:
                unable.append(plugin.name)
        return blocking, along, unable

    async def check(self, request: RequestView, response: ResponseView, *, only: Iterable[str] | None = None) -> CheckOutcome:
        """Run the `check_response` plugins (`only` those named); the first verdict other than
        accept decides. An accepted `text` replaces the answer for the plugins after it."""
        wanted = set(only) if only is not None else None
        outcomes: dict[str, str] = {}
        verdict = ACCEPT
        for plugin, fn in self._implementing("check_response"):
            if wanted is not None and plugin.name not in wanted:
                continue
            if not self._usable(plugin, "check_response"):
                outcomes[plugin.name] = f"skipped: failed earlier ({plugin.last_error})"
                continue
            ok, result = await self._call(plugin, "check_response", fn, request, response)
            if not ok:
                self._usable(plugin, "check_response")
                outcomes[plugin.name] = f"skipped: {plugin.last_error}"
                continue
            if result is None or not isinstance(result, Verdict):
                outcomes[plugin.name] = "passed"
                continue
            outcomes[plugin.name] = "passed" if result.action == "accept" else f"{result.action}: {result.rule}"
            if result.action == "accept":
                if result.text is not None:
                    response.text = result.text
                    verdict = Verdict("accept", result.rule, result.text)
                continue
            return CheckOutcome(result, outcomes)
        return CheckOutcome(verdict, outcomes)

    def observe(self, hook: str, value: Mapping[str, Any]) -> None:
        """Hand a committed record to the observers; never waits (a full backlog drops it)."""
        for plugin, fn in self._implementing(hook):
            if plugin.status != "active" or plugin.pool is None:
                continue
            with self._lock:
                if plugin.pending >= _OBSERVER_BACKLOG:
                    plugin.dropped += 1
                    continue
                plugin.pending += 1
            plugin.pool.submit(self._observe_one, plugin, hook, fn, dict(value))

    def _observe_one(self, plugin: Plugin, hook: str, fn: Callable[..., Any], value: dict[str, Any]) -> None:
        started = time.perf_counter()
        try:
            fn(value)
            elapsed = time.perf_counter() - started
            if elapsed > plugin.timeout_seconds:
                self._failed(plugin, hook, f"took {elapsed:.1f}s (limit {plugin.timeout_seconds:g}s)")
        except Exception as exc:  # noqa: BLE001
            self._failed(plugin, hook, f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                plugin.pending -= 1

    async def broadcast(self, hook: str, *args: Any) -> None:
        """`startup` or `shutdown` to every plugin; failures are reported, never raised."""
        for plugin, fn in self._implementing(hook):
            await self._call(plugin, hook, fn, *args)

    def close(self) -> None:
        for plugin in self.plugins.values():
            if plugin.pool is not None:
                plugin.pool.shutdown(wait=False, cancel_futures=True)


def _check_version(module: Any) -> None:
    declared = getattr(module, "APPLIANCE_HOOKSPEC", None)
    if declared is None:
        raise PluginError(f"declares no APPLIANCE_HOOKSPEC (this appliance has hookspec {hookspecs.HOOKSPEC_VERSION})")
    major = str(declared).split(".", 1)[0]
    if major != hookspecs.HOOKSPEC_VERSION.split(".", 1)[0]:
        raise PluginError(
            f"written for hookspec {declared}, but this appliance has hookspec {hookspecs.HOOKSPEC_VERSION}: "
            "a different major version is incompatible; update the plugin"
        )


def _hook_names(pm: pluggy.PluginManager, name: str) -> list[str]:
    plugin = pm.get_plugin(name)
    return [caller.name for caller in pm.get_hookcallers(plugin) or []]
