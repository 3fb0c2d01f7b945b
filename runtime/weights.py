"""The weights an engine serves: the registered file, or a re-encoding of it for CPUs.

ggml's CPU backend has batched matrix kernels (llamafile's tinyBLAS, or a repacked layout) for
Q8_0, Q4_0, the K-quants and others, but none for Q4_1 or Q5_1: each output column of a
batch is then a separate dot product, so decoding 8 sequences costs almost 8 times one.
Two re-encodings put every batched product on a fast kernel:

- "q4_0_offsets" (Q4_1 files of the llama architecture): the same codes and scales as Q4_0,
  which ggml repacks for its AVX2/AVX-512 kernels, plus a small adapter that adds each
  block's offset back (`runtime._offset_adapter`). About 1.7 times Q8_0's speed at 8
  sequences, and smaller.
- "q8_0" (the other Q4_1 and Q5_1 files): llama.cpp's own quantiser (`llama_model_quantize`,
  what `llama-quantize` runs). Q8_0's grid (255 levels per block of 32) is finer than
  Q4_1's (16) or Q5_1's (32), so each weight moves by at most 1/254 of its block's largest
  magnitude.

`bench/weights.py` measures what each does to perplexity and to greedy answers. Either is
built in a child process, so that a failure there cannot take the server down, written once
next to a JSON record of its source and its own sha256s, and rehashed on every load, as the
registered file is: a cached file that was changed or cut short is rebuilt.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from runtime.encodings import ENCODINGS, REENCODED_TYPES, SPLIT, WeightsMode, cache_paths, planned_encoding, read_record
from runtime.errors import ModelFileError, ModelLoadError
from runtime.model_file import ModelInfo, inspect_model

__all__ = ["REENCODED_TYPES", "ServedWeights", "WeightsMode", "encoding_for", "original_weights", "serve_weights"]

log = logging.getLogger(__name__)

# llama_ftype for the encodings llama.cpp's quantiser writes.
_FTYPES: dict[str, int] = {"q8_0": 7}


# What inspect_model must report for a freshly built file of each encoding.
_BUILT_QUANTIZATION: dict[str, str] = {"q8_0": "Q8_0", SPLIT: "Q4_0"}
_FORMAT = 2  # of the JSON record; bump to rebuild every cached file
_GGML_LOG_LEVEL_ERROR = 4


@dataclass(frozen=True, slots=True)
class ServedWeights:
    """What an engine loads. `encoding` is "original" when `path` is the registered file;
    `note` says why a re-encoding that was due is not being served. `adapter_path` is the
    LoRA adapter a "q4_0_offsets" model needs (empty otherwise); `size_bytes` counts both."""

    path: str
    sha256: str
    encoding: str
    source_sha256: str
    size_bytes: int
    note: str = ""
    adapter_path: str = ""
    adapter_sha256: str = ""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def encoding_for(info: ModelInfo, *, mode: WeightsMode, on_gpu: bool) -> str | None:
    """The encoding to serve `info` in, or None to serve the file as it is.

    GPU backends have batched kernels for every type, and a larger encoding would take VRAM
    from the KV cache, so offloaded models keep their file.
    """
    return planned_encoding(info.quantization, info.architecture, mode=mode, on_gpu=on_gpu)


def original_weights(info: ModelInfo, *, note: str = "") -> ServedWeights:
    """The registered file itself."""
    return ServedWeights(info.path, info.sha256, "original", info.sha256, info.size_bytes, note)


def _llama_cpp_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:  # pragma: no cover - a source checkout without metadata
        return "unknown"


def _adapter_path(dest: Path) -> Path:
    return dest.with_name(dest.name.removesuffix(".gguf") + ".adapter.gguf")


def serve_weights(
    info: ModelInfo,
    cache_dir: Path,
    *,
    mode: WeightsMode = "auto",
    on_gpu: bool = False,
    timeout_s: float = 600.0,
) -> ServedWeights:
    """The weights to load for `info` (already validated and hashed), building the cached
    re-encoding when it is missing, stale or damaged.

    Raises ModelLoadError when the re-encoding cannot be built; whether to serve the
    original instead is the caller's decision.
    """
    encoding = encoding_for(info, mode=mode, on_gpu=on_gpu)
    if encoding is None:
        return original_weights(info)
    dest, record_path = cache_paths(info.sha256, cache_dir, encoding)
    cached = _load_cached(info, dest, record_path, encoding)
    if cached is not None:
        return cached
    return _build(info, dest, record_path, encoding, timeout_s=timeout_s)


def _load_cached(info: ModelInfo, dest: Path, record_path: Path, encoding: str) -> ServedWeights | None:
    record = read_record(record_path)
    if record is None or record.get("format") != _FORMAT:
        return None
    if record.get("source_sha256") != info.sha256 or record.get("encoding") != encoding:
        return None
    if record.get("llama_cpp_python") != _llama_cpp_version():  # the quantiser may have changed
        return None
    try:
        served = inspect_model(dest, expected_sha256=_text(record.get("sha256")))
        adapter = (
            inspect_model(_adapter_path(dest), expected_sha256=_text(record.get("adapter_sha256")))
            if encoding == SPLIT
            else None
        )
    except ModelFileError as exc:
        log.warning("cached %s weights for %s are unusable (%s); rebuilding", encoding, info.path, exc)
        return None
    return _served(served, adapter, encoding, info)


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _served(model: ModelInfo, adapter: ModelInfo | None, encoding: str, source: ModelInfo) -> ServedWeights:
    return ServedWeights(
        model.path,
        model.sha256,
        encoding,
        source.sha256,
        model.size_bytes + (adapter.size_bytes if adapter else 0),
        adapter_path=adapter.path if adapter else "",
        adapter_sha256=adapter.sha256 if adapter else "",
    )


def _build(info: ModelInfo, dest: Path, record_path: Path, encoding: str, *, timeout_s: float) -> ServedWeights:
    cache_dir = dest.parent
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelLoadError(f"cannot create {cache_dir} for re-encoded weights: {exc.strerror or exc}") from None
    adapter_dest = _adapter_path(dest)
    _remove_abandoned(cache_dir, dest.name)
    _remove_abandoned(cache_dir, adapter_dest.name)
    tmp = cache_dir / f".{dest.name}.{os.getpid()}.tmp"
    adapter_tmp = cache_dir / f".{adapter_dest.name}.{os.getpid()}.tmp"
    log.info("re-encoding %s (%s) as %s for batched CPU kernels", info.path, info.quantization, encoding)
    try:
        proc = subprocess.run(
            # -P: the server's working directory is not put first on the child's sys.path, so a
            # stray runtime/ or llama_cpp/ there cannot be imported instead of ours.
            [sys.executable, "-P", "-m", "runtime.weights", info.path, str(tmp), encoding, str(adapter_tmp)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**os.environ, "PYTHONPATH": _import_root()},
        )
        if proc.returncode != 0:
            tail = " ".join((proc.stderr or "").strip().splitlines()[-3:])
            raise ModelLoadError(f"re-encoding {info.path} as {encoding} failed (exit {proc.returncode}): {tail}")
        built = inspect_model(tmp)
        expect = _BUILT_QUANTIZATION[encoding]
        if built.quantization != expect or built.architecture != info.architecture:
            raise ModelLoadError(
                f"re-encoding {info.path} produced {built.quantization} {built.architecture}, "
                f"expected {expect} {info.architecture}"
            )
        adapter = inspect_model(adapter_tmp) if encoding == SPLIT else None
        if adapter is not None:
            _fsync(adapter_tmp)
            os.replace(adapter_tmp, adapter_dest)
        _fsync(tmp)
        os.replace(tmp, dest)
        record = {
            "format": _FORMAT,
            "encoding": encoding,
            "source": info.path,
            "source_sha256": info.sha256,
            "source_quantization": info.quantization,
            "sha256": built.sha256,
            "size_bytes": built.size_bytes,
            "adapter_sha256": adapter.sha256 if adapter else "",
            "adapter_size_bytes": adapter.size_bytes if adapter else 0,
            "llama_cpp_python": _llama_cpp_version(),
        }
        record_tmp = record_path.with_name(f".{record_path.name}.{os.getpid()}.tmp")
        record_tmp.write_text(json.dumps(record, indent=2) + "\n")
        _fsync(record_tmp)
        os.replace(record_tmp, record_path)
        _fsync(cache_dir)
    except subprocess.TimeoutExpired:
        raise ModelLoadError(f"re-encoding {info.path} as {encoding} took longer than {timeout_s:.0f} s") from None
    except ModelFileError as exc:
        raise ModelLoadError(f"re-encoding {info.path} as {encoding} wrote an invalid file: {exc}") from None
    except OSError as exc:
        raise ModelLoadError(f"cannot write re-encoded weights to {cache_dir}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
        adapter_tmp.unlink(missing_ok=True)
    served = replace(
        _served(built, adapter, encoding, info),  # inspected under their temporary names
        path=str(dest.resolve()),
        adapter_path=str(adapter_dest.resolve()) if adapter else "",
    )
    log.info("re-encoded %s: %d -> %d bytes, sha256 %s", info.path, info.size_bytes, served.size_bytes, built.sha256)
    return served


def _remove_abandoned(cache_dir: Path, name: str) -> None:
    """Delete partial files left by builds whose process is gone (killed mid-build, say)."""
    for leftover in cache_dir.glob(f".{name}.*.tmp"):
        pid = leftover.name.removeprefix(f".{name}.").removesuffix(".tmp")
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            leftover.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _import_root() -> str:
    root = str(Path(__file__).resolve().parent.parent)
    extra = os.environ.get("PYTHONPATH")
    return f"{root}{os.pathsep}{extra}" if extra else root


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _quantize(source: str, dest: str, encoding: str) -> int:
    """Child-process side: run llama.cpp's quantiser, quietly. Returns an exit status."""
    import ctypes

    import llama_cpp

    @llama_cpp.llama_log_callback
    def keep_errors(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if level == _GGML_LOG_LEVEL_ERROR and text:
            sys.stderr.write(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(keep_errors, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _FTYPES[encoding]
    params.allow_requantize = True  # the source is already quantised; that is the point
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(source.encode(), dest.encode(), ctypes.byref(params))
    if rc != 0:
        sys.stderr.write(f"llama_model_quantize returned {rc}\n")
        return 1
    return 0


def _encode(source: str, dest: str, encoding: str, adapter_dest: str) -> int:
    """Child-process side: write `encoding` of `source`. Returns an exit status."""
    if encoding != SPLIT:
        return _quantize(source, dest, encoding)
    from runtime._offset_adapter import write_split

    try:
        write_split(source, dest, adapter_dest)
    except (ValueError, KeyError, OSError) as exc:
        sys.stderr.write(f"splitting {source}: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5) or sys.argv[3] not in ENCODINGS:
        sys.stderr.write(f"usage: python -m runtime.weights SOURCE DEST {{{','.join(ENCODINGS)}}} [ADAPTER_DEST]\n")
        sys.exit(2)
    sys.exit(_encode(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) == 5 else ""))
