"""Who a request acts as."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Role(enum.StrEnum):
    ADMIN = "admin"  # everything
    OPERATOR = "operator"  # models, routes, checks
    AUDITOR = "auditor"  # read audit and usage only
    USER = "user"  # the inference API


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    name: str
    role: Role
    team_id: str = "default"
    allowed_models: frozenset[str] | None = None  # None: every model
    rpm: int | None = None
    tpm: int | None = None
    prompt_retention: str | None = None  # the key's own policy, else the team's; None: the default
    answer_retention: str | None = None  # likewise, for answers ([audit] default_answer_retention)
    local_uid: int | None = None  # set for the local admin on the admin socket (no key)

    def may_use(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models

    def actor_info(self) -> dict[str, object]:
        """How admin audit records name this principal."""
        if self.local_uid is not None:
            return {"kind": "local", "uid": self.local_uid, "user": self.name}
        return {"key_id": self.key_id, "key_name": self.name, "role": str(self.role)}


def local_admin(uid: int, user: str) -> Principal:
    """The principal of a trusted process on the local admin socket."""
    return Principal(key_id=f"local:uid={uid}", name=user, role=Role.ADMIN, local_uid=uid)
