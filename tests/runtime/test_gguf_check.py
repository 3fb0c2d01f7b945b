"""The strict GGUF header validator and model inspection.

Valid files come from the `gguf` package's GGUFWriter and from hand-made bytes;
corrupt ones are hand-made, truncated at every offset, or fuzzed. Every bad
input must raise ModelFileError, never another exception and never a crash.
"""

from __future__ import annotations

import hashlib
import random
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runtime.errors import ModelFileError
from runtime.gguf_check import GGML_TYPES, KEEP_ARRAY_ITEMS, GGUFArray, GGUFValueType, read_gguf
from runtime.model_file import FILE_TYPE_NAMES, ModelInfo, inspect_model, sha256_file

REPO = Path(__file__).resolve().parents[2]
REAL_MODEL = REPO / ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
REAL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

T = GGUFValueType


# --- hand-made GGUF bytes ---------------------------------------------------

def s(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("<Q", len(raw)) + raw


def kv_u32(key: str, value: int) -> bytes:
    return s(key) + struct.pack("<II", T.UINT32, value)


def kv_str(key: str, value: str | bytes) -> bytes:
    return s(key) + struct.pack("<I", T.STRING) + s(value)


def kv_raw(key: str, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def tinfo(name: str | bytes, dims: list[int], ggml_type: int = 0, offset: int = 0) -> bytes:
    return (
        s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        + struct.pack("<IQ", ggml_type, offset)
    )


def gguf_bytes(
    kvs: list[bytes], tensors: list[bytes], data: bytes = b"", *, version: int = 3,
    tensor_count: int | None = None, kv_count: int | None = None, magic: bytes = b"GGUF",
    alignment: int = 32,
) -> bytes:
    body = (
        magic + struct.pack("<I", version)
        + struct.pack("<Q", len(tensors) if tensor_count is None else tensor_count)
        + struct.pack("<Q", len(kvs) if kv_count is None else kv_count)
        + b"".join(kvs) + b"".join(tensors)
    )
    return body + b"\0" * (-len(body) % alignment) + data


BASE_KVS = [
    kv_str("general.architecture", "llama"),
    kv_str("general.name", "tiny"),
    kv_u32("llama.block_count", 2),
    kv_u32("llama.context_length", 128),
    kv_u32("general.file_type", 0),
    kv_str("tokenizer.chat_template", "{{ messages }}"),
]


def valid_bytes() -> bytes:
    """Two F32 tensors: a[8] at 0 (32 bytes) and b[4, 2] at 32 (32 bytes)."""
    return gguf_bytes(BASE_KVS, [tinfo("a", [8], 0, 0), tinfo("b", [4, 2], 0, 32)], bytes(range(64)))


def write(tmp_path: Path, data: bytes, name: str = "m.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def bad(tmp_path: Path, data: bytes, *fragments: str) -> str:
    """Assert `data` is rejected with a ModelFileError whose message has every fragment."""
    with pytest.raises(ModelFileError) as info:
        read_gguf(write(tmp_path, data))
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- files written by the gguf package ----------------------------------------

def writer_file(tmp_path: Path, *, name: str = "w.gguf", alignment: int | None = None,
                file_type: int | None = 7, template: str | None = "{% for m in messages %}{{ m.content }}{% endfor %}",
                big_vocab: bool = True) -> Path:
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter

    path = tmp_path / name
    w = GGUFWriter(path, "llama")
    w.add_name("writer-test")
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    if file_type is not None:
        w.add_file_type(file_type)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    if template is not None:
        w.add_chat_template(template)
    w.add_bool("test.flag", True)
    w.add_float32("test.eps", 1e-5)
    w.add_int64("test.neg", -5)
    w.add_array("test.small_ints", [1, 2, 3])
    w.add_array("test.small_strs", ["x", "yy"])
    if big_vocab:
        w.add_token_list([f"tok{i}" for i in range(KEEP_ARRAY_ITEMS + 10)])
    w.add_tensor("token_embd.weight", np.ones((16, 64), dtype=np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float16))
    # a Q8_0 tensor: 2 rows of 64 values = 2 blocks a row, 34 bytes a block
    w.add_tensor("blk.0.attn_q.weight", np.zeros((2, 2 * 34), dtype=np.uint8), raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_writer_file_parses(tmp_path: Path) -> None:
    from gguf import GGUFReader

    path = writer_file(tmp_path)
    h = read_gguf(path)
    assert h.version == 3 and h.tensor_count == 3 and h.alignment == 32
    assert h.kv["general.architecture"] == "llama"
    assert h.kv["llama.context_length"] == 256
    assert h.kv["test.flag"] is True
    assert h.kv["test.eps"] == pytest.approx(1e-5)
    assert h.kv["test.neg"] == -5
    assert h.kv["test.small_ints"] == GGUFArray(T.INT32, 3, (1, 2, 3))
    assert h.kv["test.small_strs"].values == ("x", "yy")
    tokens = h.kv["tokenizer.ggml.tokens"]
    assert (tokens.item_type, len(tokens), tokens.values) == (T.STRING, KEEP_ARRAY_ITEMS + 10, None)
    by_name = {t.name: t for t in h.tensors}
    assert by_name["token_embd.weight"].shape == (64, 16)
    assert by_name["blk.0.attn_norm.weight"].type_name == "F16"
    q = by_name["blk.0.attn_q.weight"]
    assert (q.type_name, q.shape, q.n_elements, q.n_bytes) == ("Q8_0", (64, 2), 128, 136)
    # the gguf package's own reader agrees on where every tensor's data is
    reference = {t.name: t for t in GGUFReader(path).tensors}
    for t in h.tensors:
        assert t.offset == int(reference[t.name].data_offset)
        assert t.n_bytes == int(reference[t.name].n_bytes)
        assert t.offset % h.alignment == 0 and h.data_offset % h.alignment == 0


def test_writer_file_with_custom_alignment(tmp_path: Path) -> None:
    h = read_gguf(writer_file(tmp_path, alignment=256))
    assert h.alignment == 256 and h.data_offset % 256 == 0
    assert all(t.offset % 256 == 0 for t in h.tensors)


def test_writer_file_truncated_everywhere(tmp_path: Path) -> None:
    path = writer_file(tmp_path, big_vocab=False)
    data = path.read_bytes()
    # the writer pads after the last tensor; cutting that padding off is harmless
    end = max(t.offset + t.n_bytes for t in read_gguf(path).tensors)
    assert end < len(data)
    cuts = sorted(set(range(0, min(end, 2048))) | set(range(0, end, 7)) | {end - 1})
    for cut in cuts:
        path = write(tmp_path, data[:cut], "cut.gguf")
        with pytest.raises(ModelFileError):
            read_gguf(path)
    assert read_gguf(write(tmp_path, data[:end], "cut.gguf")).tensor_count == 3


def test_ggml_type_table_matches_gguf_package() -> None:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    ours = {i: (t.name, t.block_size, t.type_size) for i, t in GGML_TYPES.items()}
    theirs = {int(q): (q.name, *GGML_QUANT_SIZES[q]) for q in GGMLQuantizationType if q in GGML_QUANT_SIZES}
    assert ours == theirs


def test_file_type_names_match_gguf_package() -> None:
    from gguf import LlamaFileType

    theirs = {int(f): f.name.removeprefix("MOSTLY_").removeprefix("ALL_") for f in LlamaFileType if f != 1024}
    assert FILE_TYPE_NAMES == theirs


# --- hand-made files ----------------------------------------------------------

def test_hand_made_file_parses(tmp_path: Path) -> None:
    data = valid_bytes()
    h = read_gguf(write(tmp_path, data))
    assert h.file_size == len(data)
    assert [(t.name, t.shape, t.ggml_type, t.offset - h.data_offset) for t in h.tensors] == [
        ("a", (8,), 0, 0), ("b", (4, 2), 0, 32)]
    assert h.data_offset + 64 == len(data)
    assert h.architecture == "llama"


def test_version_2_is_accepted(tmp_path: Path) -> None:
    assert read_gguf(write(tmp_path, gguf_bytes(BASE_KVS, [], version=2))).version == 2


def test_no_tensors_is_valid(tmp_path: Path) -> None:
    h = read_gguf(write(tmp_path, gguf_bytes(BASE_KVS, [])))
    assert h.tensors == [] and h.tensor_count == 0


def test_truncated_at_every_offset(tmp_path: Path) -> None:
    data = valid_bytes()
    messages = []
    for cut in range(len(data)):
        path = write(tmp_path, data[:cut], "cut.gguf")
        try:
            read_gguf(path)
        except ModelFileError as exc:
            messages.append(str(exc))
        else:
            pytest.fail(f"a file cut at byte {cut} of {len(data)} was accepted")
    assert any("truncated at byte" in m and "tensor info 1" in m for m in messages)
    assert any("lies past end of file" in m for m in messages)


def test_empty_file(tmp_path: Path) -> None:
    bad(tmp_path, b"", "empty file")


def test_tiny_file(tmp_path: Path) -> None:
    bad(tmp_path, b"GGU", "not a GGUF file")


def test_bad_magic(tmp_path: Path) -> None:
    bad(tmp_path, b"GGML" + valid_bytes()[4:], "bad magic: not a GGUF file")
    bad(tmp_path, b"PK\x03\x04" + bytes(100), "bad magic")


@pytest.mark.parametrize("version", [0, 1, 4, 99, 2**32 - 1])
def test_unsupported_version(tmp_path: Path, version: int) -> None:
    bad(tmp_path, gguf_bytes(BASE_KVS, [], version=version), "version", "at byte 4")


def test_big_endian_is_named(tmp_path: Path) -> None:
    data = b"GGUF" + struct.pack(">I", 3) + struct.pack(">QQ", 0, 0)
    bad(tmp_path, data, "big-endian")


@pytest.mark.parametrize("count", [2**60, 2**64 - 1, (1 << 20) + 1])
def test_absurd_tensor_count(tmp_path: Path, count: int) -> None:
    bad(tmp_path, gguf_bytes(BASE_KVS, [], tensor_count=count), "tensor count", "exceeds")


@pytest.mark.parametrize("count", [2**60, 2**64 - 1, (1 << 16) + 1])
def test_absurd_kv_count(tmp_path: Path, count: int) -> None:
    bad(tmp_path, gguf_bytes(BASE_KVS, [], kv_count=count), "metadata count", "exceeds")


def test_counts_that_cannot_fit_in_the_file(tmp_path: Path) -> None:
    bad(tmp_path, gguf_bytes(BASE_KVS, [], tensor_count=50_000), "cannot fit")
    bad(tmp_path, gguf_bytes(BASE_KVS, [], kv_count=60_000), "cannot fit")


def test_key_length_past_eof(tmp_path: Path) -> None:
    kv = struct.pack("<Q", 2**40) + b"general.architecture"
    bad(tmp_path, gguf_bytes([kv], []), "key length", "exceeds the limit")
    kv = struct.pack("<Q", 5000) + b"general.architecture"
    bad(tmp_path, gguf_bytes([kv], []), "runs past end of file", "at byte 24")


def test_string_value_length_past_eof(tmp_path: Path) -> None:
    kv = s("tokenizer.chat_template") + struct.pack("<IQ", T.STRING, 10_000) + b"{{ x }}"
    bad(tmp_path, gguf_bytes(BASE_KVS[:1] + [kv], []), "string length 10000", "past end of file", "metadata entry 1")


def test_string_value_over_the_cap(tmp_path: Path) -> None:
    kv = s("tokenizer.chat_template") + struct.pack("<IQ", T.STRING, (1 << 26) + 1)
    bad(tmp_path, gguf_bytes([kv], []), "exceeds the limit")


@pytest.mark.parametrize("length", [2**62, 2**64 - 1, 10_000])
def test_absurd_array_length(tmp_path: Path, length: int) -> None:
    kv = kv_raw("tokenizer.ggml.tokens", T.ARRAY, struct.pack("<IQ", T.STRING, length) + s("a"))
    bad(tmp_path, gguf_bytes(BASE_KVS + [kv], []), f"array length {length}", "cannot fit")


def test_array_string_past_eof(tmp_path: Path) -> None:
    kv = kv_raw("tokenizer.ggml.tokens", T.ARRAY, struct.pack("<IQ", T.STRING, 2) + s("a") + struct.pack("<Q", 99))
    bad(tmp_path, gguf_bytes([kv], []), "past end of file")


@pytest.mark.parametrize("vtype", [13, 255, 2**32 - 1])
def test_unknown_value_type(tmp_path: Path, vtype: int) -> None:
    kv = kv_raw("x.y", vtype, b"\0" * 8)
    bad(tmp_path, gguf_bytes(BASE_KVS + [kv], []), f"unknown value type {vtype}", "'x.y'", "at byte")


def test_unknown_array_item_type(tmp_path: Path) -> None:
    kv = kv_raw("x.y", T.ARRAY, struct.pack("<IQ", 77, 1) + b"\0" * 8)
    bad(tmp_path, gguf_bytes([kv], []), "unknown array item type 77")


def test_nested_arrays(tmp_path: Path) -> None:
    inner = struct.pack("<IQ", T.UINT8, 2) + b"\1\2"
    ok = kv_raw("x.nested", T.ARRAY, struct.pack("<IQ", T.ARRAY, 2) + inner + inner)
    h = read_gguf(write(tmp_path, gguf_bytes([ok], [])))
    assert h.kv["x.nested"] == GGUFArray(T.ARRAY, 2)
    deep = kv_raw("x.deep", T.ARRAY, struct.pack("<IQ", T.ARRAY, 1) + struct.pack("<IQ", T.ARRAY, 1) + inner)
    bad(tmp_path, gguf_bytes([deep], []), "nested deeper")


def test_duplicate_key(tmp_path: Path) -> None:
    bad(tmp_path, gguf_bytes(BASE_KVS + [kv_u32("llama.block_count", 3)], []), "duplicate metadata key")


def test_invalid_utf8_key(tmp_path: Path) -> None:
    bad(tmp_path, gguf_bytes([s(b"\xff\xfe") + struct.pack("<II", T.UINT32, 1)], []), "not valid UTF-8")


def test_invalid_utf8_value(tmp_path: Path) -> None:
    bad(tmp_path, gguf_bytes([kv_str("general.name", b"\xc3\x28")], []), "not valid UTF-8")


@pytest.mark.parametrize("ggml_type", [4, 5, 31, 42, 999, 2**32 - 1])
def test_unknown_ggml_type(tmp_path: Path, ggml_type: int) -> None:
    data = gguf_bytes(BASE_KVS, [tinfo("a", [32], ggml_type, 0)], bytes(1024))
    bad(tmp_path, data, f"unknown ggml type {ggml_type}", "'a'")


@pytest.mark.parametrize("n_dims", [0, 5, 9, 2**32 - 1])
def test_bad_n_dims(tmp_path: Path, n_dims: int) -> None:
    ti = s("a") + struct.pack("<I", n_dims) + struct.pack("<Q", 1) * 9 + struct.pack("<IQ", 0, 0)
    bad(tmp_path, gguf_bytes(BASE_KVS, [ti], bytes(64)), f"{n_dims} dimensions")


def test_zero_dimension(tmp_path: Path) -> None:
    bad(tmp_path, gguf_bytes(BASE_KVS, [tinfo("a", [8, 0])], bytes(64)), "dimension 1 is 0")


def test_element_count_overflow(tmp_path: Path) -> None:
    bad(tmp_path, gguf_bytes(BASE_KVS, [tinfo("a", [2**40, 2**40])], bytes(64)), "too many elements")


def test_row_not_a_multiple_of_block_size(tmp_path: Path) -> None:
    bad(tmp_path, gguf_bytes(BASE_KVS, [tinfo("a", [10], 3)], bytes(64)), "not a multiple of the Q4_1 block size 32")


def test_tensor_name_too_long(tmp_path: Path) -> None:
    bad(tmp_path, gguf_bytes(BASE_KVS, [tinfo("n" * 64, [8])], bytes(64)), "tensor name length 64 exceeds")


def test_duplicate_tensor_name(tmp_path: Path) -> None:
    data = gguf_bytes(BASE_KVS, [tinfo("a", [8], 0, 0), tinfo("a", [8], 0, 32)], bytes(64))
    bad(tmp_path, data, "duplicate tensor name 'a'")


def test_tensor_offset_past_end(tmp_path: Path) -> None:
    data = gguf_bytes(BASE_KVS, [tinfo("a", [8], 0, 0), tinfo("b", [8], 0, 4096)], bytes(64))
    msg = bad(tmp_path, data, "tensor 'b' data [", "lies past end of file (size")
    assert str(len(data)) in msg


def test_tensor_larger_than_file(tmp_path: Path) -> None:
    bad(tmp_path, gguf_bytes(BASE_KVS, [tinfo("a", [1 << 40])], bytes(64)), "lies past end of file")


def test_huge_offset(tmp_path: Path) -> None:
    bad(tmp_path, gguf_bytes(BASE_KVS, [tinfo("a", [8], 0, 2**64 - 32)], bytes(64)), "past end of file")


def test_overlapping_tensors(tmp_path: Path) -> None:
    data = gguf_bytes(BASE_KVS, [tinfo("a", [16], 0, 0), tinfo("b", [8], 0, 32)], bytes(96))
    bad(tmp_path, data, "'a'", "'b'", "overlap")


def test_misaligned_offset(tmp_path: Path) -> None:
    data = gguf_bytes(BASE_KVS, [tinfo("a", [8], 0, 0), tinfo("b", [4], 0, 36)], bytes(96))
    bad(tmp_path, data, "offset 36 is not a multiple of the alignment 32")


def test_custom_alignment_applies_to_offsets(tmp_path: Path) -> None:
    kvs = BASE_KVS + [kv_u32("general.alignment", 64)]
    ok = gguf_bytes(kvs, [tinfo("a", [8], 0, 0), tinfo("b", [8], 0, 64)], bytes(96), alignment=64)
    assert read_gguf(write(tmp_path, ok)).alignment == 64
    misaligned = gguf_bytes(kvs, [tinfo("a", [8], 0, 0), tinfo("b", [8], 0, 32)], bytes(96), alignment=64)
    bad(tmp_path, misaligned, "alignment 64")


@pytest.mark.parametrize("alignment", [0, 3, 48, 1 << 30])
def test_bad_alignment_value(tmp_path: Path, alignment: int) -> None:
    bad(tmp_path, gguf_bytes(BASE_KVS + [kv_u32("general.alignment", alignment)], []), "general.alignment")


def test_alignment_of_wrong_type(tmp_path: Path) -> None:
    kv = kv_raw("general.alignment", T.UINT64, struct.pack("<Q", 32))
    bad(tmp_path, gguf_bytes([kv], []), "must be a UINT32")


def test_data_section_past_end(tmp_path: Path) -> None:
    unpadded = gguf_bytes(BASE_KVS, [tinfo("a", [8])], alignment=1)  # no padding, no data
    assert len(unpadded) % 32
    bad(tmp_path, unpadded, "data section would start at byte", "past end of file")


def test_directory_path(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="directory"):
        read_gguf(tmp_path)


def test_nonexistent_path(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not found"):
        read_gguf(tmp_path / "nope.gguf")
    with pytest.raises(ModelFileError):
        inspect_model(tmp_path / "nope.gguf")
    with pytest.raises(ModelFileError):
        sha256_file(tmp_path / "nope.gguf")


def test_special_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not a regular file"):
        read_gguf("/dev/null")


def test_fuzzed_mutations_only_raise_model_file_error(tmp_path: Path) -> None:
    rng = random.Random(20240611)
    seeds = [valid_bytes(), writer_file(tmp_path, big_vocab=False).read_bytes()]
    accepted = rejected = 0
    for _ in range(300):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(len(data))
            data[pos] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        if rng.random() < 0.2:
            data = data[: rng.randrange(len(data) + 1)]
        path = write(tmp_path, bytes(data), "fuzz.gguf")
        try:
            read_gguf(path)
            accepted += 1
        except ModelFileError:
            rejected += 1
        # any other exception fails the test with its traceback
    assert accepted + rejected == 300 and rejected > 0


def test_validator_in_a_subprocess_exits_normally(tmp_path: Path) -> None:
    """Corrupt files never take the process down (no segfault, no uncaught error)."""
    corrupt = {
        "empty": b"",
        "magic": b"NOPE" + bytes(60),
        "counts": gguf_bytes(BASE_KVS, [], tensor_count=2**63, kv_count=2**63),
        "string": s("k") + struct.pack("<IQ", T.STRING, 2**63),
        "array": gguf_bytes([kv_raw("k", T.ARRAY, struct.pack("<IQ", T.UINT64, 2**61))], []),
        "tensor": gguf_bytes(BASE_KVS, [tinfo("a", [2**31, 2**31], 0, 2**63)], bytes(64)),
        "truncated": valid_bytes()[:150],
    }
    paths = [write(tmp_path, data, f"{name}.gguf") for name, data in corrupt.items()]
    code = textwrap.dedent("""
        import sys
        from runtime.errors import ModelFileError
        from runtime.gguf_check import read_gguf
        for path in sys.argv[1:]:
            try:
                read_gguf(path)
            except ModelFileError as exc:
                print("rejected", path, exc)
            else:
                print("accepted", path)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code, *map(str, paths)], cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("rejected") == len(paths), proc.stdout


# --- inspect_model ------------------------------------------------------------

def test_inspect_writer_file(tmp_path: Path) -> None:
    path = writer_file(tmp_path)
    info = inspect_model(path)
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == sha256_file(path)
    assert info.size_bytes == path.stat().st_size
    assert info.architecture == "llama" and info.name == "writer-test"
    assert info.parameter_count == 16 * 64 + 64 + 128
    assert info.quantization == "Q8_0"  # general.file_type 7
    assert (info.context_length, info.block_count) == (256, 2)
    assert info.has_chat_template and "messages" in (info.chat_template or "")
    assert info.kv_cache_bytes(100) == 2 * 2 * 100 * 2 * 16 * 2


def test_inspect_without_file_type_uses_dominant_tensor_type(tmp_path: Path) -> None:
    info = inspect_model(writer_file(tmp_path, file_type=None, template=None))
    assert info.quantization == "F32"  # 1024 F32 weights beat 128 Q8_0 and 64 F16
    assert info.has_chat_template is False and info.chat_template is None


def test_inspect_requires_architecture(tmp_path: Path) -> None:
    path = write(tmp_path, gguf_bytes([kv_u32("llama.block_count", 1)], []))
    with pytest.raises(ModelFileError, match="general.architecture"):
        inspect_model(path)


def test_inspect_checks_expected_sha256(tmp_path: Path) -> None:
    path = write(tmp_path, valid_bytes())
    with pytest.raises(ModelFileError, match="sha256 mismatch"):
        inspect_model(path, expected_sha256="0" * 64)
    digest = hashlib.sha256(valid_bytes()).hexdigest()
    assert inspect_model(path, expected_sha256=digest.upper()).sha256 == digest


def test_inspect_hand_made(tmp_path: Path) -> None:
    info = inspect_model(write(tmp_path, valid_bytes()))
    assert info == ModelInfo(
        path=str((tmp_path / "m.gguf").resolve()), size_bytes=len(valid_bytes()),
        sha256=hashlib.sha256(valid_bytes()).hexdigest(), architecture="llama", parameter_count=16,
        quantization="F32", context_length=128, has_chat_template=True, chat_template="{{ messages }}",
        name="tiny", block_count=2,
    )


@pytest.mark.skipif(not REAL_MODEL.exists(), reason="default model not fetched")
def test_real_default_model() -> None:
    h = read_gguf(REAL_MODEL)
    assert h.version == 3 and h.tensor_count == len(h.tensors) == 272
    assert len(h.kv["tokenizer.ggml.tokens"]) == 49152
    info = inspect_model(REAL_MODEL)
    assert info.sha256 == REAL_SHA256
    assert info.size_bytes == 98_362_432
    assert info.architecture == "llama"
    assert info.quantization == "Q4_1"
    assert info.context_length == 8192  # llama.context_length in the file's metadata
    assert info.block_count == 30
    assert info.has_chat_template and "<|im_start|>" in (info.chat_template or "")
    assert info.parameter_count == 134_515_008
    assert (info.embedding_length, info.head_count, info.head_count_kv) == (576, 9, 3)
