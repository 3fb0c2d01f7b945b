"""What the registry needs to know about a GGUF model file, read without llama.cpp.

`inspect_model` validates the header with `runtime.gguf_check.read_gguf` (so a bad
file fails here with `ModelFileError`, before llama.cpp sees it), hashes the
whole file, and pulls out the few metadata values the appliance uses.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import ModelFileError
from runtime.gguf_check import GGML_TYPES, GGUFHeader, read_gguf

__all__ = ["ModelInfo", "inspect_model", "quantization_name", "sha256_file"]

CHUNK_SIZE = 1 << 20

# llama.cpp's llama_ftype (general.file_type) -> the usual quantization name.
# Ids 4..6 and 33..35 were removed from the format.
FILE_TYPE_NAMES: dict[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
    39: "NVFP4",
    40: "Q1_0",
}


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """Facts about one validated GGUF file.

    `quantization` is the name of `general.file_type` (for example "Q4_1"), or,
    when the file does not say, the ggml type holding the most weights.
    `block_count` is `{arch}.block_count`, the number of transformer layers
    (what `n_gpu_layers` counts). The last three fields size the KV cache.
    """

    path: str
    size_bytes: int
    sha256: str
    architecture: str
    parameter_count: int
    quantization: str
    context_length: int | None
    has_chat_template: bool
    chat_template: str | None
    name: str | None
    block_count: int | None = None
    embedding_length: int | None = None
    head_count: int | None = None
    head_count_kv: int | None = None

    def kv_cache_bytes(self, n_ctx: int, bytes_per_value: int = 2) -> int:
        """Estimated KV cache size for `n_ctx` tokens (F16 cache by default); 0 if unknown."""
        if not (self.block_count and self.embedding_length and self.head_count):
            return 0
        head_dim = self.embedding_length // self.head_count
        kv_heads = self.head_count_kv or self.head_count
        return 2 * self.block_count * n_ctx * kv_heads * head_dim * bytes_per_value


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks. Raises ModelFileError if unreadable."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK_SIZE):
                digest.update(chunk)
    except OSError as exc:
        raise ModelFileError(f"cannot read model file {os.fspath(path)!s}: {exc.strerror or exc}") from None
    return digest.hexdigest()


def quantization_name(header: GGUFHeader) -> str:
    """The file's quantization: general.file_type's name, else the dominant tensor type."""
    ftype = header.kv.get("general.file_type")
    if isinstance(ftype, int) and not isinstance(ftype, bool) and ftype in FILE_TYPE_NAMES:
        return FILE_TYPE_NAMES[ftype]
    by_elements: Counter[int] = Counter()
    for t in header.tensors:
        by_elements[t.ggml_type] += t.n_elements
    if not by_elements:
        return "unknown"
    return GGML_TYPES[by_elements.most_common(1)[0][0]].name


def _int_or_none(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def inspect_model(path: str | os.PathLike[str], *, expected_sha256: str | None = None) -> ModelInfo:
    """Validate the GGUF file at `path`, hash it and describe it.

    Raises ModelFileError when the file is missing or invalid, has no
    `general.architecture`, or (when `expected_sha256` is given) hashes to
    something else.
    """
    header = read_gguf(path)
    arch = header.architecture
    if not arch:
        raise ModelFileError(f"{os.fspath(path)!s}: GGUF metadata has no general.architecture string")
    digest = sha256_file(path)
    if expected_sha256 is not None and digest != expected_sha256.strip().lower():
        raise ModelFileError(
            f"{os.fspath(path)!s}: sha256 mismatch: expected {expected_sha256}, got {digest}"
        )
    template = header.kv.get("tokenizer.chat_template")
    template = template if isinstance(template, str) and template.strip() else None
    name = header.kv.get("general.name")
    return ModelInfo(
        path=str(Path(path).resolve()),
        size_bytes=header.file_size,
        sha256=digest,
        architecture=arch,
        parameter_count=sum(t.n_elements for t in header.tensors),
        quantization=quantization_name(header),
        context_length=_int_or_none(header.kv.get(f"{arch}.context_length")),
        has_chat_template=template is not None,
        chat_template=template,
        name=name if isinstance(name, str) and name else None,
        block_count=_int_or_none(header.kv.get(f"{arch}.block_count")),
        embedding_length=_int_or_none(header.kv.get(f"{arch}.embedding_length")),
        head_count=_int_or_none(header.kv.get(f"{arch}.attention.head_count")),
        head_count_kv=_int_or_none(header.kv.get(f"{arch}.attention.head_count_kv")),
    )
