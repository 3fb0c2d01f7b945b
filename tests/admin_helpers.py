"""Services as the CLI and the API build them, for tests that exercise one directly: every
change needs an actor and writes its admin audit record through a real audit log."""

from __future__ import annotations

from appliance.audit.log import Actor, AuditLog
from appliance.audit.signing import Signer
from appliance.store import Store

ACTOR = Actor({"kind": "test", "user": "pytest"})


def audit_of(store: Store) -> AuditLog:
    return AuditLog(store, Signer.generate())
