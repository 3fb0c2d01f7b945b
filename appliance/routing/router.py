"""The routing decision: a requested model name becomes an ordered list of candidates, with
the beginning of the decision trail that `x-appliance-route` and the audit record carry.

A plain model name is its own single candidate. A route's candidates are filtered by their
conditions (key, team, tags, capability, local-only), ordered by its strategy:
- `ordered`: as listed;
- `cheapest`: by expected cost (metering's recent rate per token, the upstream's prices, plus
  the cost of loading a model that is not resident);
- `auto`: the difficulty classifier scores the request, and the cheapest candidate trusted
  with that score goes first; the other trusted ones follow by cost, then the rest, most
  capable first, as last resorts;
then handed to the `choose_route` plugins, which may reorder them or name another route.
Conditions that need the prompt's tokens (`max_prompt_tokens`) are checked by the
dispatcher, once the candidate has tokenised it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from appliance.auth import Principal
from appliance.errors import ModelNotFound
from appliance.routing.routes import CandidateSpec, Route, RouteStore, tags_match

LOCAL_ONLY_TAGS = frozenset({"local-only", "local_only"})


class Catalog(Protocol):
    """What the router needs to know about candidates."""

    def known(self, name: str) -> bool: ...

    def is_remote(self, name: str) -> bool: ...

    def capabilities(self, name: str) -> frozenset[str]: ...

    def resident(self, name: str) -> bool: ...

    def load_seconds(self, name: str) -> float: ...


class Scorer(Protocol):
    def score(self, text: str, *, max_tokens: int | None = None, json_mode: bool = False) -> float: ...


@dataclass(frozen=True, slots=True)
class Need:
    """What a request needs from a candidate, and what the conditions look at."""

    kind: str  # chat | completion | embeddings
    json_mode: bool = False
    tags: tuple[str, ...] = ()
    text: str = ""  # for the classifier
    max_tokens: int | None = None
    prompt_tokens_estimate: int = 0  # for ordering by cost (characters / 4)

    @property
    def capability(self) -> str:
        return self.kind

    @property
    def local_only(self) -> bool:
        return bool(LOCAL_ONLY_TAGS & set(self.tags))


@dataclass(slots=True)
class Planned:
    name: str
    spec: CandidateSpec | None = None  # None for a plain model name


@dataclass(slots=True)
class Plan:
    requested: str
    route: Route | None
    candidates: list[Planned]
    trail: str  # the decision so far: "auto>score=0.81" or the model's name
    skipped: dict[str, str] = field(default_factory=dict)  # candidate -> why it was left out
    score: float | None = None
    decided_us: float = 0.0
    need: Need | None = None

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.candidates]


class Router:
    def __init__(
        self,
        routes: RouteStore,
        catalog: Catalog,
        *,
        estimate_cost: Callable[[str, int, int, float], float],
        scorer: Callable[[], Scorer] | None = None,
        default_max_tokens: int = 512,
    ) -> None:
        """`estimate_cost(model, prompt_tokens, completion_tokens, extra_seconds)`; `scorer`
        builds the difficulty classifier on first use (only `auto` routes need it)."""
        self.routes = routes
        self.catalog = catalog
        self._estimate = estimate_cost
        self._scorer_factory = scorer
        self._scorer: Scorer | None = None
        self.default_max_tokens = default_max_tokens

    def reset_scorer(self) -> None:
        """The next `auto` decision builds the scorer again (after a recalibration)."""
        self._scorer = None

    def visible_routes(self, principal: Principal) -> list[Route]:
        return [r for r in self.routes.list() if principal.may_use(r.name)]

    def is_route(self, name: str) -> bool:
        return self.routes.find(name) is not None

    def plan(self, principal: Principal, requested: str, need: Need) -> Plan:
        """The candidates for `requested`, best first. Raises `ModelNotFound` for a name that
        is neither a model nor a route the key may use, or a route with no candidate left."""
        started = time.perf_counter()
        route = self.routes.find(requested)
        if route is None:
            if not principal.may_use(requested) or not self.catalog.known(requested) or self.catalog.is_remote(requested):
                raise ModelNotFound(f"The model '{requested}' does not exist or you do not have access to it.", param="model")
            plan = Plan(requested, None, [Planned(requested)], requested)
        else:
            if not principal.may_use(route.name):
                raise ModelNotFound(f"The model '{requested}' does not exist or you do not have access to it.", param="model")
            plan = self._route_plan(principal, route, need)
        plan.decided_us = (time.perf_counter() - started) * 1e6
        plan.need = need
        return plan

    def reorder(self, plan: Plan, chosen: list[str], principal: Principal, *, by: str) -> Plan:
        """A `choose_route` plugin's choice: its names first, in its order (a name may be
        another route the key may use, which brings that route's candidates), then the rest
        of the plan as fallbacks. A local-only route stays local."""
        assert plan.route is not None and plan.need is not None
        ours = {c.name: c for c in plan.candidates}
        out: list[Planned] = []
        picked: list[str] = []
        for name in chosen:
            if name in ours:
                found = [ours[name]]
            else:
                route = self.routes.find(name)
                if route is None or name == plan.route.name or not principal.may_use(name):
                    continue
                try:
                    found = self._route_plan(principal, route, plan.need).candidates
                except ModelNotFound:
                    continue
                picked.append(f"route={name}")
            for candidate in found:
                if all(c.name != candidate.name for c in out):
                    out.append(candidate)
        if not out:
            return plan
        out += [c for c in plan.candidates if all(o.name != c.name for o in out)]
        if plan.route.spec.local_only or plan.need.local_only:
            out = [c for c in out if not self.catalog.is_remote(c.name)]
        plan.candidates = out
        plan.trail += f">{by}" + (f":{','.join(picked)}" if picked else "")
        return plan

    def _route_plan(self, principal: Principal, route: Route, need: Need) -> Plan:
        spec = route.spec
        local_only = spec.local_only or need.local_only
        skipped: dict[str, str] = {}
        eligible: list[CandidateSpec] = []
        for c in spec.candidates:
            why = self._ineligible(c, principal, need, local_only)
            if why:
                skipped[c.model] = why
            else:
                eligible.append(c)
        if not eligible:
            reasons = "; ".join(f"{m}: {why}" for m, why in skipped.items())
            raise ModelNotFound(f"The route '{route.name}' has no candidate for this request ({reasons}).", param="model")
        trail = route.name
        score: float | None = None
        if spec.strategy == "cheapest":
            eligible = sorted(eligible, key=lambda c: self._cost(c, need))
            trail += ">cheapest"
        elif spec.strategy == "auto":
            score = self._score(need)
            trusted = sorted((c for c in eligible if _trusted(c) >= score), key=lambda c: self._cost(c, need))
            rest = sorted((c for c in eligible if _trusted(c) < score), key=_trusted, reverse=True)
            eligible = trusted + rest
            trail += f">score={score:.2f}"
        return Plan(route.name, route, [Planned(c.model, c) for c in eligible], trail, skipped, score)

    def _ineligible(self, c: CandidateSpec, principal: Principal, need: Need, local_only: bool) -> str | None:
        if c.keys is not None and principal.key_id not in c.keys:
            return "key not listed"
        if c.teams is not None and principal.team_id not in c.teams:
            return "team not listed"
        if not tags_match(c, need.tags):
            return "tags not given"
        if local_only and self.catalog.is_remote(c.model):
            return "local only"
        capabilities = frozenset(c.capabilities) if c.capabilities is not None else self.catalog.capabilities(c.model)
        if need.capability not in capabilities or (need.json_mode and "json" not in capabilities):
            return f"cannot do {'json' if need.capability in capabilities else need.capability}"
        return None

    def _cost(self, c: CandidateSpec, need: Need) -> float:
        completion = need.max_tokens or self.default_max_tokens
        if c.cost_per_1k_tokens is not None:
            return (need.prompt_tokens_estimate + completion) / 1000.0 * c.cost_per_1k_tokens
        load = 0.0 if self.catalog.resident(c.model) else self.catalog.load_seconds(c.model)
        return self._estimate(c.model, need.prompt_tokens_estimate, completion, load)

    def _score(self, need: Need) -> float:
        if self._scorer is None:
            if self._scorer_factory is None:
                return 1.0  # no classifier: every request is treated as hard, so the most trusted serves
            self._scorer = self._scorer_factory()
        return float(self._scorer.score(need.text, max_tokens=need.max_tokens, json_mode=need.json_mode))

    def explain(self, principal: Principal, requested: str, need: Need) -> dict[str, Any]:
        """The decision for a request, without running it (`appliance routes explain`)."""
        plan = self.plan(principal, requested, need)
        out: dict[str, Any] = {
            "requested": requested,
            "route": plan.route.name if plan.route else None,
            "strategy": plan.route.spec.strategy if plan.route else None,
            "candidates": plan.names,
            "skipped": plan.skipped,
            "trail": f"{plan.trail}>{plan.names[0]}",
            "decided_us": round(plan.decided_us, 1),
        }
        if plan.score is not None:
            out["score"] = round(plan.score, 4)
            scorer = self._scorer
            if scorer is not None and hasattr(scorer, "explain"):
                out["score_features"] = [
                    [name, round(value, 4)] for name, value in scorer.explain(need.text, max_tokens=need.max_tokens, json_mode=need.json_mode)
                ]
        return out


def _trusted(c: CandidateSpec) -> float:
    return 1.0 if c.max_difficulty is None else c.max_difficulty
