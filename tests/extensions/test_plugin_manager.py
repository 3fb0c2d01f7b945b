"""The plugin manager's containment rules, on plugins defined here (the live-server tests use
a pip-installed one): order, copies, time limits, malformed results, registrations, backlog."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from appliance.errors import GuardrailUnavailable
from appliance.hookspecs import (
    AdminRoute,
    Candidate,
    Check,
    PrincipalView,
    Rejection,
    RequestView,
    ResponseView,
    Verdict,
    hookimpl,
)
from appliance.plugin_manager import PluginManager

PRINCIPAL = PrincipalView(key_id="k1", key_name="app", role="user", team="default")


class Point:
    """An entry point whose target is already in memory (or whose import fails)."""

    def __init__(self, name: str, target: Any) -> None:
        self.name, self.value, self.dist, self._target = name, f"{name}:plugin", None, target

    def load(self) -> Any:
        if isinstance(self._target, BaseException):
            raise self._target
        return self._target


class Appender:
    APPLIANCE_HOOKSPEC = "1.2"  # a later minor version of major 1 loads

    def __init__(self, word: str) -> None:
        self.word = word

    @hookimpl
    def prepare_request(self, request: RequestView, principal: PrincipalView) -> None:
        request.messages[-1]["content"] += " " + self.word  # type: ignore[index]


def _manager(points: list[Point], config: dict[str, dict[str, Any]] | None = None) -> tuple[PluginManager, list[tuple[str, dict[str, Any]]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    manager = PluginManager(config or {}, entry_points=points).load()  # type: ignore[arg-type]
    manager.attach(lambda event, details: events.append((event, details)))
    return manager, events


def _request(text: str = "hi") -> RequestView:
    return RequestView(kind="chat", model="m", messages=[{"role": "user", "content": text}])


def test_plugins_run_in_configured_order_then_by_name() -> None:
    manager, _ = _manager([Point("b", Appender("b")), Point("a", Appender("a")), Point("c", Appender("c"))],
                          {"c": {"order": 1}})
    request = _request()
    assert asyncio.run(manager.prepare(request, PRINCIPAL)) is None
    assert request.messages[0]["content"] == "hi c a b"  # type: ignore[index]
    assert [s["name"] for s in manager.states()] == ["c", "a", "b"]


def test_a_plugin_that_leaves_the_request_malformed_is_failed_and_its_change_dropped() -> None:
    class Breaker:
        APPLIANCE_HOOKSPEC = "1"

        @hookimpl
        def prepare_request(self, request: RequestView, principal: PrincipalView) -> None:
            request.messages = [{"role": "wizard", "content": 3}]  # type: ignore[list-item]

    closed, events = _manager([Point("breaker", Breaker())])
    with pytest.raises(GuardrailUnavailable):
        asyncio.run(closed.prepare(_request(), PRINCIPAL))
    assert "known role" in (closed.plugins["breaker"].last_error or "")
    assert [e for e, _ in events] == ["plugin.failed"]

    opened, _ = _manager([Point("breaker", Breaker()), Point("z", Appender("z"))], {"breaker": {"fail": "open"}})
    request = _request()
    assert asyncio.run(opened.prepare(request, PRINCIPAL)) is None
    assert request.messages == [{"role": "user", "content": "hi z"}]


def test_a_hook_that_runs_over_cannot_change_the_request_afterwards() -> None:
    done = threading.Event()

    class Late:
        APPLIANCE_HOOKSPEC = "1"

        @hookimpl
        def prepare_request(self, request: RequestView, principal: PrincipalView) -> None:
            time.sleep(0.5)
            request.messages[0]["content"] = "hijacked"  # type: ignore[index]
            request.notes["late"] = "x"
            done.set()

    manager, events = _manager([Point("late", Late())], {"late": {"timeout_seconds": 0.05, "fail": "open"}})
    request = _request()
    asyncio.run(manager.prepare(request, PRINCIPAL))
    assert done.wait(5)
    assert request.messages[0]["content"] == "hi" and request.notes == {}  # type: ignore[index]
    assert events[0][1]["hook"] == "prepare_request" and "timed out" in events[0][1]["reason"]


def test_rejections_notes_and_check_verdicts_chain_in_order() -> None:
    class Judge:
        APPLIANCE_HOOKSPEC = "1"

        def __init__(self, action: str, text: str | None = None) -> None:
            self.action, self.text = action, text
            self.saw: list[str] = []

        @hookimpl
        def prepare_request(self, request: RequestView, principal: PrincipalView) -> Rejection | None:
            request.notes["judge"] = {"seen": True}
            return Rejection("r1") if self.action == "reject" else None

        @hookimpl
        def check_response(self, request: RequestView, response: ResponseView) -> Verdict | None:
            self.saw.append(response.text)
            return Verdict(self.action, text=self.text)  # type: ignore[arg-type]

    rewrite, last = Judge("accept", "clean"), Judge("accept")
    manager, _ = _manager([Point("a", rewrite), Point("b", last)])
    outcome = asyncio.run(manager.check(_request(), ResponseView("dirty", True, False, "m")))
    assert last.saw == ["clean"]  # the rewritten answer is what the next guardrail judges
    assert outcome.verdict.text == "clean" and outcome.outcomes == {"a": "rewrote: a", "b": "passed"}

    refuser, _ = _manager([Point("judge", Judge("reject"))])
    request = _request()
    assert asyncio.run(refuser.prepare(request, PRINCIPAL)) == Rejection("r1")
    assert request.notes == {"judge": {"seen": True, "rejected": "r1"}}


def test_wrong_return_types_fail_the_plugin() -> None:
    class Odd:
        APPLIANCE_HOOKSPEC = "1"

        @hookimpl
        def choose_route(self, request: RequestView, principal: PrincipalView, candidates: list[Candidate]) -> Any:
            return "model-a"

        @hookimpl
        def check_response(self, request: RequestView, response: ResponseView) -> Any:
            return "fine"

    class Picker:
        APPLIANCE_HOOKSPEC = "1"

        @hookimpl
        def choose_route(self, request: RequestView, principal: PrincipalView, candidates: list[Candidate]) -> list[str]:
            return [c.name for c in reversed(candidates)]

    manager, events = _manager([Point("a_odd", Odd()), Point("b_pick", Picker())])
    candidates = [Candidate("m1"), Candidate("m2")]
    assert asyncio.run(manager.choose(_request(), PRINCIPAL, candidates)) == ("b_pick", ["m2", "m1"])
    assert manager.plugins["a_odd"].status == "failed" and "not a list" in (manager.plugins["a_odd"].last_error or "")
    with pytest.raises(GuardrailUnavailable):  # failed, and check_response fails closed
        asyncio.run(manager.check(_request(), ResponseView("x", True, False, "m")))
    assert len(events) == 1


def test_load_failures_refuse_one_plugin_each() -> None:
    class Hangs:
        APPLIANCE_HOOKSPEC = "1"

        @hookimpl
        def configure(self, config: Any) -> None:
            time.sleep(2)

    class Unversioned:
        @hookimpl
        def prepare_request(self, request: RequestView, principal: PrincipalView) -> None:
            pass

    class Misspelt:
        APPLIANCE_HOOKSPEC = "1"

        @hookimpl
        def prepare_requests(self, request: RequestView) -> None:
            pass

    class BadRegistrations:
        APPLIANCE_HOOKSPEC = "1"

        @hookimpl
        def register_checks(self, register: Any) -> None:
            register(Check("dup", lambda: {}))
            register(Check("dup", lambda: {}))

    class BadRoute:
        APPLIANCE_HOOKSPEC = "1"

        @hookimpl
        def register_admin_routes(self, register: Any) -> None:
            register(AdminRoute("../etc", lambda q, b: {}))

    manager, events = _manager(
        [
            Point("exits", SystemExit(3)),
            Point("hangs", Hangs()),
            Point("unversioned", Unversioned()),
            Point("misspelt", Misspelt()),
            Point("dups", BadRegistrations()),
            Point("route", BadRoute()),
            Point("good", Appender("ok")),
        ],
        {"hangs": {"timeout_seconds": 0.2}},
    )
    reasons = {name: p.last_error or "" for name, p in manager.plugins.items() if p.status == "refused"}
    assert set(reasons) == {"exits", "hangs", "unversioned", "misspelt", "dups", "route"}
    assert "SystemExit" in reasons["exits"]
    assert "took longer than 0.2s" in reasons["hangs"]
    assert "APPLIANCE_HOOKSPEC" in reasons["unversioned"]
    assert "prepare_requests" in reasons["misspelt"]
    assert "already registered" in reasons["dups"] and manager.checks == {}
    assert "words separated by slashes" in reasons["route"]
    assert manager.plugins["good"].status == "active"
    assert sorted(d["plugin"] for e, d in events if e == "plugin.refused") == sorted(reasons)


def test_a_slow_observer_has_a_backlog_and_drops_beyond_it() -> None:
    gate = threading.Event()
    seen: list[int] = []

    class Slow:
        APPLIANCE_HOOKSPEC = "1"

        @hookimpl
        def on_usage(self, record: dict[str, Any]) -> None:
            gate.wait(10)
            seen.append(record["n"])

    manager, _ = _manager([Point("slow", Slow())], {"slow": {"workers": 1, "timeout_seconds": 30}})
    started = time.perf_counter()
    for n in range(1010):
        manager.observe("on_usage", {"n": n})
    assert time.perf_counter() - started < 5  # handing over never waits for the observer
    gate.set()
    deadline = time.monotonic() + 10
    while len(seen) < 1000 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert manager.plugins["slow"].dropped == 10
    assert seen[:3] == [0, 1, 2] and len(seen) == 1000
    manager.close()
