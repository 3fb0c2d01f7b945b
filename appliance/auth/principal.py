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
    allowed_models: frozenset[str] | None = None  # None: every model

    def may_use(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models
