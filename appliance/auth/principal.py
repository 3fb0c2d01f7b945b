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

    def may_use(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models
