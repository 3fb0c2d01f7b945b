"""Admin endpoints for API keys: create, list, show, update, rotate, revoke."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, delete, get, patch, post
from litestar.params import FromPath, FromQuery, JSONBody
from msgspec import UNSET

from appliance.api.context import change, epoch
from appliance.api.responses import KeyInfo, KeyList, NewKey, errors
from appliance.api.schemas import CreateKeyRequest, RotateKeyRequest, UpdateKeyRequest
from appliance.api.security import roles
from appliance.api.services import ServicesDep
from appliance.auth import KeyRecord, Principal, Role
from appliance.auth import NewKey as CreatedKey
from appliance.auth.keys import UNSET as KEEP

ADMIN = roles(Role.ADMIN)


def key_info(record: KeyRecord) -> KeyInfo:
    return msgspec.convert(record.to_dict(), KeyInfo)


def new_key(created: CreatedKey) -> NewKey:
    return msgspec.convert(created.record.to_dict() | {"key": created.secret}, NewKey)


@post("/admin/keys", opt=ADMIN, name="keys:create", status_code=201, responses=errors(409))
async def create_key(request: Request[Principal, Any, Any], data: JSONBody[CreateKeyRequest], services: ServicesDep) -> NewKey:
    created = await change(
        request,
        services.keys.create,
        data.name,
        data.role,
        expires_at=epoch(data.expires_at, "expires_at") if data.expires_at is not None else None,
        models=data.models,
        team=data.team,
        rpm=data.rpm,
        tpm=data.tpm,
        prompt_retention=data.prompt_retention,
        answer_retention=data.answer_retention,
    )
    return new_key(created)


@get("/admin/keys", opt=roles(Role.AUDITOR), name="keys:list", responses=errors())
async def list_keys(services: ServicesDep, expiring: FromQuery[bool] = False) -> KeyList:
    """Every key (never a secret); `expiring=true`: only active keys that expire soon."""
    return KeyList(object="list", data=[key_info(k) for k in services.keys.list(expiring_only=expiring)])


@get("/admin/keys/{key_id:str}", opt=roles(Role.AUDITOR), name="keys:get", responses=errors(404))
async def get_key(key_id: FromPath[str], services: ServicesDep) -> KeyInfo:
    return key_info(services.keys.get(key_id))


@patch("/admin/keys/{key_id:str}", opt=ADMIN, name="keys:update", responses=errors(404, 409))
async def update_key(
    request: Request[Principal, Any, Any], key_id: FromPath[str], data: JSONBody[UpdateKeyRequest], services: ServicesDep
) -> KeyInfo:
    fields: dict[str, Any] = {
        name: KEEP if value is UNSET else value
        for name, value in (
            ("rpm", data.rpm),
            ("tpm", data.tpm),
            ("models", data.models),
            ("team", data.team),
            ("prompt_retention", data.prompt_retention),
            ("answer_retention", data.answer_retention),
        )
    }
    if data.expires_at is UNSET:
        fields["expires_at"] = KEEP
    else:
        fields["expires_at"] = epoch(data.expires_at, "expires_at") if data.expires_at is not None else None
    return key_info(await change(request, services.keys.update, key_id, **fields))


@post("/admin/keys/{key_id:str}/rotate", opt=ADMIN, name="keys:rotate", status_code=201, responses=errors(404, 409))
async def rotate_key(
    request: Request[Principal, Any, Any], key_id: FromPath[str], data: JSONBody[RotateKeyRequest], services: ServicesDep
) -> NewKey:
    """A new secret for the key; the current one keeps working for `overlap_seconds`."""
    return new_key(await change(request, services.keys.rotate, key_id, overlap_seconds=data.overlap_seconds))


@delete("/admin/keys/{key_id:str}", opt=ADMIN, name="keys:revoke", status_code=200, responses=errors(404))
async def revoke_key(request: Request[Principal, Any, Any], key_id: FromPath[str], services: ServicesDep) -> KeyInfo:
    return key_info(await change(request, services.keys.revoke, key_id))


ROUTES = [create_key, list_keys, get_key, update_key, rotate_key, revoke_key]
