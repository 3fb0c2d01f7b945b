"""Q4_1 weights split into Q4_0 plus an adapter that adds back each block's offset.

A Q4_1 block of 32 weights stores a scale d, a minimum m and 4-bit codes q, and means
w = d*q + m. A Q4_0 block stores d and q and means w = d*(q - 8). Block by block, then,

    W = Q4_0(d, q) + C (x) 1_32,    C[n, b] = m + 8d of row n's block b,

and for an input x, W.x = Q4_0(d, q).x + C.s(x), where s(x)[b] is the sum of x over block b.
The second term is a product of rank K/32, which is what llama.cpp's LoRA adapters compute:
B.(A.x) with A the block-sum matrix and B = C. The codes and scales move unchanged.

Why bother: ggml repacks Q4_0 into an interleaved layout with AVX2/AVX-512 matrix kernels.
Q4_1 has no batched CPU kernel at all, and Q8_0 (the other re-encoding, `runtime.weights`)
has only llamafile's tinyBLAS on x86. On this project's 2-core machine a decode step of 8
sequences took 22 ms in Q8_0 and 13 ms split this way (`docs/performance.md`).

The adapter's A and B are stored as Q8_0 too: in F16 or F32 they run at float speed and
took 3-5 ms more per 8-row step. A is exact in Q8_0 (scale 1, codes 0 or 1). B's rounding
moves an offset by under 1/200 of the largest offset in its row; the Q8_0 re-encoding moves
every weight by up to 1/254 of its block's largest, and offsets are smaller than weights. The rank is padded with zeros to a whole Q8_0 block.

Only the per-layer projections are split; they are what the llama graph multiplies through
`build_lora_mm`, and q, k and v are fused into one `attn_qkv` (one product and one adapter
instead of three). Any other Q4_1 tensor (an embedding table, say) is re-encoded as Q8_0.
Architectures other than llama are not split (`SPLIT_ARCHITECTURES`).

Runs in the re-encoding child process (`python -m runtime.weights`); imports numpy and gguf.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from runtime.encodings import NEEDS_ADAPTER_KEY, SPLIT_ARCHITECTURES

__all__ = ["NEEDS_ADAPTER_KEY", "SPLIT_ARCHITECTURES", "block_offsets", "write_split"]

# Written into the split model: without its adapter it loads fine and answers garbage.


_BLOCK = 32
_Q4_1_BYTES = 20  # f16 d, f16 m, 16 bytes of codes
_Q8_0_BYTES = 34  # f16 d, 32 int8 codes
_FTYPE_Q4_0 = 2
_PROJECTION = re.compile(r"blk\.(\d+)\.(attn_q|attn_k|attn_v|attn_qkv|attn_output|ffn_gate|ffn_up|ffn_down)\.weight")
_QKV = ("attn_q", "attn_k", "attn_v")


def block_offsets(q4_1: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Split raw Q4_1 rows (N x K/32*20 bytes) into raw Q4_0 rows and the offsets C (N x K/32)."""
    blocks = q4_1.reshape(-1, k // _BLOCK, _Q4_1_BYTES)
    d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    q4_0 = np.concatenate([blocks[:, :, 0:2], blocks[:, :, 4:]], axis=2).reshape(len(blocks), -1)
    return q4_0, m + 8.0 * d


def _rank(k: int) -> int:
    blocks = k // _BLOCK
    return -(-blocks // _BLOCK) * _BLOCK


def _block_sum_matrix(k: int) -> np.ndarray:
    """A as raw Q8_0 rows (rank x K): row b sums input block b, padding rows are zero."""
    rank, blocks = _rank(k), k // _BLOCK
    a = np.zeros((rank, blocks, _Q8_0_BYTES), np.uint8)
    one = np.array([1.0], np.float16).view(np.uint8)
    for b in range(blocks):
        a[b, b, 0:2] = one
        a[b, b, 2:] = 1
    return a.reshape(rank, -1)


def _pad(c: np.ndarray, rank: int) -> np.ndarray:
    out = np.zeros((c.shape[0], rank), np.float32)
    out[:, : c.shape[1]] = c
    return out


def write_split(source: str | Path, model_dest: str | Path, adapter_dest: str | Path) -> int:
    """Write the split model and its adapter. Returns the number of projections split."""
    import gguf
    from gguf.quants import dequantize, quantize

    reader = gguf.GGUFReader(str(source))
    arch = str(reader.fields["general.architecture"].contents())
    if arch not in SPLIT_ARCHITECTURES:
        raise ValueError(f"architecture {arch!r} is not split (only {sorted(SPLIT_ARCHITECTURES)})")
    model = gguf.GGUFWriter(str(model_dest), arch)
    adapter = gguf.GGUFWriter(str(adapter_dest), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            model.add_key_value(key, field.contents(), kind, sub_type=field.types[-1])
        else:
            model.add_key_value(key, field.contents(), kind)
    model.add_file_type(_FTYPE_Q4_0)
    model.add_bool(NEEDS_ADAPTER_KEY, True)
    adapter.add_type(gguf.GGUFType.ADAPTER)
    adapter.add_string(gguf.Keys.Adapter.TYPE, "lora")

    q4_1, q8_0, q4_0 = (gguf.GGMLQuantizationType[n] for n in ("Q4_1", "Q8_0", "Q4_0"))

    def emit(name: str, k: int, rows: np.ndarray, offsets: np.ndarray) -> None:
        model.add_tensor(name, rows, raw_shape=rows.shape, raw_dtype=q4_0)
        a = _block_sum_matrix(k)
        b = quantize(_pad(offsets, _rank(k)), q8_0)
        adapter.add_tensor(f"{name}.lora_a", a, raw_shape=a.shape, raw_dtype=q8_0)
        adapter.add_tensor(f"{name}.lora_b", b, raw_shape=b.shape, raw_dtype=q8_0)

    tensors = {t.name: t for t in reader.tensors}
    split = 0
    fused: set[str] = set()
    for t in reader.tensors:
        data: Any = np.asarray(t.data)
        match = _PROJECTION.fullmatch(t.name)
        if match is None or t.tensor_type != q4_1 or len(t.shape) != 2:
            if t.tensor_type == q4_1:  # not a projection: no adapter applies, so Q8_0
                k = int(t.shape[0])
                values = dequantize(data, q4_1).reshape(-1, k)
                data = quantize(values, q8_0)
                model.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=q8_0)
            else:
                model.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=t.tensor_type)
            continue
        layer, role = match.groups()
        k = int(t.shape[0])
        if role in _QKV:
            parts = [tensors.get(f"blk.{layer}.{r}.weight") for r in _QKV]
            if all(p is not None and p.tensor_type == q4_1 and int(p.shape[0]) == k for p in parts):
                if layer not in fused:
                    fused.add(layer)
                    pieces = [block_offsets(np.asarray(p.data), k) for p in parts if p is not None]
                    emit(
                        f"blk.{layer}.attn_qkv.weight",
                        k,
                        np.concatenate([rows for rows, _ in pieces]),
                        np.concatenate([c for _, c in pieces]),
                    )
                    split += 1
                continue
        emit(t.name, k, *block_offsets(data, k))
        split += 1
    for writer in (model, adapter):
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return split
