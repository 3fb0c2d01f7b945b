"""What a registered model is served as on a CPU, decided from its registry facts alone, and
where its re-encodings are cached: the light half of `runtime.weights`, which the CLI and the
config use without loading numpy, gguf or llama.cpp."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

__all__ = [
    "ENCODINGS",
    "NEEDS_ADAPTER_KEY",
    "REENCODED_TYPES",
    "SPLIT",
    "SPLIT_ARCHITECTURES",
    "WeightsMode",
    "cache_paths",
    "is_built",
    "planned_encoding",
    "read_record",
    "remove_encoded",
]

log = logging.getLogger(__name__)

# "auto": the fastest re-encoding for the file; "q8_0": llama.cpp's quantiser only.
WeightsMode = Literal["auto", "original", "q8_0"]

# File types with no batched CPU matrix kernel in ggml, served re-encoded under "auto".
REENCODED_TYPES: frozenset[str] = frozenset({"Q4_1", "Q5_1"})
# The split of a Q4_1 file into Q4_0 codes and a block-offset adapter (runtime._offset_adapter),
# for these architectures only.
SPLIT = "q4_0_offsets"
SPLIT_ARCHITECTURES: frozenset[str] = frozenset({"llama"})
ENCODINGS: tuple[str, ...] = ("q8_0", SPLIT)
# GGUF metadata of a split model: loading it without its adapter would answer nonsense.
NEEDS_ADAPTER_KEY = "appliance.block_offsets_adapter"


def planned_encoding(
    quantization: str | None, architecture: str | None, *, mode: WeightsMode, on_gpu: bool
) -> str | None:
    """The encoding a model with this file type and architecture is served in (None: the file
    as it is). GPU backends have batched kernels for every type, and a larger encoding would
    take VRAM from the KV cache, so offloaded models keep their file."""
    if mode == "original" or on_gpu or quantization not in REENCODED_TYPES:
        return None
    if mode == "auto" and quantization == "Q4_1" and architecture in SPLIT_ARCHITECTURES:
        return SPLIT
    return "q8_0"


def cache_paths(source_sha256: str, cache_dir: Path, encoding: str) -> tuple[Path, Path]:
    """The re-encoded file and its JSON record."""
    stem = f"{source_sha256}.{encoding}"
    return cache_dir / f"{stem}.gguf", cache_dir / f"{stem}.json"


def read_record(path: Path) -> dict[str, object] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_built(source_sha256: str, cache_dir: Path, encoding: str) -> bool:
    """Whether a re-encoding of the file with this sha256 has been built (its record is there).
    Not a check of its bytes: every load rehashes them."""
    record = read_record(cache_paths(source_sha256, cache_dir, encoding)[1])
    return record is not None and record.get("source_sha256") == source_sha256


def remove_encoded(source_sha256: str, cache_dir: Path) -> None:
    """Delete every cached re-encoding of the file with this sha256 (after `models remove`).
    A file that cannot be deleted is logged and left: it is derived data, rebuilt or ignored."""
    for encoding in ENCODINGS:
        for suffix in (".gguf", ".adapter.gguf", ".json"):
            path = cache_dir / f"{source_sha256}.{encoding}{suffix}"
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not delete %s: %s", path, exc.strerror or exc)
