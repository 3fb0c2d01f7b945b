"""A strict, pure-Python GGUF header validator that runs before llama.cpp opens a file.

llama.cpp's own loader trusts a lot of what a GGUF header says, so a truncated
download or a hostile file can make the process allocate without bound or read
past the end of a mapping. `read_gguf` reads the header through a bounded reader
(it never reads a length it has not first checked against the bytes left in the
file), validates every field, and checks that every tensor's data lies inside
the file, aligned and without overlap. Any violation raises `ModelFileError`
with a message that names the problem and the byte offset; no other exception
escapes, whatever the input.

Layout (little-endian, versions 2 and 3)::

    magic "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count x (string key | u32 value_type | value)
    tensor_count x (string name | u32 n_dims | n_dims x u64 dim | u32 ggml_type | u64 offset)
    padding to `general.alignment` (default 32)
    tensor data; each tensor's offset is relative to the start of this section

Strings are a u64 byte length followed by UTF-8 bytes; arrays are a u32 item
type, a u64 length and the items.

The runtime does not depend on the `gguf` package: the ggml type table below is
copied from it (`GGML_QUANT_SIZES`), and a test checks the two agree.
"""

from __future__ import annotations

import io
import os
import stat
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO, NamedTuple

from runtime.errors import ModelFileError

__all__ = [
    "GGML_TYPES",
    "GGUFArray",
    "GGUFHeader",
    "GGUFTensorInfo",
    "GGUFValueType",
    "read_gguf",
]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = frozenset({2, 3})
DEFAULT_ALIGNMENT = 32

# Bounds. They are far above anything a real model uses and far below what
# would let a hostile header exhaust memory or time.
MAX_TENSOR_COUNT = 1 << 20
MAX_KV_COUNT = 1 << 16
MAX_KEY_LENGTH = 1 << 16
MAX_STRING_LENGTH = 1 << 26  # 64 MiB: chat templates are the largest strings in practice
MAX_TENSOR_NAME_LENGTH = 63  # ggml's GGML_MAX_NAME is 64 including the NUL
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 2  # an array of arrays is the deepest anything writes
MAX_ALIGNMENT = 1 << 16
MAX_INT64 = (1 << 63) - 1

# Arrays longer than this are summarised as a `GGUFArray` with `values=None`
# (the tokenizer's vocabulary and merges), so 50k strings are never held.
KEEP_ARRAY_ITEMS = 1024


class GGUFValueType:
    """GGUF metadata value type ids (0..12)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12

    NAMES = {
        0: "UINT8", 1: "INT8", 2: "UINT16", 3: "INT16", 4: "UINT32", 5: "INT32",
        6: "FLOAT32", 7: "BOOL", 8: "STRING", 9: "ARRAY", 10: "UINT64", 11: "INT64",
        12: "FLOAT64",
    }


# Fixed-size scalar types: id -> struct format (little-endian).
_SCALAR_FORMATS: dict[int, struct.Struct] = {
    GGUFValueType.UINT8: struct.Struct("<B"),
    GGUFValueType.INT8: struct.Struct("<b"),
    GGUFValueType.UINT16: struct.Struct("<H"),
    GGUFValueType.INT16: struct.Struct("<h"),
    GGUFValueType.UINT32: struct.Struct("<I"),
    GGUFValueType.INT32: struct.Struct("<i"),
    GGUFValueType.FLOAT32: struct.Struct("<f"),
    GGUFValueType.BOOL: struct.Struct("<B"),
    GGUFValueType.UINT64: struct.Struct("<Q"),
    GGUFValueType.INT64: struct.Struct("<q"),
    GGUFValueType.FLOAT64: struct.Struct("<d"),
}
# Smallest number of bytes one item of each type can occupy (bounds array lengths).
_MIN_ITEM_SIZE: dict[int, int] = {t: s.size for t, s in _SCALAR_FORMATS.items()}
_MIN_ITEM_SIZE[GGUFValueType.STRING] = 8
_MIN_ITEM_SIZE[GGUFValueType.ARRAY] = 12

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GGMLType(NamedTuple):
    """A ggml tensor type: its name, elements per block and bytes per block."""

    name: str
    block_size: int
    type_size: int


_QK_K = 256
# ggml type id -> (name, block size, bytes per block); from gguf.constants.GGML_QUANT_SIZES.
# Ids 4, 5 (Q4_2, Q4_3) and 31..33, 36..38 (runtime-repacked layouts) were removed
# from the format and are rejected as unknown, as llama.cpp does.
GGML_TYPES: dict[int, GGMLType] = {
    0: GGMLType("F32", 1, 4),
    1: GGMLType("F16", 1, 2),
    2: GGMLType("Q4_0", 32, 2 + 16),
    3: GGMLType("Q4_1", 32, 2 + 2 + 16),
    6: GGMLType("Q5_0", 32, 2 + 4 + 16),
    7: GGMLType("Q5_1", 32, 2 + 2 + 4 + 16),
    8: GGMLType("Q8_0", 32, 2 + 32),
    9: GGMLType("Q8_1", 32, 4 + 4 + 32),
    10: GGMLType("Q2_K", 256, 2 + 2 + _QK_K // 16 + _QK_K // 4),
    11: GGMLType("Q3_K", 256, 2 + _QK_K // 4 + _QK_K // 8 + 12),
    12: GGMLType("Q4_K", 256, 2 + 2 + _QK_K // 2 + 12),
    13: GGMLType("Q5_K", 256, 2 + 2 + _QK_K // 2 + _QK_K // 8 + 12),
    14: GGMLType("Q6_K", 256, 2 + _QK_K // 2 + _QK_K // 4 + _QK_K // 16),
    15: GGMLType("Q8_K", 256, 4 + _QK_K + _QK_K // 8),
    16: GGMLType("IQ2_XXS", 256, 2 + _QK_K // 4),
    17: GGMLType("IQ2_XS", 256, 2 + _QK_K // 4 + _QK_K // 32),
    18: GGMLType("IQ3_XXS", 256, 2 + _QK_K // 4 + _QK_K // 8),
    19: GGMLType("IQ1_S", 256, 2 + _QK_K // 8 + _QK_K // 16),
    20: GGMLType("IQ4_NL", 32, 2 + 16),
    21: GGMLType("IQ3_S", 256, 2 + _QK_K // 4 + _QK_K // 8 + _QK_K // 32 + 4),
    22: GGMLType("IQ2_S", 256, 2 + _QK_K // 4 + _QK_K // 16),
    23: GGMLType("IQ4_XS", 256, 2 + 2 + _QK_K // 2 + _QK_K // 64),
    24: GGMLType("I8", 1, 1),
    25: GGMLType("I16", 1, 2),
    26: GGMLType("I32", 1, 4),
    27: GGMLType("I64", 1, 8),
    28: GGMLType("F64", 1, 8),
    29: GGMLType("IQ1_M", 256, _QK_K // 8 + _QK_K // 16 + _QK_K // 32),
    30: GGMLType("BF16", 1, 2),
    34: GGMLType("TQ1_0", 256, 2 + 4 * 13),
    35: GGMLType("TQ2_0", 256, 2 + 64),
    39: GGMLType("MXFP4", 32, 1 + 16),
    40: GGMLType("NVFP4", 64, 4 + 32),
    41: GGMLType("Q1_0", 128, 2 + 16),
}


@dataclass(frozen=True, slots=True)
class GGUFArray:
    """A metadata array. `values` is None when the array was only summarised
    (more than `KEEP_ARRAY_ITEMS` items, or items that are themselves arrays)."""

    item_type: int
    length: int
    values: tuple[Any, ...] | None = None

    def __len__(self) -> int:
        return self.length


class GGUFTensorInfo(NamedTuple):
    """One tensor's header entry.

    `offset` is the absolute byte offset of the tensor's data in the file (the
    data section's start plus the relative offset the file stores).
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type].name

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def n_bytes(self) -> int:
        t = GGML_TYPES[self.ggml_type]
        return self.n_elements // t.block_size * t.type_size


@dataclass(slots=True)
class GGUFHeader:
    """The validated header of a GGUF file.

    `kv` maps metadata keys to Python values: ints, floats, bools and strs for
    scalars, `GGUFArray` for arrays.
    """

    version: int
    tensor_count: int
    kv: dict[str, Any]
    tensors: list[GGUFTensorInfo]
    alignment: int = DEFAULT_ALIGNMENT
    data_offset: int = 0  # absolute offset where the tensor data section starts
    file_size: int = 0
    kv_types: dict[str, int] = field(default_factory=dict)

    @property
    def architecture(self) -> str | None:
        arch = self.kv.get("general.architecture")
        return arch if isinstance(arch, str) else None


class _Reader:
    """A reader that knows the file size and refuses to read past it."""

    def __init__(self, fh: BinaryIO, size: int) -> None:
        self._fh = fh
        self.size = size
        self.pos = 0
        self.what = "header"  # what is being read, for error messages

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def fail(self, message: str, at: int | None = None) -> ModelFileError:
        return ModelFileError(f"{message} (at byte {self.pos if at is None else at})")

    def read(self, n: int) -> bytes:
        if n < 0 or n > self.remaining:
            raise ModelFileError(
                f"truncated at byte {self.size} while reading {self.what}: "
                f"needed {n} bytes at byte {self.pos}, file has {self.size} bytes"
            )
        data = self._fh.read(n)
        if len(data) != n:  # the file shrank under us
            raise ModelFileError(
                f"truncated at byte {self.pos + len(data)} while reading {self.what}"
            )
        self.pos += n
        return data

    def skip(self, n: int) -> None:
        if n < 0 or n > self.remaining:
            raise ModelFileError(
                f"truncated at byte {self.size} while reading {self.what}: "
                f"needed {n} bytes at byte {self.pos}, file has {self.size} bytes"
            )
        self._fh.seek(n, io.SEEK_CUR)
        self.pos += n

    def u32(self) -> int:
        return _U32.unpack(self.read(4))[0]

    def u64(self) -> int:
        return _U64.unpack(self.read(8))[0]

    def string_length(self, cap: int, label: str) -> int:
        start = self.pos
        n = self.u64()
        if n > cap:
            raise ModelFileError(
                f"{label} length {n} exceeds the limit of {cap} bytes "
                f"while reading {self.what} (at byte {start})"
            )
        if n > self.remaining:
            raise ModelFileError(
                f"{label} length {n} at byte {start} runs past end of file "
                f"(size {self.size}) while reading {self.what}"
            )
        return n

    def string(self, cap: int, label: str) -> str:
        n = self.string_length(cap, label)
        start = self.pos
        raw = self.read(n)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ModelFileError(
                f"{label} at byte {start} is not valid UTF-8 while reading {self.what}: {exc.reason}"
            ) from None

    def skip_string(self, cap: int, label: str) -> None:
        self.skip(self.string_length(cap, label))


def _read_value(r: _Reader, vtype: int, depth: int) -> Any:
    fmt = _SCALAR_FORMATS.get(vtype)
    if fmt is not None:
        value = fmt.unpack(r.read(fmt.size))[0]
        return bool(value) if vtype == GGUFValueType.BOOL else value
    if vtype == GGUFValueType.STRING:
        return r.string(MAX_STRING_LENGTH, "string")
    if vtype == GGUFValueType.ARRAY:
        return _read_array(r, depth + 1)
    raise r.fail(f"unknown value type {vtype} (valid: 0..12) while reading {r.what}", r.pos - 4)


def _read_array(r: _Reader, depth: int) -> GGUFArray:
    if depth > MAX_ARRAY_DEPTH:
        raise r.fail(f"arrays nested deeper than {MAX_ARRAY_DEPTH} while reading {r.what}")
    type_at = r.pos
    item_type = r.u32()
    if item_type not in GGUFValueType.NAMES:
        raise ModelFileError(
            f"unknown array item type {item_type} (valid: 0..12) while reading {r.what} (at byte {type_at})"
        )
    length_at = r.pos
    length = r.u64()
    min_size = _MIN_ITEM_SIZE[item_type]
    if length > r.remaining // min_size:
        raise ModelFileError(
            f"array length {length} at byte {length_at} cannot fit in the {r.remaining} bytes "
            f"left in the file (size {r.size}) while reading {r.what}"
        )
    keep = length <= KEEP_ARRAY_ITEMS and item_type != GGUFValueType.ARRAY
    fmt = _SCALAR_FORMATS.get(item_type)
    if fmt is not None:
        raw = r.read(fmt.size * length) if keep else None
        if raw is None:
            r.skip(fmt.size * length)
            return GGUFArray(item_type, length)
        values = [v for (v,) in fmt.iter_unpack(raw)]
        if item_type == GGUFValueType.BOOL:
            values = [bool(v) for v in values]
        return GGUFArray(item_type, length, tuple(values))
    if item_type == GGUFValueType.STRING:
        if keep:
            return GGUFArray(
                item_type, length,
                tuple(r.string(MAX_STRING_LENGTH, "string") for _ in range(length)),
            )
        for _ in range(length):
            r.skip_string(MAX_STRING_LENGTH, "string")
        return GGUFArray(item_type, length)
    # Array of arrays: validate every nested array, keep only the summary.
    for _ in range(length):
        _read_array(r, depth + 1)
    return GGUFArray(item_type, length)


def _open(path: str | os.PathLike[str]) -> tuple[BinaryIO, int]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ModelFileError(f"model file not found: {os.fspath(path)!s}") from None
    except OSError as exc:
        raise ModelFileError(f"cannot stat model file {os.fspath(path)!s}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ModelFileError(f"model path is a directory, not a GGUF file: {os.fspath(path)!s}")
    if not stat.S_ISREG(st.st_mode):
        raise ModelFileError(f"model path is not a regular file: {os.fspath(path)!s}")
    try:
        fh = open(path, "rb", buffering=1 << 16)  # noqa: SIM115 - closed by the caller
    except OSError as exc:
        raise ModelFileError(f"cannot open model file {os.fspath(path)!s}: {exc.strerror or exc}") from None
    return fh, st.st_size


def read_gguf(path: str | os.PathLike[str]) -> GGUFHeader:
    """Read and validate the header of the GGUF file at `path`.

    Raises `ModelFileError` (and nothing else) if the file is missing, is not a
    regular file, or violates any check; the message names the problem and the
    byte offset.
    """
    fh, size = _open(path)
    try:
        with fh:
            return _parse(_Reader(fh, size))
    except ModelFileError:
        raise
    except (struct.error, UnicodeDecodeError, OverflowError, ValueError, OSError, MemoryError) as exc:
        raise ModelFileError(f"unreadable GGUF file {os.fspath(path)!s}: {type(exc).__name__}: {exc}") from None


def _parse(r: _Reader) -> GGUFHeader:
    # --- fixed header ---------------------------------------------------
    if r.size == 0:
        raise ModelFileError("empty file: not a GGUF file (0 bytes)")
    if r.size < 4:
        raise ModelFileError(f"bad magic: not a GGUF file (only {r.size} bytes)")
    r.what = "magic"
    magic = r.read(4)
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"bad magic: not a GGUF file (first bytes {magic!r}, at byte 0)")
    r.what = "version"
    raw_version = r.read(4)
    version = _U32.unpack(raw_version)[0]
    if version not in SUPPORTED_VERSIONS:
        if struct.unpack(">I", raw_version)[0] in SUPPORTED_VERSIONS | {1}:
            raise ModelFileError("big-endian GGUF files are not supported (at byte 4)")
        if version == 1:
            raise ModelFileError("GGUF version 1 is no longer supported (at byte 4)")
        raise ModelFileError(f"unsupported GGUF version {version} (supported: 2, 3) (at byte 4)")

    r.what = "tensor count"
    tensor_count = r.u64()
    if tensor_count > MAX_TENSOR_COUNT:
        raise ModelFileError(f"tensor count {tensor_count} exceeds the limit of {MAX_TENSOR_COUNT} (at byte 8)")
    r.what = "metadata count"
    kv_count = r.u64()
    if kv_count > MAX_KV_COUNT:
        raise ModelFileError(f"metadata count {kv_count} exceeds the limit of {MAX_KV_COUNT} (at byte 16)")
    # Every kv pair takes at least 8 (key length) + 1 (key) + 4 (type) + 1 (value)
    # bytes; every tensor info at least 8 (name length) + 4 + 8 (one dim) + 4 + 8.
    if kv_count * 14 + tensor_count * 32 > r.remaining:
        raise ModelFileError(
            f"{kv_count} metadata entries and {tensor_count} tensors cannot fit in a "
            f"file of {r.size} bytes (at byte 24)"
        )

    # --- metadata -------------------------------------------------------
    kv: dict[str, Any] = {}
    kv_types: dict[str, int] = {}
    for i in range(kv_count):
        r.what = f"metadata entry {i}"
        key_at = r.pos
        key = r.string(MAX_KEY_LENGTH, "key")
        if not key:
            raise ModelFileError(f"empty key in metadata entry {i} (at byte {key_at})")
        if key in kv:
            raise ModelFileError(f"duplicate metadata key {key!r} in entry {i} (at byte {key_at})")
        r.what = f"metadata entry {i} ({key!r})"
        type_at = r.pos
        vtype = r.u32()
        if vtype not in GGUFValueType.NAMES:
            raise ModelFileError(
                f"unknown value type {vtype} (valid: 0..12) for key {key!r} (at byte {type_at})"
            )
        kv[key] = _read_value(r, vtype, 0)
        kv_types[key] = vtype

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in kv:
        a = kv["general.alignment"]
        if kv_types["general.alignment"] != GGUFValueType.UINT32:
            raise ModelFileError(
                f"general.alignment must be a UINT32, got {GGUFValueType.NAMES[kv_types['general.alignment']]}"
            )
        if a <= 0 or a & (a - 1) or a > MAX_ALIGNMENT:
            raise ModelFileError(f"general.alignment {a} is not a power of two between 1 and {MAX_ALIGNMENT}")
        alignment = a

    # --- tensor infos ---------------------------------------------------
    infos: list[tuple[str, tuple[int, ...], int, int, int]] = []  # name, shape, type, rel offset, n_bytes
    names: set[str] = set()
    for i in range(tensor_count):
        r.what = f"tensor info {i}"
        name_at = r.pos
        name = r.string(MAX_TENSOR_NAME_LENGTH, "tensor name")
        if name in names:
            raise ModelFileError(f"duplicate tensor name {name!r} in tensor info {i} (at byte {name_at})")
        names.add(name)
        r.what = f"tensor info {i} ({name!r})"
        dims_at = r.pos
        n_dims = r.u32()
        if n_dims == 0 or n_dims > MAX_DIMS:
            raise ModelFileError(
                f"tensor {name!r} has {n_dims} dimensions (allowed: 1..{MAX_DIMS}) (at byte {dims_at})"
            )
        shape: list[int] = []
        n_elements = 1
        for d in range(n_dims):
            dim_at = r.pos
            dim = r.u64()
            if dim == 0 or dim > MAX_INT64:
                raise ModelFileError(f"tensor {name!r} dimension {d} is {dim} (at byte {dim_at})")
            n_elements *= dim
            if n_elements > MAX_INT64:
                raise ModelFileError(f"tensor {name!r} has too many elements (overflow) (at byte {dim_at})")
            shape.append(dim)
        type_at = r.pos
        ggml_type = r.u32()
        t = GGML_TYPES.get(ggml_type)
        if t is None:
            raise ModelFileError(f"tensor {name!r} has unknown ggml type {ggml_type} (at byte {type_at})")
        if shape[0] % t.block_size:
            raise ModelFileError(
                f"tensor {name!r} row length {shape[0]} is not a multiple of the {t.name} "
                f"block size {t.block_size} (at byte {type_at})"
            )
        offset_at = r.pos
        rel = r.u64()
        if rel % alignment:
            raise ModelFileError(
                f"tensor {name!r} offset {rel} is not a multiple of the alignment {alignment} (at byte {offset_at})"
            )
        infos.append((name, tuple(shape), ggml_type, rel, n_elements // t.block_size * t.type_size))

    # --- data section ---------------------------------------------------
    header_end = r.pos
    data_offset = -(-header_end // alignment) * alignment
    if tensor_count and data_offset > r.size:
        raise ModelFileError(
            f"tensor data section would start at byte {data_offset}, past end of file (size {r.size})"
        )
    data_size = max(0, r.size - data_offset)
    tensors: list[GGUFTensorInfo] = []
    spans: list[tuple[int, int, str]] = []
    for name, shape, ggml_type, rel, n_bytes in infos:
        start, end = data_offset + rel, data_offset + rel + n_bytes
        if rel + n_bytes > data_size:
            raise ModelFileError(
                f"tensor {name!r} data [{start}, {end}) lies past end of file (size {r.size})"
            )
        tensors.append(GGUFTensorInfo(name, shape, ggml_type, start))
        spans.append((start, end, name))
    spans.sort()
    for (a_start, a_end, a_name), (b_start, b_end, b_name) in zip(spans, spans[1:], strict=False):
        if b_start < a_end:
            raise ModelFileError(
                f"tensors {a_name!r} [{a_start}, {a_end}) and {b_name!r} [{b_start}, {b_end}) overlap"
            )

    return GGUFHeader(
        version=version,
        tensor_count=tensor_count,
        kv=kv,
        tensors=tensors,
        alignment=alignment,
        data_offset=data_offset,
        file_size=r.size,
        kv_types=kv_types,
    )
