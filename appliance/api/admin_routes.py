"""Admin endpoints under /admin."""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Request, delete, get, post

from appliance.api.schemas import CreateKeyRequest
from appliance.api.security import roles
from appliance.api.services import Services
from appliance.auth import Principal, Role
from appliance.auth.keys import parse_expiry

ADMIN = roles(Role.ADMIN)


@post("/admin/keys", opt=ADMIN, name="keys:create", status_code=201)
async def create_key(request: Request[Principal, Any, Any], data: CreateKeyRequest, services: Services) -> dict[str, Any]:
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
    return new.record.to_dict() | {"key": new.secret}


@get("/admin/keys", opt=ADMIN, name="keys:list")
async def list_keys(services: Services) -> dict[str, Any]:
    return {"object": "list", "data": [k.to_dict() for k in services.keys.list()]}


@delete("/admin/keys/{key_id:str}", opt=ADMIN, name="keys:revoke", status_code=200)
async def revoke_key(request: Request[Principal, Any, Any], key_id: str, services: Services) -> dict[str, Any]:
    record = await asyncio.to_thread(services.keys.revoke, key_id)
    return record.to_dict()


ROUTES = [create_key, list_keys, revoke_key]
