"""Walks every route of the app against every role and against no key at all.

`EXPECTED` is the access policy written down independently of the code: a route added
without an entry here, or whose declared roles differ from it, makes this test fail."""

from __future__ import annotations

import json
import sqlite3
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from appliance.api.app import create_app
from appliance.config import load_settings
from tests.conftest import MODEL_NAME, Server, run_cli

ALL = {"admin", "operator", "auditor", "user"}
PUBLIC = "public"
CLOSED: set[str] = set()  # declared by nobody: refused to every role

EXPECTED: dict[tuple[str, str], set[str] | str] = {
    # checks, alerts, drift, feedback and metrics (issue 17)
    ("GET", "/admin/checks"): {"admin", "operator", "auditor"},
    ("GET", "/admin/checks/history"): {"admin", "operator", "auditor"},
    ("GET", "/admin/checks/{name:str}"): {"admin", "operator", "auditor"},
    ("POST", "/admin/checks/{name:str}/run"): {"admin", "operator"},
    ("GET", "/admin/alerts"): {"admin", "operator", "auditor"},
    ("GET", "/admin/alerts/channels"): {"admin", "operator", "auditor"},
    ("GET", "/admin/alerts/{alert_id:int}"): {"admin", "operator", "auditor"},
    ("POST", "/admin/alerts/channels/{name:str}/test"): {"admin", "operator"},
    ("POST", "/admin/drift/baseline"): {"admin", "operator"},
    ("GET", "/admin/drift/golden"): {"admin", "operator"},
    ("GET", "/admin/drift/golden/{name:str}/history"): {"admin", "operator"},
    ("POST", "/admin/drift/golden/{name:str}/run"): {"admin", "operator"},
    ("GET", "/admin/drift/report"): {"admin", "operator"},
    ("POST", "/v1/feedback"): ALL,
    ("GET", "/admin/feedback"): {"admin", "operator", "auditor"},
    ("GET", "/admin/feedback/export"): {"admin", "auditor"},
    ("GET", "/admin/feedback/{feedback_id:str}"): {"admin", "operator", "auditor"},
    ("POST", "/admin/feedback/{feedback_id:str}/promote"): {"admin", "operator"},
    ("PATCH", "/admin/teams/{team_id:str}"): {"admin"},
    ("GET", "/metrics"): {"admin", "operator", "auditor"},
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    ("POST", "/v1/chat/completions"): {"admin", "operator", "user"},
    ("POST", "/v1/completions"): {"admin", "operator", "user"},
    ("POST", "/v1/embeddings"): {"admin", "operator", "user"},
    ("GET", "/v1/models"): ALL,
    ("GET", "/v1/models/{model_id:str}"): ALL,
    ("POST", "/admin/keys"): {"admin"},
    ("GET", "/admin/keys"): {"admin", "auditor"},
    ("GET", "/admin/keys/{key_id:str}"): {"admin", "auditor"},
    ("PATCH", "/admin/keys/{key_id:str}"): {"admin"},
    ("POST", "/admin/keys/{key_id:str}/rotate"): {"admin"},
    ("DELETE", "/admin/keys/{key_id:str}"): {"admin"},
    ("POST", "/admin/teams"): {"admin"},
    ("GET", "/admin/teams"): {"admin", "auditor"},
    ("DELETE", "/admin/teams/{team_id:str}"): {"admin"},
    ("POST", "/admin/budgets"): {"admin"},
    ("GET", "/admin/budgets"): {"admin", "auditor"},
    ("DELETE", "/admin/budgets/{budget_id:int}"): {"admin"},
    ("GET", "/admin/usage"): {"admin", "auditor"},
    ("GET", "/admin/audit"): {"admin", "auditor"},
    ("GET", "/admin/audit/verify"): {"admin", "auditor"},
    ("GET", "/admin/audit/export"): {"admin", "auditor"},
    ("POST", "/admin/audit/checkpoint"): {"admin", "auditor"},
    ("POST", "/admin/audit/erase"): {"admin"},
    ("GET", "/admin/models"): {"admin", "operator"},
    ("POST", "/admin/models/{name:str}/load"): {"admin", "operator"},
    ("POST", "/admin/models/{name:str}/unload"): {"admin", "operator"},
    ("POST", "/admin/models/{name:str}/pin"): {"admin", "operator"},
    ("POST", "/admin/models/{name:str}/unpin"): {"admin", "operator"},
    ("GET", "/admin/routes"): {"admin", "operator"},
    ("GET", "/admin/routes/{name:str}"): {"admin", "operator"},
    ("PUT", "/admin/routes/{name:str}"): {"admin", "operator"},
    ("DELETE", "/admin/routes/{name:str}"): {"admin", "operator"},
    ("POST", "/admin/routes/explain"): {"admin", "operator"},
    ("GET", "/admin/router/calibration"): {"admin", "operator"},
    ("PUT", "/admin/router/calibration"): {"admin", "operator"},
    ("DELETE", "/admin/router/calibration"): {"admin", "operator"},
    ("GET", "/admin/upstreams"): {"admin", "operator"},
    ("PUT", "/admin/upstreams/{name:str}"): {"admin"},
    ("DELETE", "/admin/upstreams/{name:str}"): {"admin"},
    ("GET", "/admin/plugins"): {"admin", "operator"},
    ("POST", "/admin/plugins/{name:str}/enable"): {"admin"},
    ("POST", "/admin/plugins/{name:str}/disable"): {"admin"},
    ("GET", "/admin/plugins/{name:str}/routes/{path:path}"): {"admin"},
    ("POST", "/admin/plugins/{name:str}/routes/{path:path}"): {"admin"},
    ("GET", "/schema/openapi.json"): ALL,
    ("GET", "/schema"): ALL,
    ("GET", "/schema/{path:str}"): ALL,
}


def _app_routes() -> set[tuple[str, str]]:
    app = create_app(load_settings(tempfile.mkdtemp(), env={}))
    return {(m, r.path) for r in app.routes for m in getattr(r, "methods", ()) if m != "OPTIONS"}


def test_every_route_has_a_declared_policy() -> None:
    routes = _app_routes()
    assert routes - EXPECTED.keys() == set(), "routes without an access policy in EXPECTED"
    assert EXPECTED.keys() - routes == set(), "EXPECTED names routes the app no longer has"


@dataclass
class Keys:
    by_role: dict[str, str]
    admin: str


@pytest.fixture(scope="module")
def keys(server: Server) -> Keys:
    by_role = {}
    for role in sorted(ALL):
        out = run_cli("keys", "create", "--name", f"walk-{role}", "--role", role, "--json", data_dir=server.data_dir)
        by_role[role] = json.loads(out.stdout)["key"]
    return Keys(by_role, server.admin_key)


def _admin_post(server: Server, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {server.admin_key}"})
    assert r.status_code == 201, r.text
    return r.json()


def _admin_put(server: Server, path: str, body: dict[str, Any]) -> str:
    r = httpx.put(server.url + path, json=body, headers={"Authorization": f"Bearer {server.admin_key}"})
    assert r.status_code == 200, r.text
    return path


def _budget_team(server: Server) -> str:
    """Budgets made by this walk go on a team of their own, so they cannot starve other tests."""
    r = httpx.get(server.url + "/admin/teams", headers={"Authorization": f"Bearer {server.admin_key}"})
    if not any(t["id"] == "role-walk" for t in r.json()["data"]):
        _admin_post(server, "/admin/teams", {"name": "role-walk"})
    return "role-walk"


SPARE = "role-walk-spare"


def _spare(server: Server) -> str:
    """A model registered (not loaded) for the walk; removed again by `spare_model`."""
    r = httpx.get(server.url + "/admin/models", headers={"Authorization": f"Bearer {server.admin_key}"})
    if not any(m["name"] == SPARE for m in r.json()["data"]):
        [default] = [m for m in r.json()["data"] if m["name"] == MODEL_NAME]
        run_cli("models", "add", default["path"], "--name", SPARE, data_dir=server.data_dir)
    return SPARE


@pytest.fixture(scope="module", autouse=True)
def spare_model(server: Server) -> Iterator[None]:
    yield
    run_cli("models", "remove", SPARE, data_dir=server.data_dir, check=False)


@pytest.fixture(scope="module", autouse=True)
def routing_left_as_found(server: Server) -> Iterator[None]:
    """The walk's routes, upstreams and calibration would show in other tests' `/v1/models`."""
    yield
    headers = {"Authorization": f"Bearer {server.admin_key}"}
    for kind in ("routes", "upstreams"):
        for item in httpx.get(f"{server.url}/admin/{kind}", headers=headers).json()["data"]:
            httpx.delete(f"{server.url}/admin/{kind}/{item['name']}", headers=headers)
    httpx.delete(f"{server.url}/admin/router/calibration", headers=headers)


def _request_for(server: Server, method: str, path: str) -> tuple[str, str, dict[str, Any] | None]:
    """A valid request for the route; resources to delete are created fresh each time."""
    chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    route = {"candidates": [{"model": MODEL_NAME}]}
    upstream = {"base_url": "http://127.0.0.1:9/v1", "models": ["walked-model"]}
    golden = {"easy": [{"prompt": "hi " * i} for i in range(1, 11)],
              "hard": [{"prompt": "Prove the theorem step by step. " * i} for i in range(1, 11)]}
    makers: dict[tuple[str, str], Callable[[], tuple[str, dict[str, Any] | None]]] = {
        ("POST", "/v1/chat/completions"): lambda: (path, chat),
        ("POST", "/v1/completions"): lambda: (path, {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 1}),
        ("POST", "/v1/embeddings"): lambda: (path, {"model": MODEL_NAME, "input": "hi"}),
        ("GET", "/v1/models/{model_id:str}"): lambda: (f"/v1/models/{MODEL_NAME}", None),
        ("POST", "/admin/keys"): lambda: (path, {"name": "walked", "role": "user"}),
        ("DELETE", "/admin/keys/{key_id:str}"): lambda: (
            f"/admin/keys/{_admin_post(server, '/admin/keys', {'name': 'doomed', 'role': 'user'})['id']}", None
        ),
        ("GET", "/admin/keys/{key_id:str}"): lambda: (
            f"/admin/keys/{_admin_post(server, '/admin/keys', {'name': 'looked-at', 'role': 'user'})['id']}", None
        ),
        ("PATCH", "/admin/keys/{key_id:str}"): lambda: (
            f"/admin/keys/{_admin_post(server, '/admin/keys', {'name': 'changed', 'role': 'user'})['id']}", {"rpm": 60}
        ),
        ("POST", "/admin/keys/{key_id:str}/rotate"): lambda: (
            f"/admin/keys/{_admin_post(server, '/admin/keys', {'name': 'rotated', 'role': 'user'})['id']}/rotate",
            {"overlap_seconds": 60},
        ),
        ("POST", "/admin/audit/erase"): lambda: (path, {"by": "key", "key_id": "000000000000"}),
        ("POST", "/admin/teams"): lambda: (path, {"name": f"team-{uuid.uuid4().hex[:8]}"}),
        ("DELETE", "/admin/teams/{team_id:str}"): lambda: (
            f"/admin/teams/{_admin_post(server, '/admin/teams', {'name': f'doomed-{uuid.uuid4().hex[:8]}'})['id']}", None
        ),
        ("POST", "/admin/budgets"): lambda: (path, {"scope": "team", "scope_id": _budget_team(server), "amount": 1000, "period": "total"}),
        ("DELETE", "/admin/budgets/{budget_id:int}"): lambda: (
            f"/admin/budgets/{_admin_post(server, '/admin/budgets', {'scope': 'team', 'scope_id': _budget_team(server), 'amount': 999, 'unit': 'tokens', 'period': 'day'})['id']}",
            None,
        ),
        ("GET", "/schema/{path:str}"): lambda: ("/schema/openapi.json", None),
        ("GET", "/admin/alerts/{alert_id:int}"): lambda: (f"/admin/alerts/{_alert(server)}", None),
        ("GET", "/admin/checks/{name:str}"): lambda: ("/admin/checks/host", None),
        ("POST", "/admin/checks/{name:str}/run"): lambda: ("/admin/checks/host/run", None),
        ("PATCH", "/admin/teams/{team_id:str}"): lambda: (f"/admin/teams/{_budget_team(server)}", {"answer_retention": "none"}),
        ("POST", "/v1/feedback"): lambda: (path, {"id": "chatcmpl-walked", "rating": "up"}),
        ("GET", "/admin/drift/golden/{name:str}/history"): lambda: ("/admin/drift/golden/walked/history", None),
        ("POST", "/admin/drift/golden/{name:str}/run"): lambda: ("/admin/drift/golden/walked/run", {}),
        ("POST", "/admin/drift/baseline"): lambda: (path, {}),
        ("POST", "/admin/feedback/{feedback_id:str}/promote"): lambda: ("/admin/feedback/fb-walked/promote", {"set": "walked"}),
        # Loading the loaded default model is a no-op; the spare is registered, never loaded.
        ("POST", "/admin/models/{name:str}/load"): lambda: (f"/admin/models/{MODEL_NAME}/load", None),
        ("POST", "/admin/models/{name:str}/unload"): lambda: (f"/admin/models/{_spare(server)}/unload", None),
        ("POST", "/admin/models/{name:str}/pin"): lambda: (f"/admin/models/{_spare(server)}/pin", None),
        ("POST", "/admin/models/{name:str}/unpin"): lambda: (f"/admin/models/{_spare(server)}/unpin", None),
        ("PUT", "/admin/routes/{name:str}"): lambda: ("/admin/routes/walked", route),
        ("GET", "/admin/routes/{name:str}"): lambda: (_admin_put(server, "/admin/routes/looked-at", route), None),
        ("DELETE", "/admin/routes/{name:str}"): lambda: (_admin_put(server, f"/admin/routes/doomed-{uuid.uuid4().hex[:8]}", route), None),
        ("POST", "/admin/routes/explain"): lambda: (path, {"model": MODEL_NAME, "prompt": "hi"}),
        ("PUT", "/admin/router/calibration"): lambda: (path, golden),
        ("PUT", "/admin/upstreams/{name:str}"): lambda: ("/admin/upstreams/walked", upstream),
        ("DELETE", "/admin/upstreams/{name:str}"): lambda: (
            _admin_put(server, f"/admin/upstreams/doomed-{uuid.uuid4().hex[:8]}", upstream), None
        ),
        # prompt_guard has no rules on this server, so turning it off and on changes nothing.
        ("POST", "/admin/plugins/{name:str}/enable"): lambda: ("/admin/plugins/prompt_guard/enable", None),
        ("POST", "/admin/plugins/{name:str}/disable"): lambda: ("/admin/plugins/prompt_guard/disable", None),
        ("GET", "/admin/plugins/{name:str}/routes/{path:path}"): lambda: ("/admin/plugins/prompt_guard/routes/rules", None),
        ("POST", "/admin/plugins/{name:str}/routes/{path:path}"): lambda: (
            "/admin/plugins/pii_redact/routes/preview", {"text": "mail a@b.io"}
        ),
    }
    target, body = makers.get((method, path), lambda: (path, None))()
    return method, target, body


# Routes needing what the shared server has none of (a channel, a golden set, feedback, 50
# requests for a drift baseline): a permitted role passes the guard and gets this status; a
# refused one still gets 401/403.
NEEDS_A_RESOURCE = {
    ("POST", "/admin/alerts/channels/{name:str}/test"): "404",
    ("GET", "/admin/drift/golden/{name:str}/history"): "404",
    ("POST", "/admin/drift/golden/{name:str}/run"): "404",
    ("GET", "/admin/feedback/{feedback_id:str}"): "404",
    ("POST", "/admin/feedback/{feedback_id:str}/promote"): "404",
    ("POST", "/v1/feedback"): "404",
    ("POST", "/admin/drift/baseline"): "409",
}


@pytest.mark.parametrize(("method", "path"), sorted(EXPECTED))
def test_route_against_every_role_and_no_key(server: Server, keys: Keys, method: str, path: str) -> None:
    policy = EXPECTED[(method, path)]
    for role in [None, *sorted(ALL)]:
        verb, target, body = _request_for(server, method, path)
        headers = {"Authorization": f"Bearer {keys.by_role[role]}"} if role else {}
        r = httpx.request(verb, server.url + target, json=body, headers=headers, timeout=60)
        if policy == PUBLIC:
            expected = "2xx"
        elif role is None:
            expected = "401"
        else:
            expected = "2xx" if role in policy else "403"
        got = "2xx" if 200 <= r.status_code < 300 else str(r.status_code)
        if expected == "2xx" and got == NEEDS_A_RESOURCE.get((method, path)):
            got = "2xx"  # allowed in, and told the resource is missing
        assert got == expected, f"{method} {path} as {role or 'no key'}: {r.status_code} {r.text[:200]}"


def _alert(server: Server) -> int:
    """An alert to read (checks raise them; none would have by now)."""
    with sqlite3.connect(server.data_dir / "appliance.db", timeout=10) as conn:
        cur = conn.execute(
            "INSERT INTO alerts (rule, check_name, subject, severity, state, summary, details, opened_at, sends)"
            " VALUES ('walk', 'walk', ?, 'warn', 'resolved', 'walked', '{}', 0, 0)", (uuid.uuid4().hex,)
        )
        return int(cur.lastrowid or 0)
