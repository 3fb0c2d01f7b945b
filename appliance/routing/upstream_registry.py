"""Remote OpenAI-compatible upstreams (vLLM, llama-server, another appliance) as an admin
registers them: where they are, which models they serve, what they cost, and their API key,
kept encrypted (`SecretBox`) and never shown.

Only an admin sets an upstream's URL; no request can name one, so callers cannot make the
appliance fetch arbitrary addresses (SSRF). Each change is written with its admin audit
record in one transaction; the record says whether a key is set or changed (`api_key_state`),
never which.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from appliance.audit.log import Actor, AuditLog
from appliance.errors import InvalidRequest, NotFound
from appliance.routing.secrets import SecretBox
from appliance.store import Store

__all__ = ["KEEP", "Upstream", "UpstreamRegistry"]


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


KEEP: Any = _Keep()  # `api_key=KEEP`: leave the stored key as it is

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
# The same rules as JSON Schema patterns, for the OpenAPI document (client generators and
# the conformance run must know what is accepted).
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,255}$"
_PORT = r"(:([0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?"
_H = "[0-9A-Fa-f]{1,4}"
_IPV6 = (  # RFC 4291 text forms (no embedded IPv4, no zone): every match is an address urlsplit accepts
    rf"(({_H}:){{7}}{_H}|({_H}:){{1,7}}:|({_H}:){{1,6}}:{_H}|({_H}:){{1,5}}(:{_H}){{1,2}}|({_H}:){{1,4}}(:{_H}){{1,3}}"
    rf"|({_H}:){{1,3}}(:{_H}){{1,4}}|({_H}:){{1,2}}(:{_H}){{1,5}}|{_H}:(:{_H}){{1,6}}|:((:{_H}){{1,7}}|:))"
)
BASE_URL_PATTERN = (
    rf"^https?://(\[{_IPV6}\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?)" + _PORT + r"(/[A-Za-z0-9._~%!$&'()*+,;=:@/-]*)?$"
)
_BASE_URL = re.compile(BASE_URL_PATTERN)
KEY_PATTERN = r"^[!-~]+$"
_MODEL = re.compile(MODEL_PATTERN)
_MAX_URL = 2048
_MAX_MODELS = 256
_MAX_MODEL_NAME = 256
_MAX_KEY = 4096
_MAX_PRICE = 1e6


@dataclass(frozen=True, slots=True)
class Upstream:
    """One registered upstream; never holds its key (`has_key` says whether it has one)."""

    name: str
    base_url: str  # http(s)://host[:port][/path], no trailing slash: requests go to base_url + "/chat/completions"
    models: tuple[str, ...]
    prompt_price_per_1k: float = 0.0
    completion_price_per_1k: float = 0.0
    timeout_seconds: float = 30.0  # the first-token deadline, retries included
    max_retries: int = 2
    has_key: bool = False
    created_at: float = 0.0
    updated_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "base_url": self.base_url,
            "models": list(self.models),
            "api_key": "set" if self.has_key else None,
            "prompt_price_per_1k": self.prompt_price_per_1k,
            "completion_price_per_1k": self.completion_price_per_1k,
            "timeout_seconds": self.timeout_seconds,
            "max_retries": self.max_retries,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
        }


class UpstreamRegistry:
    """The `upstreams` table. Without `audit` and `box` it is read-only (`list`, `get`)."""

    def __init__(self, store: Store, audit: AuditLog | None = None, box: SecretBox | None = None) -> None:
        self._store = store
        self._audit = audit
        self._box = box
        self.revision = 0  # counts this instance's committed changes, for caches of engines to follow

    def set(
        self,
        name: str,
        *,
        base_url: str,
        models: Sequence[str],
        api_key: str | None = KEEP,
        prompt_price_per_1k: float = 0.0,
        completion_price_per_1k: float = 0.0,
        timeout_seconds: float = 30.0,
        max_retries: int = 2,
        actor: Actor,
    ) -> Upstream:
        """Create the upstream, or replace every setting of the one with this name. `api_key`:
        KEEP leaves the stored key (none for a new upstream), None removes it, a string sets it.
        Audited as `upstreams.set`. Raises `InvalidRequest` naming the bad parameter."""
        audit = self._audit_log()
        row: dict[str, Any] = {
            "name": check_name(name),
            "base_url": check_base_url(base_url),
            "models": json.dumps(check_models(models)),
            "prompt_price_per_1k": _check_price(prompt_price_per_1k, "prompt_price_per_1k"),
            "completion_price_per_1k": _check_price(completion_price_per_1k, "completion_price_per_1k"),
            "timeout_seconds": _check_timeout(timeout_seconds),
            "max_retries": _check_retries(max_retries),
        }
        new_key = None if api_key is KEEP or api_key is None else self._secret_box().encrypt(_check_key(api_key))
        now = time.time()

        def write(conn: sqlite3.Connection) -> Upstream:
            old = conn.execute("SELECT * FROM upstreams WHERE name = ?", (row["name"],)).fetchone()
            before = _upstream(old) if old is not None else None
            if api_key is KEEP:
                row["api_key_enc"] = old["api_key_enc"] if old is not None else None
            else:
                row["api_key_enc"] = new_key
            row["created_at"] = float(old["created_at"]) if old is not None else now
            row["updated_at"] = now
            conn.execute(
                "INSERT OR REPLACE INTO upstreams (name, base_url, api_key_enc, models, prompt_price_per_1k,"
                " completion_price_per_1k, timeout_seconds, max_retries, created_at, updated_at) VALUES (:name, :base_url,"
                " :api_key_enc, :models, :prompt_price_per_1k, :completion_price_per_1k, :timeout_seconds, :max_retries,"
                " :created_at, :updated_at)",
                row,
            )
            after = _upstream(conn.execute("SELECT * FROM upstreams WHERE name = ?", (row["name"],)).fetchone())
            audited = _audited(after, changed_key=new_key is not None)
            shown_before = _audited(before) if before else None
            audit.admin_fn(actor, "upstreams.set", after.name, before=shown_before, after=audited)(conn)
            return after

        upstream = self._store.write_sync(write)
        self.revision += 1
        return upstream

    def delete(self, name: str, *, actor: Actor) -> Upstream:
        """Remove the upstream and its key; audited as `upstreams.delete`. Raises `NotFound`."""
        audit = self._audit_log()

        _known_name(name)

        def write(conn: sqlite3.Connection) -> Upstream:
            old = conn.execute("SELECT * FROM upstreams WHERE name = ?", (name,)).fetchone()
            if old is None:
                raise NotFound(f"No upstream {name!r}.")
            gone = _upstream(old)
            conn.execute("DELETE FROM upstreams WHERE name = ?", (name,))
            audit.admin_fn(actor, "upstreams.delete", name, before=_audited(gone))(conn)
            return gone

        upstream = self._store.write_sync(write)
        self.revision += 1
        return upstream

    def list(self) -> list[Upstream]:
        return [_upstream(r) for r in self._store.query("SELECT * FROM upstreams ORDER BY name")]

    def get(self, name: str) -> Upstream:
        _known_name(name)
        row = self._store.query_one("SELECT * FROM upstreams WHERE name = ?", (name,))
        if row is None:
            raise NotFound(f"No upstream {name!r}.")
        return _upstream(row)

    def api_key(self, name: str) -> str | None:
        """The upstream's key in clear, for its engine only; None when it has none. Raises
        `NotFound`, or `ConfigError` when the stored key cannot be decrypted."""
        _known_name(name)
        row = self._store.query_one("SELECT api_key_enc FROM upstreams WHERE name = ?", (name,))
        if row is None:
            raise NotFound(f"No upstream {name!r}.")
        token = row["api_key_enc"]
        return None if token is None else self._secret_box().decrypt(token)

    def _audit_log(self) -> AuditLog:
        if self._audit is None:
            raise RuntimeError("this UpstreamRegistry was built without an audit log and cannot change upstreams")
        return self._audit

    def _secret_box(self) -> SecretBox:
        if self._box is None:
            raise RuntimeError("this UpstreamRegistry was built without a SecretBox and cannot use API keys")
        return self._box


# -- validation -------------------------------------------------------------------------------
def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidRequest(
            "upstream name must be 1 to 64 lower-case letters, digits, '.', '_' or '-', starting with a letter or digit",
            param="name",
        )
    return name


def _known_name(name: str) -> None:
    """`NotFound` at once for a name no upstream can have (and that the database need not see)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise NotFound(f"No upstream {name!r}.")


def check_base_url(url: str) -> str:
    """`url` as stored: http or https, a host, no credentials, query or fragment, no trailing slash."""
    if not isinstance(url, str) or not url or len(url) > _MAX_URL or not url.isascii() or not url.isprintable() or " " in url:
        raise InvalidRequest(
            f"base_url must be an http or https URL of at most {_MAX_URL} ASCII characters (IDN hosts in punycode)",
            param="base_url",
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        raise InvalidRequest("base_url is not a valid URL", param="base_url") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidRequest("base_url must start with http:// or https://", param="base_url")
    if "@" in parts.netloc:
        raise InvalidRequest("base_url must not hold credentials; set api_key instead", param="base_url")
    if not parts.hostname:
        raise InvalidRequest("base_url must name a host", param="base_url")
    if "?" in url or "#" in url:
        raise InvalidRequest("base_url must not have a query or a fragment", param="base_url")
    if not _BASE_URL.match(url):
        raise InvalidRequest("base_url must be http(s)://host[:port][/path], the host a name or an IP address", param="base_url")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def check_models(models: Sequence[str]) -> list[str]:
    if isinstance(models, str) or not isinstance(models, Sequence) or not models:
        raise InvalidRequest("models must be a non-empty list of model names", param="models")
    if len(models) > _MAX_MODELS:
        raise InvalidRequest(f"models may list at most {_MAX_MODELS} names", param="models")
    names: list[str] = []
    for model in models:
        if not isinstance(model, str) or not model.strip() or len(model) > _MAX_MODEL_NAME:
            raise InvalidRequest(f"each model name must be 1 to {_MAX_MODEL_NAME} characters", param="models")
        if not _MODEL.match(model):
            raise InvalidRequest(
                f"model name {model!r} must be letters, digits and . _ : / @ + - (as the upstream names it)", param="models"
            )
        if model not in names:
            names.append(model)
    return names


def _check_key(key: str) -> str:
    # The message never repeats the key, not even a part of it.
    if not isinstance(key, str) or not key or len(key) > _MAX_KEY or not re.match(KEY_PATTERN, key):
        raise InvalidRequest(
            f"api_key must be 1 to {_MAX_KEY} printable characters without spaces", param="api_key"
        )
    return key


def _check_price(value: float, param: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0 <= value <= _MAX_PRICE):
        raise InvalidRequest(f"{param} must be a number from 0 to {_MAX_PRICE:g}", param=param)
    return float(value)


def _check_timeout(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not 0 < value <= 600:
        raise InvalidRequest("timeout_seconds must be more than 0 and at most 600", param="timeout_seconds")
    return float(value)


def _check_retries(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 5:
        raise InvalidRequest("max_retries must be a whole number from 0 to 5", param="max_retries")
    return value


def _audited(upstream: Upstream, *, changed_key: bool = False) -> dict[str, Any]:
    """The upstream as its admin audit records show it: `api_key_state` is "set", "changed" (a
    new key was given) or None. Not `api_key`, whose value the audit log redacts whatever it is."""
    shown = upstream.to_dict()
    del shown["api_key"]
    return shown | {"api_key_state": "changed" if changed_key else "set" if upstream.has_key else None}


def _upstream(row: sqlite3.Row) -> Upstream:
    return Upstream(
        name=row["name"],
        base_url=row["base_url"],
        models=tuple(json.loads(row["models"])),
        prompt_price_per_1k=float(row["prompt_price_per_1k"] or 0.0),
        completion_price_per_1k=float(row["completion_price_per_1k"] or 0.0),
        timeout_seconds=float(row["timeout_seconds"] if row["timeout_seconds"] is not None else 30.0),
        max_retries=int(row["max_retries"] if row["max_retries"] is not None else 2),
        has_key=row["api_key_enc"] is not None,
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
    )


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds")
