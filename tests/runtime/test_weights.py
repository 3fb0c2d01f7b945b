"""Serving weights: the CPU re-encoding of Q4_1 models as Q8_0, its cache, and its failures."""

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

from runtime.errors import ModelLoadError
from runtime.model_file import inspect_model, sha256_file
from runtime.weights import encoding_for, remove_encoded, serve_weights


@pytest.fixture(scope="module")
def info(model_path: str):
    return inspect_model(model_path)


def test_only_cpu_served_q4_1_and_q5_1_files_are_reencoded(info) -> None:
    assert info.quantization == "Q4_1"
    assert encoding_for(info, mode="auto", on_gpu=False) == "q8_0"
    assert encoding_for(info, mode="original", on_gpu=False) is None
    assert encoding_for(info, mode="auto", on_gpu=True) is None
    assert encoding_for(dataclasses.replace(info, quantization="Q5_1"), mode="auto", on_gpu=False) == "q8_0"
    for kept in ("Q8_0", "Q4_0", "Q4_K_M", "F16"):
        assert encoding_for(dataclasses.replace(info, quantization=kept), mode="auto", on_gpu=False) is None


def test_the_reencoding_keeps_every_weight_within_half_a_percent_of_its_block(served_weights, model_path: str) -> None:
    source, served = GGUFReader(model_path), GGUFReader(served_weights.path)
    assert set(source.fields) <= set(served.fields)
    for key in ("tokenizer.chat_template", "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "llama.context_length"):
        assert [bytes(p) for p in source.fields[key].parts] == [bytes(p) for p in served.fields[key].parts], key
    assert int(served.fields["general.file_type"].parts[-1][0]) == 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    before = {t.name: t for t in source.tensors}
    after = {t.name: t for t in served.tensors}
    assert before.keys() == after.keys()
    reencoded = 0
    for name, old in before.items():
        new = after[name]
        if old.tensor_type == GGMLQuantizationType.Q4_1:
            assert new.tensor_type == GGMLQuantizationType.Q8_0, name
            reencoded += 1
            if reencoded % 7:  # a sample of tensors keeps the test quick; every kind is covered
                continue
            x = dequantize(np.asarray(old.data), old.tensor_type).reshape(-1, 32)
            y = dequantize(np.asarray(new.data), new.tensor_type).reshape(-1, 32)
            amax = np.abs(x).max(axis=1, keepdims=True)
            assert (np.abs(x - y) <= 0.005 * amax + 1e-12).all(), name
        else:  # Q8_0 embeddings and F32 norms are copied, byte for byte
            assert new.tensor_type == old.tensor_type, name
            assert np.asarray(new.data).tobytes() == np.asarray(old.data).tobytes(), name
    assert reencoded == 210
    assert served_weights.sha256 == sha256_file(served_weights.path)
    assert served_weights.source_sha256 == inspect_model(model_path).sha256


def test_the_reencoding_is_built_once_and_is_deterministic(info, tmp_path: Path, served_weights) -> None:
    first = serve_weights(info, tmp_path)
    stat = os.stat(first.path)
    second = serve_weights(info, tmp_path)
    assert second == first
    assert os.stat(second.path).st_mtime_ns == stat.st_mtime_ns  # not rebuilt
    assert first.sha256 == served_weights.sha256  # same bytes as another build from the same source
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{info.sha256}.q8_0.gguf", f"{info.sha256}.q8_0.json"]


@pytest.mark.parametrize("damage", ["truncated", "flipped_byte", "record_for_other_source", "record_garbage"])
def test_a_damaged_or_stale_cache_is_rebuilt(info, tmp_path: Path, damage: str) -> None:
    good = serve_weights(info, tmp_path)
    gguf_path, record_path = Path(good.path), tmp_path / f"{info.sha256}.q8_0.json"
    if damage == "truncated":
        with open(gguf_path, "r+b") as fh:
            fh.truncate(gguf_path.stat().st_size // 2)
    elif damage == "flipped_byte":
        with open(gguf_path, "r+b") as fh:
            fh.seek(-1000, os.SEEK_END)
            byte = fh.read(1)
            fh.seek(-1000, os.SEEK_END)
            fh.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "record_for_other_source":
        record = json.loads(record_path.read_text())
        record["source_sha256"] = "0" * 64
        record_path.write_text(json.dumps(record))
    else:
        record_path.write_text("{not json")
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


def test_a_file_llama_cpp_cannot_quantise_is_a_load_error_and_leaves_nothing(info, model_path: str, tmp_path: Path) -> None:
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
    other = tmp_path / "unrelated.gguf"
    shutil.copyfile(info.path, other)
    remove_encoded(info.sha256, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["unrelated.gguf"]


def test_a_build_killed_midway_leaves_nothing_that_outlives_the_next_build(info, tmp_path: Path) -> None:
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    leftover = tmp_path / f".{info.sha256}.q8_0.gguf.{gone.pid}.tmp"
    leftover.write_bytes(b"GGUF" + b"\0" * 100)  # what a killed build leaves behind
    served = serve_weights(info, tmp_path)
    assert not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [Path(served.path).name, f"{info.sha256}.q8_0.json"]
