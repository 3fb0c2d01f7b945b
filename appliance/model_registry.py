"""The registered models: files copied into `<data>/models/`, validated and hashed before
llama.cpp ever opens them, with their metadata kept in the `models` table."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from appliance.audit.log import Actor, AuditLog
from appliance.errors import Conflict, InvalidRequest, NotFound
from appliance.store import Store
from runtime.encodings import remove_encoded
from runtime.errors import ModelFileError
from runtime.model_file import ModelInfo, inspect_model

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


@dataclass(frozen=True, slots=True)
class RegisteredModel:
    name: str
    path: str
    sha256: str
    size_bytes: int
    architecture: str | None
    parameter_count: int | None
    quantization: str | None
    context_length: int | None
    block_count: int | None
    has_chat_template: bool
    added_at: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def default_name(path: Path) -> str:
    """`SmolLM2-135M-Instruct.Q4_1.gguf` -> `smollm2-135m-instruct.q4_1`."""
    stem = path.name.removesuffix(".gguf")
    return re.sub(r"[^a-z0-9._:-]+", "-", stem.lower()).strip("-")[:64] or "model"


class ModelRegistry:
    def __init__(self, store: Store, models_dir: Path, audit: AuditLog | None = None) -> None:
        self._store = store
        self._dir = models_dir
        self._audit = audit  # None: read-only use

    def _admin_fn(self, actor: Actor, action: str, target: str, **change: Any) -> Callable[[sqlite3.Connection], int]:
        if self._audit is None:
            raise RuntimeError("this ModelRegistry was built without an audit log and cannot change models")
        return self._audit.admin_fn(actor, action, target, **change)

    def add(self, source: Path, name: str | None = None, *, actor: Actor) -> RegisteredModel:
        """Validate `source`, copy it into the models directory and record it, with its admin
        audit record in the same transaction.

        Raises `InvalidRequest` for a bad file or name and `Conflict` for a taken name.
        Nothing is left behind when any step fails.
        """
        name = name or default_name(source)
        if not _NAME.match(name):
            raise InvalidRequest(
                f"model name {name!r} is not allowed: use 1-64 letters, digits, '.', '_', ':' or '-'",
                param="name",
            )
        if self.find(name) is not None:
            raise Conflict(f"a model named {name!r} is already registered")
        try:
            info = inspect_model(source)
        except ModelFileError as exc:
            raise InvalidRequest(f"{source}: {exc}", param="path") from None
        dest = self._dir / f"{name}.gguf"
        self._dir.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(".gguf.partial")
        try:
            _link_or_copy(source, tmp)
            os.replace(tmp, dest)
            record = _from_info(name, dest, info)
            audit = self._admin_fn(actor, "models.add", name, after=record.to_dict())
            self._store.write_sync(lambda conn: (_insert(conn, record), audit(conn)))
        except BaseException:
            tmp.unlink(missing_ok=True)
            if self.find(name) is None:
                dest.unlink(missing_ok=True)
            raise
        return record

    def find(self, name: str) -> RegisteredModel | None:
        row = self._store.query_one("SELECT * FROM models WHERE name = ?", (name,))
        return _from_row(row) if row else None

    def find_by_sha256(self, sha256: str) -> RegisteredModel | None:
        row = self._store.query_one("SELECT * FROM models WHERE sha256 = ? ORDER BY added_at", (sha256,))
        return _from_row(row) if row else None

    def get(self, name: str) -> RegisteredModel:
        found = self.find(name)
        if found is None:
            raise NotFound(f"no model named {name!r} is registered")
        return found

    def list(self) -> list[RegisteredModel]:
        return [_from_row(r) for r in self._store.query("SELECT * FROM models ORDER BY added_at, name")]

    def remove(self, name: str, *, actor: Actor) -> RegisteredModel:
        record = self.get(name)
        audit = self._admin_fn(actor, "models.remove", name, before=record.to_dict())
        self._store.write_sync(
            lambda conn: (conn.execute("DELETE FROM models WHERE name = ?", (name,)), audit(conn))
        )
        path = Path(record.path)
        if path.parent == self._dir:
            path.unlink(missing_ok=True)
        if self.find_by_sha256(record.sha256) is None:  # no other name serves the same file
            remove_encoded(record.sha256, self._dir / "encoded")  # DataPaths.encoded_models
        return record


def _link_or_copy(source: Path, dest: Path) -> None:
    dest.unlink(missing_ok=True)
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)


def _from_info(name: str, dest: Path, info: ModelInfo) -> RegisteredModel:
    return RegisteredModel(
        name=name,
        path=str(dest),
        sha256=info.sha256,
        size_bytes=info.size_bytes,
        architecture=info.architecture,
        parameter_count=info.parameter_count,
        quantization=info.quantization,
        context_length=info.context_length,
        block_count=info.block_count,
        has_chat_template=info.has_chat_template,
        added_at=time.time(),
    )


def _insert(conn: sqlite3.Connection, record: RegisteredModel) -> None:
    row = record.to_dict()
    row["has_chat_template"] = int(record.has_chat_template)
    cols = ", ".join(row)
    conn.execute(f"INSERT INTO models ({cols}) VALUES ({', '.join(':' + c for c in row)})", row)


def _from_row(row: sqlite3.Row) -> RegisteredModel:
    data = dict(row)
    data["has_chat_template"] = bool(data["has_chat_template"])
    return RegisteredModel(**data)
