"""Routes: virtual models. A client passes a route's name as `model` ("auto", "fast", "chat")
and the router turns it into an ordered list of candidates, local models or upstream models
("<upstream>/<model>"), each with conditions.

Routes live in the `routes` table as JSON, edited by admins; every change is written with
its admin audit record (before and after) in one transaction. A key may use a route when
its model allow-list names the route (or it has none); the route's candidates then need no
permission of their own, but their `keys` and `teams` conditions still apply.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from appliance.audit.log import Actor, AuditLog
from appliance.errors import Conflict, InvalidRequest, NotFound
from appliance.store import Store

Capability = Literal["chat", "completion", "embeddings", "json"]
Strategy = Literal["ordered", "cheapest", "auto"]
CAPABILITIES: tuple[str, ...] = ("chat", "completion", "embeddings", "json")
ROUTE_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_NAME = re.compile(ROUTE_NAME_PATTERN)
_RESERVED = frozenset({"explain"})  # POST /admin/routes/explain
Difficulty = Annotated[float, Meta(ge=0, le=1)]


class CandidateSpec(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    """One place a route may send a request, and when it may."""

    model: str  # a local model's name, or "<upstream>/<model>"
    keys: list[str] | None = None  # only requests by these key ids
    teams: list[str] | None = None  # only requests by keys of these teams
    max_prompt_tokens: Annotated[int, Meta(ge=1)] | None = None
    capabilities: list[Capability] | None = None  # what it can do; default: what the engine reports
    tags: list[str] | None = None  # only requests tagged with all of these (x-appliance-tags)
    max_difficulty: Difficulty | None = None  # auto: the hardest score it is trusted with (default 1)
    cost_per_1k_tokens: Annotated[float, Meta(ge=0)] | None = None  # overrides metering's estimate


class RouteSpec(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    """A route as admins write it (`PUT /admin/routes/{name}`, `appliance routes set`)."""

    candidates: Annotated[list[CandidateSpec], Meta(min_length=1, max_length=32)]
    strategy: Strategy = "ordered"
    description: str = ""
    local_only: bool = False  # never an upstream, whatever the candidates say
    first_token_timeout_seconds: Annotated[float, Meta(gt=0, le=600)] | None = None


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    spec: RouteSpec
    created_at: float
    updated_at: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **msgspec.to_builtins(self.spec), "created_at": self.created_at, "updated_at": self.updated_at}


def _decode(raw: Any) -> RouteSpec:
    try:
        return msgspec.convert(raw, RouteSpec)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"invalid route: {exc}", param="candidates") from None


def parse_spec(raw: Any) -> RouteSpec:
    """A route spec from JSON-ready data; `InvalidRequest` says what is wrong."""
    spec = _decode(raw)
    seen: set[str] = set()
    for candidate in spec.candidates:
        if candidate.model in seen:
            raise InvalidRequest(f"candidate {candidate.model!r} is listed twice", param="candidates")
        seen.add(candidate.model)
        for tag in candidate.tags or []:
            if tag != tag.strip().lower() or not tag:
                raise InvalidRequest(f"tag {tag!r} must be lower-case without spaces around it", param="candidates")
    if spec.strategy == "auto" and not any((c.max_difficulty or 1.0) >= 1.0 for c in spec.candidates):
        raise InvalidRequest("an auto route needs a candidate trusted with every request (max_difficulty 1, or unset)",
                             param="candidates")
    return spec


class RouteStore:
    """The routes; `known` says whether a candidate names something that exists (a registered
    local model, or a model an upstream serves) and `taken` whether a name is a model's."""

    def __init__(self, store: Store, audit: AuditLog, *, known: Callable[[str], bool], taken: Callable[[str], bool]) -> None:
        self._store = store
        self._audit = audit
        self._known = known
        self._taken = taken
        self._cache: dict[str, Route] | None = None

    def list(self) -> list[Route]:
        return sorted(self._all().values(), key=lambda r: r.name)

    def find(self, name: str) -> Route | None:
        return self._all().get(name)

    def get(self, name: str) -> Route:
        route = self.find(name)
        if route is None:
            raise NotFound(f"There is no route named '{name}'.")
        return route

    def set(self, name: str, raw: Any, *, actor: Actor) -> Route:
        """Create or replace a route; audited with its before and after."""
        if not _NAME.match(name):
            raise InvalidRequest("a route name is 1 to 64 lower-case letters, digits, '.', '_' or '-'", param="name")
        if name in _RESERVED:
            raise Conflict(f"'{name}' is reserved (POST /admin/routes/{name})")
        if self._taken(name):
            raise Conflict(f"'{name}' is a model's name; a route of that name would hide it")
        spec = _decode(raw)
        unknown = [c.model for c in spec.candidates if not self._known(c.model)]
        if unknown:  # what the route names does not exist: 404, like any missing resource
            raise NotFound(
                f"unknown candidate{'s' if len(unknown) > 1 else ''} {', '.join(repr(u) for u in unknown)}: register "
                "the model, or the upstream that serves it, first",
                param="candidates",
            )
        spec = parse_spec(raw)
        before = self.find(name)
        now = time.time()
        route = Route(name, spec, before.created_at if before else now, now)
        audit = self._audit.admin_fn(
            actor, "routes.set", name, before=before.to_dict() if before else None, after=route.to_dict()
        )
        body = msgspec.json.encode(spec).decode()

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO routes (name, spec, created_at, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at",
                (name, body, route.created_at, now),
            )
            audit(conn)

        self._store.write_sync(write)
        self._cache = None
        return route

    def delete(self, name: str, *, actor: Actor) -> Route:
        route = self.get(name)
        audit = self._audit.admin_fn(actor, "routes.delete", name, before=route.to_dict())

        def write(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM routes WHERE name = ?", (name,))
            audit(conn)

        self._store.write_sync(write)
        self._cache = None
        return route

    def reload(self) -> None:
        self._cache = None

    def _all(self) -> dict[str, Route]:
        # Routes change rarely and are read on every request: cached, dropped on each change
        # made here (a change made by another process reaches this one at its next start, or
        # through the admin socket, which makes it here).
        if self._cache is None:
            rows = self._store.query("SELECT name, spec, created_at, updated_at FROM routes")
            self._cache = {r["name"]: _route(r) for r in rows}
        return self._cache


def _route(row: sqlite3.Row) -> Route:
    spec = msgspec.json.decode(row["spec"], type=RouteSpec)
    return Route(row["name"], spec, float(row["created_at"]), float(row["updated_at"]))


def tags_match(candidate: CandidateSpec, tags: Iterable[str]) -> bool:
    return not candidate.tags or set(candidate.tags) <= set(tags)
