"""The `model_files` job: every registered model's files hashed against what they must be,
one finding per model: the registered file against the registry's sha256, and each cached
CPU re-encoding (and its adapter) against its record, or, for the weights a loaded engine
serves, against the sha256 the engine reports (`served_files`: what answers requests).

Hashing a large file takes a while, so a file is hashed again only when its size, mtime,
ctime or inode changed since it last hashed right (kept in `CheckState`; ctime cannot be set
back by hand, so any write or replacement shows). Option `full` hashes everything every run.
A changed or missing file is a "fail".
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.checks.findings import Finding, fail, ok
from appliance.checks.registry import CheckContext, CheckJob
from appliance.model_pool import ModelPool
from appliance.model_registry import RegisteredModel
from runtime.encodings import ENCODINGS, SPLIT, cache_paths, read_record
from runtime.errors import ModelFileError
from runtime.model_file import sha256_file

__all__ = ["NAME", "ModelFile", "files_of", "model_files_job", "run"]

NAME = "model_files"


@dataclass(frozen=True, slots=True)
class ModelFile:
    role: str  # "registered", "<encoding>", "<encoding> adapter"
    path: str
    sha256: str  # what it must hash to


def model_files_job(ctx: CheckContext) -> CheckJob:
    return CheckJob(
        NAME,
        lambda: run(ctx),
        3600.0,
        description="sha256 of each model's files (registered and served re-encodings) against the registry",
        timeout_seconds=3600.0,
    )


def run(ctx: CheckContext) -> list[Finding]:
    full = bool(ctx.option(NAME, "full", False))
    models = ctx.services.models.list()
    if not models:
        return [ok("no model is registered")]
    served = ctx.on_loop(_served(ctx.services.pool, [m.name for m in models]), 10.0)
    encoded = ctx.services.settings.paths.encoded_models
    return [check_model(ctx, model, files_of(model, encoded, served.get(model.name)), full=full) for model in models]


def files_of(model: RegisteredModel, encoded_dir: Path, served: dict[str, str] | None) -> list[ModelFile]:
    """The files of `model` to verify. `served`: the loaded engine's `served_files`, if any."""
    files = [ModelFile("registered", model.path, model.sha256)]
    served = served or {}
    for encoding in ENCODINGS:
        path, record_path = cache_paths(model.sha256, encoded_dir, encoding)
        record = read_record(record_path) or {}
        built = record.get("source_sha256") == model.sha256 and record.get("encoding") == encoding
        serving = served.get("encoding") == encoding
        if not built and not serving:
            continue
        expected = served if serving else record
        files.append(ModelFile(encoding, str(path), str(expected.get("sha256") or "")))
        if encoding == SPLIT:
            adapter = path.with_name(path.name.removesuffix(".gguf") + ".adapter.gguf")
            files.append(ModelFile(f"{encoding} adapter", str(adapter), str(expected.get("adapter_sha256") or "")))
    return files


def check_model(ctx: CheckContext, model: RegisteredModel, files: list[ModelFile], *, full: bool) -> Finding:
    known: dict[str, Any] = {} if full else (ctx.state.get(NAME, model.name) or {}).get("files", {})
    kept: dict[str, Any] = {}
    results: list[dict[str, Any]] = []
    bad: list[str] = []
    hashed = 0
    for file in files:
        result, stamp = _check_file(file, known.get(file.path))
        results.append(result)
        hashed += result["hashed"]
        if stamp is not None:
            kept[file.path] = stamp
        if result["status"] != "ok":
            bad.append(f"{file.role} {Path(file.path).name}: {result['problem']}")
    ctx.state.put(NAME, model.name, {"files": kept})
    details = {"files": results, "hashed": hashed}
    if bad:
        return fail("; ".join(bad), model.name, **details)
    return ok(
        f"{len(files)} files match their sha256 ({hashed} hashed, {len(files) - hashed} unchanged since)",
        model.name,
        **details,
    )


def _check_file(file: ModelFile, known: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The file's result and, when it is right, the stamp to keep (None otherwise)."""
    result: dict[str, Any] = {"role": file.role, "path": file.path, "status": "ok", "hashed": 0}
    try:
        st = os.stat(file.path)
    except OSError as exc:
        return result | {"status": "fail", "problem": f"missing ({exc.strerror or exc})"}, None
    stamp = {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "ino": st.st_ino,
        "sha256": file.sha256,
    }
    if known is not None and all(known.get(k) == v for k, v in stamp.items()):
        return result, known
    try:
        digest = sha256_file(file.path)
    except ModelFileError as exc:
        return result | {"status": "fail", "problem": f"unreadable: {exc}", "hashed": 1}, None
    result["hashed"] = 1
    if digest != file.sha256:
        return result | {
            "status": "fail",
            "problem": f"changed on disk: sha256 {digest[:16]}..., expected {file.sha256[:16]}...",
            "sha256": digest,
        }, None
    return result, stamp | {"verified_at": time.time()}


async def _served(pool: ModelPool, names: list[str]) -> dict[str, dict[str, str] | None]:
    out: dict[str, dict[str, str] | None] = {}
    for name in names:
        engine = pool.peek(name)
        if engine is not None:
            out[name] = engine.served_files
    return out
