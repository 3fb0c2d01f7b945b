"""Choosing llama.cpp's CPU kernels: stand-in CPUs for the choice itself, and the real build for
every variant it ships, natively and on older CPUs under qemu-user."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.cpu import (
    KNOWN_CRASHES,
    VARIANTS,
    CpuFeatures,
    CpuVariantError,
    choose_variant,
    detect,
    features_from_flags,
    shipped_variants,
)

# /proc/cpuinfo flags of real machines (trimmed to what matters plus some noise).
SAPPHIRE_RAPIDS = (
    "fpu sse sse2 ssse3 fma cx16 sse4_1 sse4_2 popcnt xsave avx f16c bmi1 avx2 bmi2 avx512f avx512dq avx512ifma "
    "avx512cd avx512bw avx512vl avx_vnni avx512_bf16 avx512vbmi avx512_vbmi2 avx512_vnni avx512_bitalg "
    "amx_bf16 avx512_fp16 amx_tile amx_int8"
).split()
SKYLAKE_SP = "fpu sse sse2 ssse3 fma sse4_1 sse4_2 popcnt avx f16c bmi1 avx2 bmi2 avx512f avx512dq avx512cd avx512bw avx512vl".split()
HASWELL = "fpu sse sse2 ssse3 fma sse4_1 sse4_2 popcnt avx f16c bmi1 avx2 bmi2".split()
NEHALEM = "fpu sse sse2 ssse3 sse4_1 sse4_2 popcnt".split()
CORE2 = "fpu sse sse2 ssse3".split()
EVERY_VARIANT = list(VARIANTS)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (SAPPHIRE_RAPIDS, "zen4"),  # everything but AMX: AVX-512 with VBMI, VNNI and BF16
        (SKYLAKE_SP, "skylakex"),
        (HASWELL, "haswell"),
        (NEHALEM, "sse42"),
        (CORE2, "x64"),
    ],
    ids=["amx", "avx512", "avx2", "sse42-no-avx", "no-sse42"],
)
def test_auto_picks_the_richest_variant_the_cpu_runs(flags: list[str], expected: str) -> None:
    choice = choose_variant(features_from_flags(flags), EVERY_VARIANT)
    assert choice.variant == expected
    # every variant with more features was passed over, each with its reason
    richer = [v for v in VARIANTS if len(VARIANTS[v]) > len(VARIANTS[expected])]
    assert all(v in choice.passed_over for v in richer)


def test_auto_never_picks_a_known_crash_even_when_the_cpu_has_it() -> None:
    amx = features_from_flags(SAPPHIRE_RAPIDS)
    assert {"AMX_TILE", "AMX_INT8"} <= amx.features
    choice = choose_variant(amx, EVERY_VARIANT)
    assert choice.variant not in KNOWN_CRASHES
    assert "20824" in choice.passed_over["sapphirerapids"]


def test_amx_is_reported_as_the_kernel_allows_it() -> None:
    amx = features_from_flags(SAPPHIRE_RAPIDS)
    assert amx.amx == "usable"
    withheld = CpuFeatures(amx.features - {"AMX_TILE", "AMX_INT8"}, cpu_only=frozenset({"AMX_TILE", "AMX_INT8"}))
    assert withheld.amx == "not enabled by the kernel"
    assert features_from_flags(["sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"]).amx == "no"


def test_a_known_crash_runs_when_named_and_the_cpu_allows_it() -> None:
    choice = choose_variant(features_from_flags(SAPPHIRE_RAPIDS), EVERY_VARIANT, "sapphirerapids")
    assert choice.variant == "sapphirerapids"


def test_a_variant_the_cpu_cannot_run_is_refused_not_loaded() -> None:
    with pytest.raises(CpuVariantError, match="needs AVX512.*does not allow"):
        choose_variant(features_from_flags(HASWELL), EVERY_VARIANT, "icelake")


def test_unknown_and_unshipped_variants_are_refused() -> None:
    cpu = features_from_flags(HASWELL)
    with pytest.raises(CpuVariantError, match="unknown CPU variant 'pentium'"):
        choose_variant(cpu, EVERY_VARIANT, "pentium")
    with pytest.raises(CpuVariantError, match="not in this build"):
        choose_variant(cpu, ["x64", "sse42"], "haswell")


def test_only_shipped_variants_are_chosen() -> None:
    assert choose_variant(features_from_flags(SAPPHIRE_RAPIDS), ["x64", "haswell", "sapphirerapids"]).variant == "haswell"
    with pytest.raises(CpuVariantError, match="no CPU variant"):
        choose_variant(features_from_flags(CORE2), ["haswell"])


def test_features_the_kernel_has_not_enabled_do_not_count() -> None:
    # CPUID says AVX-512, but XCR0 lacks its state (a kernel booted with it off, or a VM):
    # detection lists it as cpu_only, and the choice stays on AVX2.
    avx2 = features_from_flags(HASWELL).features
    cpu = CpuFeatures(avx2, source="cpuid", cpu_only=frozenset({"AVX512"}))
    assert choose_variant(cpu, EVERY_VARIANT).variant == "haswell"


def test_cpuid_agrees_with_the_kernel_on_this_machine() -> None:
    """The machine-code CPUID/XGETBV path reads what the kernel reports (run natively)."""
    cpu = detect()
    assert cpu.source == "cpuid"
    flags = Path("/proc/cpuinfo").read_text().split("\nflags", 1)[1].split("\n", 1)[0].split(":", 1)[1].split()
    assert cpu.features == features_from_flags(flags).features
    assert "SSE42" in cpu.features  # every x86-64 machine this could run on


# -- the real build --------------------------------------------------------------------------
def smoke(weights, variant: str = "auto", *, wrapper: list[str] = (), env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    args = [*wrapper, sys.executable, "-m", "runtime.smoke", weights.path, "--adapter", weights.adapter_path]
    return subprocess.run(
        [*args, "--cpu-variant", variant, "--tokens", "4"],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, **(env or {})),
    )


@pytest.fixture(scope="module")
def shipped() -> dict[str, Path]:
    variants = shipped_variants()
    assert variants, "this llama-cpp-python has no CPU variant modules: build it with packaging/build_llama_wheel.py"
    return variants


def test_the_build_ships_every_x86_variant(shipped: dict[str, Path]) -> None:
    assert set(shipped) == set(VARIANTS)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_shipped_variant_runs_when_forced(variant: str, shipped: dict[str, Path], served_weights) -> None:
    cpu = detect()
    proc = smoke(served_weights, variant)
    missing = VARIANTS[variant] - cpu.features
    if missing:
        assert proc.returncode == 1 and "does not allow" in proc.stderr, proc.stderr
        return
    if variant in KNOWN_CRASHES and proc.returncode < 0:
        pytest.xfail(f"{variant} died of signal {-proc.returncode} in its child process, as {KNOWN_CRASHES[variant]}")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["variant"] == variant
    assert result["completion_tokens"] == 4 and result["text"].strip()
    layouts = set(result["buffer_types"])
    assert "AMX" not in layouts or variant in KNOWN_CRASHES
    # The served Q4_0 codes take the repacked fast path wherever the variant has AVX2.
    assert ("CPU_REPACK" in layouts) == ("AVX2" in VARIANTS[variant])


def test_the_engine_runs_no_skipped_buffer_type(engine) -> None:
    extra = engine.stats().extra
    assert extra["cpu_variant"] not in KNOWN_CRASHES
    assert "AMX" not in extra["buffer_types"]
    if "AVX2" in detect().features:
        assert extra["buffer_types"].get("CPU_REPACK", 0) > 40  # MiB: the Q4_0 codes of the split weights


def _qemu() -> str:
    path = shutil.which("qemu-x86_64")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("qemu-x86_64 is missing: .ci/run installs Debian's qemu-user")
        pytest.skip("qemu-x86_64 not installed (Debian package qemu-user)")
    return path


@pytest.mark.parametrize(
    ("cpu_model", "variant", "env"),
    [
        ("Haswell", "haswell", {}),
        # numpy's OpenBLAS reads qemu's Nehalem model number as Haswell and runs AVX code at
        # import; a real Nehalem reports its own. This pins OpenBLAS, not ggml.
        ("Nehalem", "sse42", {"OPENBLAS_CORETYPE": "Nehalem"}),
    ],
)
def test_the_same_wheel_runs_on_an_older_cpu(cpu_model: str, variant: str, env: dict[str, str], served_weights) -> None:
    """Under qemu-user's emulated CPU the runtime sees that CPU's CPUID, picks its variant, and
    answers exactly as that variant does natively."""
    emulated = smoke(served_weights, wrapper=[_qemu(), "-cpu", cpu_model], env=env)
    assert emulated.returncode == 0, emulated.stderr[-2000:]
    result = json.loads(emulated.stdout)
    assert result["variant"] == variant
    assert cpu_model in result["cpu"]["model"]
    native = json.loads(smoke(served_weights, variant).stdout)
    assert result["text"] == native["text"]
