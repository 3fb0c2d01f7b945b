"""Serving weights: the CPU re-encodings of Q4_1 models (Q4_0 codes plus block offsets, or
Q8_0), their cache, and their failures."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from runtime._native import Model
from runtime.encodings import NEEDS_ADAPTER_KEY, remove_encoded
from runtime.errors import ModelLoadError
from runtime.model_file import inspect_model, sha256_file
from runtime.weights import ServedWeights, encoding_for, original_weights, serve_weights

Q4_0, Q4_1, Q8_0 = GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0


@pytest.fixture(scope="module")
def info(model_path: str):
    return inspect_model(model_path)


@pytest.fixture(scope="module")
def q8_weights(info, tmp_path_factory: pytest.TempPathFactory) -> ServedWeights:
    return serve_weights(info, tmp_path_factory.mktemp("q8"), mode="q8_0")


def test_which_files_are_reencoded_and_how(info) -> None:
    assert info.quantization == "Q4_1" and info.architecture == "llama"
    assert encoding_for(info, mode="auto", on_gpu=False) == "q4_0_offsets"
    assert encoding_for(info, mode="q8_0", on_gpu=False) == "q8_0"
    assert encoding_for(info, mode="original", on_gpu=False) is None
    assert encoding_for(info, mode="auto", on_gpu=True) is None
    # the split is only made where the llama graph is known to apply it
    assert encoding_for(dataclasses.replace(info, architecture="qwen2"), mode="auto", on_gpu=False) == "q8_0"
    assert encoding_for(dataclasses.replace(info, quantization="Q5_1"), mode="auto", on_gpu=False) == "q8_0"
    for kept in ("Q8_0", "Q4_0", "Q4_K_M", "F16"):
        for mode in ("auto", "q8_0"):
            assert encoding_for(dataclasses.replace(info, quantization=kept), mode=mode, on_gpu=False) is None


def _offsets(adapter: dict, name: str, k: int) -> np.ndarray:
    """C of one projection, read back from its adapter (checking A is the block-sum matrix)."""
    a = dequantize(np.asarray(adapter[f"{name}.lora_a"].data), Q8_0).reshape(-1, k)
    blocks = k // 32
    expected_a = np.zeros_like(a)
    for b in range(blocks):
        expected_a[b, b * 32 : (b + 1) * 32] = 1.0
    assert np.array_equal(a, expected_a), name  # exact: ones and zeros, padding rows zero
    c = dequantize(np.asarray(adapter[f"{name}.lora_b"].data), Q8_0).reshape(-1, a.shape[0])
    assert not c[:, blocks:].any(), name
    return c[:, :blocks]


def test_the_split_is_q4_1_exactly_but_for_the_rounding_of_the_offsets(served_weights, model_path: str) -> None:
    source, split = GGUFReader(model_path), GGUFReader(served_weights.path)
    adapter = {t.name: t for t in GGUFReader(served_weights.adapter_path).tensors}
    assert set(source.fields) - {"general.file_type"} <= set(split.fields)
    for key in ("tokenizer.chat_template", "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "llama.context_length"):
        assert [bytes(p) for p in source.fields[key].parts] == [bytes(p) for p in split.fields[key].parts], key
    assert int(split.fields["general.file_type"].parts[-1][0]) == 2  # LLAMA_FTYPE_MOSTLY_Q4_0
    assert NEEDS_ADAPTER_KEY in split.fields
    before = {t.name: t for t in source.tensors}
    after = {t.name: t for t in split.tensors}
    layers = int(source.fields["llama.block_count"].parts[-1][0])
    for layer in range(layers):  # q, k and v are one fused product
        for role in ("attn_q", "attn_k", "attn_v"):
            assert f"blk.{layer}.{role}.weight" not in after
        assert f"blk.{layer}.attn_qkv.weight" in after
    checked = 0
    for name, new in after.items():
        if new.tensor_type != Q4_0:  # the Q8_0 embeddings and F32 norms are copied, byte for byte
            assert np.asarray(new.data).tobytes() == np.asarray(before[name].data).tobytes(), name
            continue
        parts = (
            [before[name.replace("attn_qkv", r)] for r in ("attn_q", "attn_k", "attn_v")]
            if "qkv" in name
            else [before[name]]
        )
        assert all(p.tensor_type == Q4_1 for p in parts)
        checked += len(parts)
        if checked % 5 > 2:  # a sample of tensors keeps the test quick; every kind is covered
            continue
        k = int(new.shape[0])
        want = np.concatenate([dequantize(np.asarray(p.data), Q4_1).reshape(-1, k) for p in parts])
        codes = dequantize(np.asarray(new.data), Q4_0).reshape(-1, k)
        blocks = np.concatenate([np.asarray(p.data).reshape(-1, k // 32, 20) for p in parts])
        d, m = (blocks[:, :, i : i + 2].copy().view(np.float16)[..., 0].astype(np.float32) for i in (0, 2))
        exact = m + 8 * d
        # the codes and scales moved unchanged: with the exact offsets, every weight is Q4_1's
        assert np.array_equal(codes + np.repeat(exact, 32, axis=1), want), name
        # the adapter stores the offsets in Q8_0: half a step of 1/127 of the row's largest,
        # plus the rounding of the f16 scale
        c = _offsets(adapter, name, k)
        assert (np.abs(c - exact) <= np.abs(exact).max(axis=1, keepdims=True) / 200).all(), name
    assert checked == 210
    assert served_weights.sha256 == sha256_file(served_weights.path)
    assert served_weights.adapter_sha256 == sha256_file(served_weights.adapter_path)
    assert served_weights.source_sha256 == inspect_model(model_path).sha256


def test_the_split_model_refuses_to_load_without_its_adapter(served_weights) -> None:
    with pytest.raises(ModelLoadError, match="without their block offsets"):
        Model(served_weights.path)


def _next_token_logprobs(weights: ServedWeights, text: str) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(weights.path, lora_path=weights.adapter_path or None, n_ctx=512, logits_all=True, verbose=False)
    try:
        tokens = llm.tokenize(text.encode())
        llm.eval(tokens)
        logits = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()
    logits -= logits.max(axis=1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


def test_the_split_predicts_as_the_registered_file_does(info, served_weights, q8_weights) -> None:
    text = (
        "The office will be closed on Friday for maintenance of the heating system. Staff who need "
        "access to the building should contact the facilities team before Thursday noon. The car "
        "park remains open, and deliveries will be held at the front desk until Monday morning."
    )
    ref = _next_token_logprobs(original_weights(info), text)
    kl = {}
    for weights in (served_weights, q8_weights):
        other = _next_token_logprobs(weights, text)
        kl[weights.encoding] = float((np.exp(ref) * (ref - other)).sum(axis=1).mean())
        assert (ref.argmax(axis=1) == other.argmax(axis=1)).mean() >= 0.9, weights.encoding
    # as close to the file as llama.cpp's own Q8_0 re-encoding (both about 0.005 nats here)
    assert kl["q4_0_offsets"] < 0.02 and kl["q4_0_offsets"] < 2 * kl["q8_0"], kl


def test_the_q8_0_reencoding_keeps_every_weight_within_half_a_percent_of_its_block(q8_weights, model_path: str) -> None:
    source, served = GGUFReader(model_path), GGUFReader(q8_weights.path)
    assert set(source.fields) <= set(served.fields)
    assert int(served.fields["general.file_type"].parts[-1][0]) == 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    before = {t.name: t for t in source.tensors}
    after = {t.name: t for t in served.tensors}
    assert before.keys() == after.keys()
    reencoded = 0
    for name, old in before.items():
        new = after[name]
        if old.tensor_type == Q4_1:
            assert new.tensor_type == Q8_0, name
            reencoded += 1
            if reencoded % 7:
                continue
            x = dequantize(np.asarray(old.data), old.tensor_type).reshape(-1, 32)
            y = dequantize(np.asarray(new.data), new.tensor_type).reshape(-1, 32)
            amax = np.abs(x).max(axis=1, keepdims=True)
            assert (np.abs(x - y) <= 0.005 * amax + 1e-12).all(), name
        else:
            assert np.asarray(new.data).tobytes() == np.asarray(old.data).tobytes(), name
    assert reencoded == 210
    assert q8_weights.adapter_path == "" and q8_weights.sha256 == sha256_file(q8_weights.path)


def _cache_files(info, encoding: str) -> list[str]:
    names = [f"{info.sha256}.{encoding}.gguf", f"{info.sha256}.{encoding}.json"]
    if encoding == "q4_0_offsets":
        names.append(f"{info.sha256}.{encoding}.adapter.gguf")
    return sorted(names)


@pytest.mark.parametrize("mode", ["auto", "q8_0"])
def test_the_reencoding_is_built_once_and_is_deterministic(
    info, tmp_path: Path, mode: str, served_weights, q8_weights
) -> None:
    first = serve_weights(info, tmp_path, mode=mode)
    stat = os.stat(first.path)
    second = serve_weights(info, tmp_path, mode=mode)
    assert second == first
    assert os.stat(second.path).st_mtime_ns == stat.st_mtime_ns  # not rebuilt
    other_build = served_weights if mode == "auto" else q8_weights
    assert (first.sha256, first.adapter_sha256) == (other_build.sha256, other_build.adapter_sha256)
    assert sorted(p.name for p in tmp_path.iterdir()) == _cache_files(info, first.encoding)


def _damage(path: Path, how: str) -> None:
    if how == "truncated":
        with open(path, "r+b") as fh:
            fh.truncate(path.stat().st_size // 2)
    elif how == "flipped_byte":
        with open(path, "r+b") as fh:
            fh.seek(-1000, os.SEEK_END)
            byte = fh.read(1)
            fh.seek(-1000, os.SEEK_END)
            fh.write(bytes([byte[0] ^ 0xFF]))
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["truncated", "flipped_byte", "missing"])
def test_a_damaged_or_missing_adapter_is_rebuilt(info, tmp_path: Path, how: str) -> None:
    good = serve_weights(info, tmp_path)
    _damage(Path(good.adapter_path), how)
    rebuilt = serve_weights(info, tmp_path)
    assert (rebuilt.sha256, rebuilt.adapter_sha256) == (good.sha256, good.adapter_sha256)
    assert sha256_file(rebuilt.adapter_path) == good.adapter_sha256


@pytest.mark.parametrize("damage", ["truncated", "flipped_byte", "record_for_other_source", "record_garbage"])
def test_a_damaged_or_stale_cache_is_rebuilt(info, tmp_path: Path, damage: str) -> None:
    good = serve_weights(info, tmp_path)
    record_path = tmp_path / f"{info.sha256}.{good.encoding}.json"
    if damage == "record_for_other_source":
        record = json.loads(record_path.read_text())
        record["source_sha256"] = "0" * 64
        record_path.write_text(json.dumps(record))
    elif damage == "record_garbage":
        record_path.write_text("{not json")
    else:
        _damage(Path(good.path), damage)
    rebuilt = serve_weights(info, tmp_path)
    assert rebuilt.sha256 == good.sha256
    assert sha256_file(rebuilt.path) == good.sha256
    assert json.loads(record_path.read_text())["sha256"] == good.sha256


def test_original_mode_serves_the_registered_file(info, tmp_path: Path) -> None:
    served = serve_weights(info, tmp_path, mode="original")
    assert (served.path, served.sha256, served.encoding) == (info.path, info.sha256, "original")
    assert not any(tmp_path.iterdir())


def test_a_cache_directory_that_cannot_be_created_is_a_load_error(info, tmp_path: Path) -> None:
    blocker = tmp_path / "encoded"
    blocker.write_text("a file where the directory should be")
    with pytest.raises(ModelLoadError, match="cannot create"):
        serve_weights(info, blocker)


def test_a_file_llama_cpp_cannot_quantise_is_a_load_error_and_leaves_nothing(
    info, model_path: str, tmp_path: Path
) -> None:
    # Valid GGUF to our validator, but llama.cpp does not know the architecture.
    from gguf import GGUFWriter

    source = tmp_path / "odd.gguf"
    writer = GGUFWriter(str(source), "nonesuch")
    writer.add_file_type(3)  # Q4_1
    writer.add_tensor("blk.0.ffn_up.weight", np.zeros((4, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    odd = inspect_model(source)
    assert encoding_for(odd, mode="auto", on_gpu=False) == "q8_0"
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match="re-encoding .* failed"):
        serve_weights(odd, cache)
    assert list(cache.iterdir()) == []  # no partial file


def test_remove_encoded_deletes_the_cached_files(info, tmp_path: Path) -> None:
    serve_weights(info, tmp_path)
    serve_weights(info, tmp_path, mode="q8_0")
    other = tmp_path / "unrelated.gguf"
    shutil.copyfile(info.path, other)
    remove_encoded(info.sha256, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["unrelated.gguf"]


def test_a_build_killed_midway_leaves_nothing_that_outlives_the_next_build(info, tmp_path: Path) -> None:
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    leftovers = [tmp_path / f".{info.sha256}.q4_0_offsets{part}.gguf.{gone.pid}.tmp" for part in ("", ".adapter")]
    for leftover in leftovers:
        leftover.write_bytes(b"GGUF" + b"\0" * 100)  # what a killed build leaves behind
    served = serve_weights(info, tmp_path)
    assert not any(leftover.exists() for leftover in leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == _cache_files(info, served.encoding)


def test_a_split_that_fails_is_a_load_error_and_leaves_nothing(info, tmp_path: Path) -> None:
    source = tmp_path / "gone.gguf"
    shutil.copyfile(info.path, source)
    vanished = inspect_model(source)
    source.unlink()  # the child finds nothing to read
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match="re-encoding .* as q4_0_offsets failed"):
        serve_weights(vanished, cache)
    assert list(cache.iterdir()) == []


def test_the_reencoding_child_never_imports_from_the_working_directory(info, tmp_path: Path, monkeypatch) -> None:
    # `python -m` puts the working directory first on sys.path; a runtime/ package there
    # (anything in the directory the server was started from) would run instead of ours.
    cwd = tmp_path / "cwd"
    (cwd / "runtime").mkdir(parents=True)
    (cwd / "runtime" / "__init__.py").write_text("raise SystemExit('imported from the working directory')\n")
    monkeypatch.chdir(cwd)
    served = serve_weights(info, tmp_path / "cache", mode="q8_0")
    assert served.encoding == "q8_0" and not served.note
