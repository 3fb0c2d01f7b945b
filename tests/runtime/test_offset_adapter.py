"""The Q4_1 split on small synthetic files: the paths the default model does not take."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

from runtime._offset_adapter import write_split
from runtime.encodings import NEEDS_ADAPTER_KEY

Q4_0, Q4_1, Q8_0, F16 = (GGMLQuantizationType[n] for n in ("Q4_0", "Q4_1", "Q8_0", "F16"))


def _source(path: Path, arch: str = "llama") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    values = {
        "token_embd.weight": rng.normal(size=(8, 64)).astype(np.float32),  # Q4_1, not a projection
        "blk.0.attn_q.weight": rng.normal(size=(64, 64)).astype(np.float32),
        "blk.0.attn_k.weight": rng.normal(size=(16, 64)).astype(np.float32),
        "blk.0.attn_v.weight": rng.normal(size=(16, 64)).astype(np.float32),  # F16: no fusion
        "blk.0.ffn_up.weight": rng.normal(size=(32, 96)).astype(np.float32),
    }
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_file_type(3)
    for name, x in values.items():
        if name.endswith("attn_v.weight"):
            writer.add_tensor(name, x.astype(np.float16))
        else:
            q = quantize(x, Q4_1)
            writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=Q4_1)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return values


def test_projections_split_other_q4_1_tensors_become_q8_0_and_the_rest_is_copied(tmp_path: Path) -> None:
    src, model, adapter = tmp_path / "src.gguf", tmp_path / "model.gguf", tmp_path / "adapter.gguf"
    _source(src)
    assert write_split(src, model, adapter) == 3  # attn_q, attn_k, ffn_up
    source = {t.name: t for t in GGUFReader(str(src)).tensors}
    out_reader = GGUFReader(str(model))
    out = {t.name: t for t in out_reader.tensors}
    lora = {t.name: t for t in GGUFReader(str(adapter)).tensors}
    assert NEEDS_ADAPTER_KEY in out_reader.fields
    # one of q, k, v is not Q4_1: nothing is fused, the Q4_1 ones are split alone
    assert "blk.0.attn_qkv.weight" not in out
    assert {n for n, t in out.items() if t.tensor_type == Q4_0} == {
        "blk.0.attn_q.weight",
        "blk.0.attn_k.weight",
        "blk.0.ffn_up.weight",
    }
    assert sorted(lora) == sorted(
        f"{n}.lora_{x}" for n in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_up.weight") for x in "ab"
    )
    for name in ("blk.0.attn_v.weight", "blk.0.attn_norm.weight"):
        assert out[name].tensor_type == source[name].tensor_type
        assert np.asarray(out[name].data).tobytes() == np.asarray(source[name].data).tobytes()
    embd = out["token_embd.weight"]
    assert embd.tensor_type == Q8_0
    x = dequantize(np.asarray(source["token_embd.weight"].data), Q4_1).reshape(-1, 32)
    y = dequantize(np.asarray(embd.data), Q8_0).reshape(-1, 32)
    assert (np.abs(x - y) <= np.abs(x).max(axis=1, keepdims=True) / 200).all()
    # a split projection plus its adapter's offsets is the Q4_1 matrix
    k = 96  # three blocks, padded to a rank of 32
    want = dequantize(np.asarray(source["blk.0.ffn_up.weight"].data), Q4_1).reshape(-1, k)
    codes = dequantize(np.asarray(out["blk.0.ffn_up.weight"].data), Q4_0).reshape(-1, k)
    a = dequantize(np.asarray(lora["blk.0.ffn_up.weight.lora_a"].data), Q8_0).reshape(-1, k)
    b = dequantize(np.asarray(lora["blk.0.ffn_up.weight.lora_b"].data), Q8_0).reshape(-1, a.shape[0])
    assert a.shape[0] == 32 and np.array_equal(a[:3], np.repeat(np.eye(3, dtype=np.float32), 32, axis=1))
    assert not a[3:].any()
    got = codes + b @ a
    assert np.allclose(got, want, atol=np.abs(want).max() / 100)


def test_other_architectures_are_refused(tmp_path: Path) -> None:
    src = tmp_path / "src.gguf"
    _source(src, arch="qwen2")
    with pytest.raises(ValueError, match="not split"):
        write_split(src, tmp_path / "m.gguf", tmp_path / "a.gguf")
