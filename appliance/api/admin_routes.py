"""Admin endpoints under /admin."""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Request, delete, get, post
from litestar.params import FromPath, JSONBody

from appliance.api.context import request_context
from appliance.api.schemas import CreateKeyRequest
from appliance.api.security import roles
from appliance.api.services import ServicesDep
from appliance.auth import Principal, Role
from appliance.auth.keys import parse_expiry
from appliance.governance import AdminAction

ADMIN = roles(Role.ADMIN)


@post("/admin/keys", opt=ADMIN, name="keys:create", status_code=201)
async def create_key(request: Request[Principal, Any, Any], data: JSONBody[CreateKeyRequest], services: ServicesDep) -> dict[str, Any]:
    expires = parse_expiry(data.expires_at) if data.expires_at else None
    new = await asyncio.to_thread(
        services.keys.create,
        data.name,
        data.role,
        expires_at=expires,
        models=data.models,
        team=data.team,
        rpm=data.rpm,
        tpm=data.tpm,
        prompt_retention=data.prompt_retention,
    )
    request_context(request.scope).admin = AdminAction("keys.create", new.record.id, None, new.record.to_dict())
    return new.record.to_dict() | {"key": new.secret}


@get("/admin/keys", opt=roles(Role.ADMIN, Role.AUDITOR), name="keys:list")
async def list_keys(services: ServicesDep) -> dict[str, Any]:
    return {"object": "list", "data": [k.to_dict() for k in services.keys.list()]}


@delete("/admin/keys/{key_id:str}", opt=ADMIN, name="keys:revoke", status_code=200)
async def revoke_key(request: Request[Principal, Any, Any], key_id: FromPath[str], services: ServicesDep) -> dict[str, Any]:
    before = services.keys.get(key_id).to_dict()
    record = await asyncio.to_thread(services.keys.revoke, key_id)
    request_context(request.scope).admin = AdminAction("keys.revoke", key_id, before, record.to_dict())
    return record.to_dict()


ROUTES = [create_key, list_keys, revoke_key]
