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
import importlib.metadata
import json
import logging
import sys
import threading
import time
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pluggy

from appliance import hookspecs
from appliance.errors import Conflict, GuardrailUnavailable, InvalidRequest, NotFound, ServiceUnavailable
from appliance.hookspecs import (
    ACCEPT,
    AdminRoute,
    Candidate,
    Check,
    PrincipalView,
    Rejection,
    RequestView,
    ResponseView,
    Verdict,
)
from appliance.redaction import redact

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "appliance.plugins"
GUARDRAIL_HOOKS = ("prepare_request", "check_response")
OBSERVER_HOOKS = ("on_usage", "on_audit_event")
HOST_KEYS = ("enabled", "fail", "timeout_seconds", "workers", "order")
_OBSERVER_BACKLOG = 1000  # values waiting for one plugin's observer before newer ones are dropped
_BUILT_IN_DIST = "appliance"
_REASON_CHARS = 500
_NOTES_BYTES = 8192

Notify = Callable[[str, dict[str, Any]], None]  # (event, details) -> a system audit record


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
    order: int = 100
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
            "order": self.order,
            "streaming": {False: "blocking", True: "along", None: "cannot"}[self.streaming],
            "observer_values_dropped": self.dropped,
        }


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
        self._notify: Notify | None = None
        self._early: list[tuple[str, dict[str, Any]]] = []  # events before an audit log is attached
        self._lock = threading.Lock()
        self._impls: dict[str, list[tuple[Plugin, Callable[..., Any]]]] = {}  # by hook, cleared on any state change

    # -- loading ----------------------------------------------------------------------------
    def load(self) -> PluginManager:
        points = self._entry_points
        if points is None:
            points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        unique: dict[str, importlib.metadata.EntryPoint] = {}
        for point in points:
            if point.name in unique:
                self._refuse(
                    Plugin(point.name, "", point.value),
                    f"two plugins are named {point.name!r} ({unique[point.name].value} and {point.value}); only the first is loaded",
                    keep=False,
                )
                continue
            unique[point.name] = point
        for name in sorted(unique):
            if self._only is not None and name not in self._only:
                self._skip(unique[name])
                continue
            self._load_one(unique[name])
        unknown = sorted(set(self._config) - set(unique))
        for name in unknown:
            log.warning("[plugins.%s] is configured, but no plugin of that name is installed", name)
        self._impls.clear()
        return self

    def register_builtin(self, name: str, obj: object, version: str) -> Plugin:
        """The appliance's own checks and alert channels, registered through the same hooks
        as a plugin's (validated and listed alike). Raises `PluginError` when they are refused."""
        if name in self.plugins:
            raise PluginError(f"a plugin named {name!r} is already loaded")
        plugin = Plugin(name=name, version=version, source="built-in", timeout_seconds=30.0)
        self._pm.register(obj, name=name)
        plugin.module = obj
        plugin.hooks = sorted(_hook_names(self._pm, name))
        plugin.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"plugin-{name}")
        self.plugins[name] = plugin
        try:
            self._collect_registrations(plugin)
        except Exception as exc:
            self._pm.unregister(name=name)
            del self.plugins[name]
            plugin.pool.shutdown(wait=False)
            raise PluginError(f"{name}: {exc}") from exc
        self._impls.clear()
        return plugin

    def _skip(self, point: importlib.metadata.EntryPoint) -> None:
        plugin = self._new(point)
        plugin.enabled, plugin.status = False, "disabled"
        plugin.last_error = f"not loaded: APPLIANCE_PLUGINS names only {', '.join(sorted(self._only or ())) or 'none'}"

    def _new(self, point: importlib.metadata.EntryPoint) -> Plugin:
        dist = getattr(point, "dist", None)
        dist_name = dist.metadata["Name"] if dist is not None else ""
        source = "built-in" if dist_name == _BUILT_IN_DIST else (dist_name or point.value)
        plugin = Plugin(name=point.name, version=dist.version if dist is not None else "", source=source)
        self.plugins[point.name] = plugin
        return plugin

    def _load_one(self, point: importlib.metadata.EntryPoint) -> None:
        config = self._config.get(point.name, {})
        plugin = self._new(point)
        try:
            plugin.enabled = _flag(config.get("enabled", True), "enabled")
            fail = config.get("fail")
            if fail not in (None, "open", "closed"):
                raise ValueError(f'fail must be "open" or "closed", got {fail!r}')
            plugin.fail = fail
            plugin.timeout_seconds = _positive(config.get("timeout_seconds", 2.0), "timeout_seconds")
            workers = int(_positive(config.get("workers", 4), "workers"))
            plugin.order = int(config.get("order", 100))
        except (TypeError, ValueError) as exc:
            self._refuse(plugin, f"[plugins.{point.name}] {exc}")
            return
        if not plugin.enabled:
            plugin.status = "disabled"
            return
        try:
            module = point.load()
        except BaseException as exc:  # noqa: BLE001 - an import error, a SystemExit at import: that plugin only
            if isinstance(exc, KeyboardInterrupt):
                raise
            self._refuse(plugin, f"import failed: {type(exc).__name__}: {exc}")
            return
        try:
            _check_version(module)
            self._pm.register(module, name=point.name)
        except (PluginError, pluggy.PluginValidationError, ValueError) as exc:
            self._refuse(plugin, str(exc))
            return
        unknown = sorted(c.name for c in self._pm.get_hookcallers(module) or [] if c.spec is None)
        if unknown:  # pluggy accepts these silently: a typo would never be called
            self._pm.unregister(name=point.name)
            self._refuse(plugin, f"implements {', '.join(unknown)}, which hookspec {hookspecs.HOOKSPEC_VERSION} does not have")
            return
        plugin.module = module
        plugin.hooks = sorted(_hook_names(self._pm, point.name))
        plugin.pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"plugin-{point.name}")
        own = {k: v for k, v in config.items() if k not in HOST_KEYS}
        try:
            self._call_at_load(plugin, "configure", own)
            off = set(getattr(module, "disabled_hooks", ()) or ())
            plugin.hooks = [h for h in plugin.hooks if h not in off]
            plugin.streaming = getattr(module, "STREAMING", False)  # after configure, which may set it
            if plugin.streaming not in (True, False, None):
                raise ValueError(f"STREAMING must be True, False or None, got {plugin.streaming!r}")
            self._collect_registrations(plugin)
        except Exception as exc:  # noqa: BLE001 - a plugin's refusal or bug, reported
            self._pm.unregister(name=point.name)
            plugin.module = None
            plugin.pool.shutdown(wait=False, cancel_futures=True)
            plugin.pool = None
            self._refuse(plugin, f"configuration refused: {type(exc).__name__}: {exc}")

    def _refuse(self, plugin: Plugin, reason: str, *, keep: bool = True) -> None:
        reason = _safe_reason(reason)
        plugin.status, plugin.last_error = "refused", reason
        if keep:
            self.plugins[plugin.name] = plugin
        log.error("plugin %s not loaded: %s", plugin.name, reason)
        self._event("plugin.refused", {"plugin": plugin.name, "reason": reason})

    def _collect_registrations(self, plugin: Plugin) -> None:
        checks: dict[str, tuple[str, Check]] = {}
        channels: dict[str, tuple[str, Callable[[Mapping[str, Any]], None]]] = {}
        routes: dict[tuple[str, str, str], AdminRoute] = {}

        def add_check(check: Check) -> None:
            if not isinstance(check, Check) or not callable(check.run):
                raise TypeError(f"register_checks was handed {check!r}, not a Check")
            if check.name in self.checks or check.name in checks:
                raise ValueError(f"check {check.name!r} is already registered")
            checks[check.name] = (plugin.name, check)

        def add_channel(name: str, send: Callable[[Mapping[str, Any]], None]) -> None:
            if not isinstance(name, str) or not name or not callable(send):
                raise TypeError("register_alert_channels needs a name and a callable")
            if name in self.alert_channels or name in channels:
                raise ValueError(f"alert channel {name!r} is already registered")
            channels[name] = (plugin.name, send)

        def add_route(route: AdminRoute) -> None:
            if not isinstance(route, AdminRoute) or not callable(route.handler) or route.method not in ("GET", "POST"):
                raise TypeError(f"register_admin_routes was handed {route!r}, not a GET or POST AdminRoute")
            path = route.path.strip("/")
            if not path or any(not part.replace("-", "").replace("_", "").isalnum() for part in path.split("/")):
                raise ValueError(f"admin route path {route.path!r} must be words separated by slashes")
            key = (plugin.name, route.method, path)
            if key in routes:
                raise ValueError(f"{route.method} {route.path} is registered twice")
            routes[key] = route

        for hook, register in (
            ("register_checks", add_check),
            ("register_alert_channels", add_channel),
            ("register_admin_routes", add_route),
        ):
            self._call_at_load(plugin, hook, register)
        # Only a plugin whose registrations were all valid contributes any of them.
        self.checks |= checks
        self.alert_channels |= channels
        self.admin_routes |= routes

    # -- state ------------------------------------------------------------------------------
    def attach(self, notify: Notify) -> None:
        """Send plugin events (failures, refusals) to `notify` from now on, starting with
        those of loading."""
        self._notify = notify
        early, self._early = self._early, []
        for event, details in early:
            self._event(event, details)

    def _event(self, event: str, details: dict[str, Any]) -> None:
        if self._notify is None:
            self._early.append((event, details))
            return
        try:
            self._notify(event, details)
        except Exception:  # noqa: BLE001 - the audit log refused: logged, never raised into a request
            log.exception("could not record plugin event %s", event)

    def states(self) -> list[dict[str, Any]]:
        return [self.state(p.name) for p in sorted(self.plugins.values(), key=lambda p: (p.order, p.name))]

    def state(self, name: str) -> dict[str, Any]:
        """A plugin's state, with the admin endpoints it contributed."""
        routes = sorted(f"{m} /admin/plugins/{n}/routes/{path}" for n, m, path in self.admin_routes if n == name)
        return self.get(name).to_dict() | {
            "admin_routes": routes,
            "checks": sorted(c for c, (owner, _) in self.checks.items() if owner == name),
            "alert_channels": sorted(c for c, (owner, _) in self.alert_channels.items() if owner == name),
        }

    def get(self, name: str) -> Plugin:
        try:
            return self.plugins[name]
        except KeyError:
            raise NotFound(f"There is no plugin named '{name}'.") from None

    def enable(self, name: str) -> Plugin:
        """Turn a loaded plugin on, clearing its failure."""
        plugin = self.get(name)
        if plugin.module is None:
            raise Conflict(
                f"The plugin '{name}' was not loaded ({plugin.status}: {plugin.last_error or 'disabled in the config'}); "
                "fix its configuration and restart the server to load it."
            )
        plugin.enabled, plugin.status, plugin.last_error = True, "active", None
        self._impls.clear()
        return plugin

    def disable(self, name: str) -> Plugin:
        """Stop calling a plugin until it is enabled again (or the server restarts)."""
        plugin = self.get(name)
        plugin.enabled = False
        if plugin.status != "refused":
            plugin.status = "disabled"
        self._impls.clear()
        return plugin

    def restore(self, name: str, enabled: bool, status: str, last_error: str | None) -> None:
        """Put a plugin back as it was (an admin change whose audit record failed)."""
        plugin = self.get(name)
        plugin.enabled, plugin.status, plugin.last_error = enabled, status, last_error
        self._impls.clear()

    def _implementing(self, hook: str) -> list[tuple[Plugin, Callable[..., Any]]]:
        """The enabled implementations of `hook`, active or failed, in plugin order."""
        found = self._impls.get(hook)
        if found is None:
            found = []
            for impl in getattr(self._pm.hook, hook).get_hookimpls():
                plugin = self.plugins.get(impl.plugin_name)
                if plugin is not None and plugin.enabled and plugin.status in ("active", "failed") and hook in plugin.hooks:
                    found.append((plugin, impl.function))
            found.sort(key=lambda pair: (pair[0].order, pair[0].name))
            self._impls[hook] = found
        return found

    def loaded_with(self, hook: str) -> bool:
        """Whether any loaded plugin implements `hook`, enabled or not (if none does, none
        ever will in this process)."""
        return any(p.module is not None and hook in p.hooks for p in self.plugins.values())

    def active(self, hook: str) -> bool:
        """Whether any plugin implements `hook` (the request path skips the rest if none does)."""
        return bool(self._implementing(hook))

    # -- calling ----------------------------------------------------------------------------
    def _call_at_load(self, plugin: Plugin, hook: str, *args: Any) -> None:
        """A load-time hook of one plugin, in its pool, within its time limit; raises on failure."""
        assert plugin.pool is not None
        for impl in getattr(self._pm.hook, hook).get_hookimpls():
            if impl.plugin_name == plugin.name:
                future = plugin.pool.submit(impl.function, *args)
                try:
                    future.result(timeout=plugin.timeout_seconds)
                except concurrent.futures.TimeoutError:
                    raise PluginError(f"{hook} took longer than {plugin.timeout_seconds:g}s") from None

    async def _call(self, plugin: Plugin, hook: str, fn: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
        """(ok, result) of one implementation, in the plugin's pool, within its time limit."""
        assert plugin.pool is not None
        started = time.perf_counter()
        try:
            future = plugin.pool.submit(fn, *args)
            return True, await asyncio.wait_for(asyncio.wrap_future(future), plugin.timeout_seconds)
        except TimeoutError:
            self._failed(plugin, hook, f"timed out after {time.perf_counter() - started:.1f}s (limit {plugin.timeout_seconds:g}s)")
        except RuntimeError as exc:
            if plugin.pool is None or "shutdown" not in str(exc):
                self._failed(plugin, hook, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # noqa: BLE001 - any bug in a plugin is that plugin's failure
            self._failed(plugin, hook, f"{type(exc).__name__}: {exc}")
        return False, None

    def _failed(self, plugin: Plugin, hook: str, reason: str) -> None:
        reason = _safe_reason(reason)
        with self._lock:
            first = plugin.status != "failed"
            plugin.status, plugin.last_error = "failed", f"{hook}: {reason}"
            self._impls.clear()
        log.error("plugin %s failed in %s: %s", plugin.name, hook, reason)
        if first:  # one record per failure, not one per request it then refuses
            fails = "closed" if plugin.fails_closed(hook) else "open"
            self._event("plugin.failed", {"plugin": plugin.name, "hook": hook, "reason": reason, "fails": fails})

    def _usable(self, plugin: Plugin, hook: str) -> bool:
        """Whether to call `plugin` now; raises `GuardrailUnavailable` for a failed one that fails closed."""
        if plugin.status != "failed":
            return True
        if plugin.fails_closed(hook):
            raise GuardrailUnavailable(plugin.name)
        return False

    async def prepare(self, request: RequestView, principal: PrincipalView) -> Rejection | None:
        """Run every `prepare_request`, in order; the first `Rejection` stops the request.
        Each plugin works on a copy, taken back only if it returned in time, well-formed."""
        for plugin, fn in self._implementing("prepare_request"):
            if not self._usable(plugin, "prepare_request"):
                continue
            work = _copy_request(request)
            ok, result = await self._call(plugin, "prepare_request", fn, work, principal)
            problem = _malformed(work, request) if ok else None
            if problem is not None:
                self._failed(plugin, "prepare_request", problem)
            if not ok or problem is not None:
                self._usable(plugin, "prepare_request")  # raises if it fails closed
                continue
            _adopt(request, work)
            if isinstance(result, Rejection):
                own = request.notes.get(plugin.name)
                request.notes[plugin.name] = (own if isinstance(own, dict) else {}) | {"rejected": str(result.rule)}
                return result
        return None

    async def choose(
        self, request: RequestView, principal: PrincipalView, candidates: list[Candidate]
    ) -> tuple[str, list[str]] | None:
        """The first plugin's choice of candidates (its name, and names best first), or None."""
        for plugin, fn in self._implementing("choose_route"):
            if not self._usable(plugin, "choose_route"):
                continue
            ok, result = await self._call(plugin, "choose_route", fn, request, principal, candidates)
            if ok and result is not None:
                if not isinstance(result, (list, tuple)):
                    self._failed(plugin, "choose_route", f"returned {type(result).__name__}, not a list of names")
                    self._usable(plugin, "choose_route")
                    continue
                return plugin.name, [str(name) for name in result]
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
                outcomes[plugin.name] = "not run: failed earlier, fails open"
                continue
            work = _copy_request(request)
            ok, result = await self._call(plugin, "check_response", fn, work, replace(response))
            if ok:
                request.notes, request.audit_text = work.notes, work.audit_text
            if not ok:
                self._usable(plugin, "check_response")
                outcomes[plugin.name] = "not run: failed, fails open"
                continue
            if result is None:
                outcomes[plugin.name] = "passed"
                continue
            if not isinstance(result, Verdict):
                self._failed(plugin, "check_response", f"returned {type(result).__name__}, not a Verdict or None")
                self._usable(plugin, "check_response")
                outcomes[plugin.name] = "not run: failed, fails open"
                continue
            if result.action == "accept":
                outcomes[plugin.name] = "passed" if result.text is None else f"rewrote: {result.rule or plugin.name}"
                if isinstance(result.text, str):
                    response.text = result.text
                    verdict = Verdict("accept", result.rule or plugin.name, result.text)
                continue
            outcomes[plugin.name] = f"{result.action}: {result.rule or plugin.name}"
            return CheckOutcome(Verdict(result.action, result.rule or plugin.name, result.text, result.feedback), outcomes)
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
            try:
                plugin.pool.submit(self._observe_one, plugin, hook, fn, dict(value))
            except RuntimeError:  # shutting down
                with self._lock:
                    plugin.pending -= 1

    def _observe_one(self, plugin: Plugin, hook: str, fn: Callable[..., Any], value: dict[str, Any]) -> None:
        started = time.perf_counter()
        try:
            if isinstance(value.get("body"), str):  # an audit record's canonical JSON, parsed off the writer
                value["body"] = json.loads(value["body"])
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
            if plugin.status == "active":
                await self._call(plugin, hook, fn, *args)

    async def call_admin_route(self, plugin_name: str, method: str, path: str, query: Mapping[str, str], body: Any) -> Mapping[str, Any]:
        """Serve a plugin's admin endpoint. A `ValueError` from the handler is the caller's
        400; anything else is reported (503), without disabling the plugin's hooks."""
        plugin = self.get(plugin_name)
        route = self.admin_routes.get((plugin_name, method, path.strip("/")))
        if route is None or plugin.status not in ("active", "failed") or not plugin.enabled or plugin.pool is None:
            raise NotFound(f"The plugin '{plugin_name}' serves no {method} /{path.strip('/')} (or it is not active).")
        future = plugin.pool.submit(route.handler, dict(query), body)
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(future), plugin.timeout_seconds)
        except ValueError as exc:
            raise InvalidRequest(_safe_reason(str(exc))) from None
        except TimeoutError:
            raise ServiceUnavailable(f"The plugin '{plugin_name}' did not answer within {plugin.timeout_seconds:g}s.") from None
        except Exception as exc:  # noqa: BLE001
            reason = _safe_reason(f"{type(exc).__name__}: {exc}")
            log.error("plugin %s admin route %s %s failed: %s", plugin_name, method, path, reason)
            self._event("plugin.admin_route_failed", {"plugin": plugin_name, "route": f"{method} {path}", "reason": reason})
            raise ServiceUnavailable(f"The plugin '{plugin_name}' failed to answer: {reason}") from None
        if not isinstance(result, Mapping):
            raise ServiceUnavailable(f"The plugin '{plugin_name}' answered with {type(result).__name__}, not a JSON object.")
        return plain_json(result, limit=1 << 20)

    def close(self) -> None:
        for plugin in self.plugins.values():
            if plugin.pool is not None:
                plugin.pool.shutdown(wait=False, cancel_futures=True)


def plain_json(value: Any, *, limit: int = _NOTES_BYTES) -> dict[str, Any]:
    """`value` as plain JSON (what a plugin hands the host may hold anything): unknown types
    become strings, non-finite numbers null; more than `limit` bytes is cut to a marker."""
    text = json.dumps(value, default=str, allow_nan=True, sort_keys=True)
    if len(text) > limit:
        return {"truncated": True, "bytes": len(text)}
    parsed = json.loads(text, parse_constant=lambda _: None)
    return parsed if isinstance(parsed, dict) else {"value": parsed}


def _safe_reason(reason: str) -> str:
    """A failure's text, fit for logs and the audit record: a plugin's exception message may
    quote the request it was judging, so personal data and keys are taken out."""
    reason = redact(reason)
    return reason if len(reason) <= _REASON_CHARS else reason[: _REASON_CHARS - 1] + "…"


_ROLES = frozenset({"system", "developer", "user", "assistant"})


def _copy_request(view: RequestView) -> RequestView:
    """A copy a plugin may change freely (and go on changing after a timeout)."""
    return replace(
        view,
        messages=[dict(m) for m in view.messages] if view.messages is not None else None,
        prompt=list(view.prompt) if view.prompt is not None else None,
        notes=dict(view.notes),
    )


def _adopt(view: RequestView, changed: RequestView) -> None:
    view.messages, view.prompt = changed.messages, changed.prompt
    view.notes, view.audit_text = changed.notes, changed.audit_text


def _malformed(changed: RequestView, before: RequestView) -> str | None:
    """Why what a plugin left in its copy cannot go to the model, or None."""
    if not isinstance(changed.notes, dict):
        return "replaced request.notes with something that is not a dict"
    if changed.audit_text is not None and not isinstance(changed.audit_text, str):
        return "set request.audit_text to something that is not a string"
    if before.messages is not None:
        messages = changed.messages
        if not isinstance(messages, list) or not messages:
            return "left request.messages empty or not a list"
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in _ROLES:
                return "left a message that is not a dict with a known role and string content"
        return None
    prompt = changed.prompt
    count = len(before.prompt or [])
    if not isinstance(prompt, list) or len(prompt) != count or not all(isinstance(p, str) for p in prompt):
        return f"left request.prompt other than a list of {count} strings"
    return None


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def _positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _check_version(module: Any) -> None:
    """A plugin (a module, or an object whose module declares it) must name a hookspec
    version with this appliance's major version."""
    declared = getattr(module, "APPLIANCE_HOOKSPEC", None)
    if declared is None and not isinstance(module, types.ModuleType):
        declared = getattr(sys.modules.get(type(module).__module__), "APPLIANCE_HOOKSPEC", None)
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
