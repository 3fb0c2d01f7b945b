"""What this x86-64 CPU and its kernel allow, and which of ggml's CPU kernel builds may run on it.

The appliance's llama-cpp-python is built once with every CPU variant ggml knows
(`GGML_CPU_ALL_VARIANTS`, one `libggml-cpu-<variant>.so` per feature level), so one wheel runs
on any x86-64 machine. ggml's own loader would take the highest-scoring variant by CPUID alone:
the AMX build whenever the CPU has AMX, without asking whether the kernel enabled the register
state, and although its AMX kernels crash (llama.cpp#20824). This module makes that choice
instead:

- features come from CPUID and XGETBV themselves (executed from a small code page), so they
  hold under emulators such as `qemu-x86_64 -cpu Haswell`, whose `/proc/cpuinfo` is the host's;
  a feature needs both the CPU bit and the kernel's XCR0 state (AVX, AVX-512, AMX tiles);
- `KNOWN_CRASHES` lists variants that are never chosen automatically; naming one in
  `[runtime] cpu_variant` runs it anyway;
- `choose_variant` is a pure function of the features, the variants shipped and the request,
  so it is tested on stand-in feature sets on any machine.

Nothing here imports llama.cpp: `install.sh` and the CLI use it before the wheel exists.
Loading the chosen variant is `runtime.backend`'s job.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
import mmap
import platform
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import RuntimeFault

__all__ = [
    "KNOWN_CRASHES",
    "VARIANTS",
    "CpuFeatures",
    "CpuVariantError",
    "VariantChoice",
    "choose_variant",
    "detect",
    "features_from_flags",
    "llama_lib_dir",
    "shipped_variants",
]

log = logging.getLogger(__name__)


class CpuVariantError(RuntimeFault):
    """The requested CPU variant is unknown, not shipped, or needs features this machine lacks;
    or no shipped variant runs here."""


# ggml's x86 variants and the features each is compiled for (ggml/src/CMakeLists.txt, in its
# order). Feature names are ggml's (GGML_<NAME> build options).
_BASE = ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2")
_AVX512 = (*_BASE, "AVX512")
VARIANTS: dict[str, frozenset[str]] = {
    name: frozenset(features)
    for name, features in (
        ("x64", ()),
        ("sse42", ("SSE42",)),
        ("sandybridge", ("SSE42", "AVX")),
        ("ivybridge", ("SSE42", "AVX", "F16C")),
        ("piledriver", ("SSE42", "AVX", "F16C", "FMA")),
        ("haswell", _BASE),
        ("skylakex", _AVX512),
        ("cannonlake", (*_AVX512, "AVX512_VBMI")),
        ("cascadelake", (*_AVX512, "AVX512_VNNI")),
        ("icelake", (*_AVX512, "AVX512_VBMI", "AVX512_VNNI")),
        ("cooperlake", (*_AVX512, "AVX512_VNNI", "AVX512_BF16")),
        ("zen4", (*_AVX512, "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16")),
        ("alderlake", (*_BASE, "AVX_VNNI")),
        ("sapphirerapids", (*_AVX512, "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AMX_TILE", "AMX_INT8")),
    )
}

# Variants never chosen by "auto". Remove an entry once upstream fixes it.
KNOWN_CRASHES: dict[str, str] = {
    "sapphirerapids": (
        "its AMX kernels crash (SIGSEGV in ggml_backend_amx_mul_mat, llama.cpp#20824; SIGILL in "
        "tinygemm_kernel_amx on newer llama.cpp); set [runtime] cpu_variant = \"sapphirerapids\" to run it anyway"
    ),
}

# /proc/cpuinfo flag names (the kernel's) for each ggml feature; the kernel lists a flag only
# when it also enabled the state it needs. AVX512 is ggml's bundle of F, CD, VL, DQ and BW.
_FLAGS: dict[str, tuple[str, ...]] = {
    "SSE42": ("sse4_2",),
    "AVX": ("avx",),
    "F16C": ("f16c",),
    "FMA": ("fma",),
    "AVX2": ("avx2",),
    "BMI2": ("bmi2",),
    "AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "AVX512_VBMI": ("avx512vbmi",),
    "AVX512_VNNI": ("avx512_vnni",),
    "AVX512_BF16": ("avx512_bf16",),
    "AVX_VNNI": ("avx_vnni",),
    "AMX_TILE": ("amx_tile",),
    "AMX_INT8": ("amx_int8",),
}

_AMX = frozenset({"AMX_TILE", "AMX_INT8"})

# XCR0 bits the kernel must have enabled: SSE and AVX (YMM) state; AVX-512's opmask, ZMM_Hi256
# and Hi16_ZMM; AMX's XTILECFG and XTILEDATA.
_XCR0_AVX = 0b110
_XCR0_AVX512 = 0b1110_0110
_XCR0_AMX = (1 << 17) | (1 << 18)
_NEEDS_XCR0: dict[str, int] = {
    **{f: _XCR0_AVX for f in ("AVX", "F16C", "FMA", "AVX2", "AVX_VNNI")},
    **{f: _XCR0_AVX512 for f in ("AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16")},
    "AMX_TILE": _XCR0_AMX,
    "AMX_INT8": _XCR0_AMX,
}


@dataclass(frozen=True, slots=True)
class CpuFeatures:
    """The ggml features this process may use. `cpu_only` are features the CPU reports but the
    kernel has not enabled (they cannot be used); `source` says how they were read."""

    features: frozenset[str]
    model: str = ""
    source: str = "stand-in"
    cpu_only: frozenset[str] = frozenset()

    @property
    def amx(self) -> str:
        """"usable", "not enabled by the kernel" (the CPU has it, XCR0 or the permission does
        not), or "no"."""
        if _AMX <= self.features:
            return "usable"
        return "not enabled by the kernel" if _AMX <= self.features | self.cpu_only else "no"

    def to_dict(self) -> dict[str, object]:
        order = list(_FLAGS)
        return {
            "model": self.model,
            "source": self.source,
            "features": [f for f in order if f in self.features],
            "cpu_only": [f for f in order if f in self.cpu_only],
        }


@dataclass(frozen=True, slots=True)
class VariantChoice:
    """The variant to load, why, and why each other shipped variant was passed over."""

    variant: str
    reason: str
    passed_over: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {"variant": self.variant, "reason": self.reason, "passed_over": dict(self.passed_over)}


def choose_variant(cpu: CpuFeatures, shipped: Iterable[str], requested: str = "auto") -> VariantChoice:
    """The CPU variant to load out of `shipped` (the `libggml-cpu-<name>.so` files present).

    "auto": the shipped variant with the most features, all of which `cpu` has, that is not in
    `KNOWN_CRASHES`. A name: exactly that variant, known crashes included, provided it is
    shipped and `cpu` has its features (never a variant that would die on an illegal
    instruction). Raises `CpuVariantError` with the reason otherwise.
    """
    shipped = [v for v in VARIANTS if v in set(shipped)]  # ggml's order; unknown files ignored
    if requested != "auto":
        if requested not in VARIANTS:
            raise CpuVariantError(f"unknown CPU variant {requested!r}: expected auto or one of {', '.join(VARIANTS)}")
        if requested not in shipped:
            raise CpuVariantError(
                f"CPU variant {requested!r} is not in this build of llama.cpp (it has: {', '.join(shipped) or 'none'})"
            )
        missing = _missing(cpu, requested)
        if missing:
            raise CpuVariantError(
                f"CPU variant {requested!r} needs {', '.join(missing)}, which this CPU or its kernel does not allow"
            )
        return VariantChoice(requested, "set by [runtime] cpu_variant")
    passed_over: dict[str, str] = {}
    runnable: list[str] = []
    for name in shipped:
        missing = _missing(cpu, name)
        if missing:
            passed_over[name] = f"needs {', '.join(missing)}"
        elif name in KNOWN_CRASHES:
            passed_over[name] = f"skipped: {KNOWN_CRASHES[name]}"
        else:
            runnable.append(name)
    if not runnable:
        raise CpuVariantError(
            f"no CPU variant of this llama.cpp build runs here (shipped: {', '.join(shipped) or 'none'}; "
            f"this CPU allows: {', '.join(sorted(cpu.features)) or 'no extensions'})"
        )
    # Most features wins; on a tie the later one, as in ggml's own order.
    best = max(reversed(runnable), key=lambda name: len(VARIANTS[name]))
    others = {n: "fewer features" for n in runnable if n != best}
    return VariantChoice(best, "the most features this CPU allows", passed_over | others)


def llama_lib_dir() -> Path | None:
    """The installed llama-cpp-python's library folder, found without importing it."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).resolve().parent / "lib"


def shipped_variants(lib_dir: Path | None = None) -> dict[str, Path]:
    """CPU variant name -> module file, for the `libggml-cpu-<name>.so` files of the build."""
    lib_dir = lib_dir or llama_lib_dir()
    if lib_dir is None:
        return {}
    return {p.name.removeprefix("libggml-cpu-").removesuffix(".so"): p for p in sorted(lib_dir.glob("libggml-cpu-*.so"))}


def _missing(cpu: CpuFeatures, variant: str) -> list[str]:
    return [f for f in _FLAGS if f in VARIANTS[variant] and f not in cpu.features]


def features_from_flags(flags: Iterable[str], *, model: str = "", source: str = "stand-in") -> CpuFeatures:
    """Features from kernel flag names (as `/proc/cpuinfo` lists them)."""
    have = set(flags)
    found = frozenset(f for f, needed in _FLAGS.items() if all(n in have for n in needed))
    return CpuFeatures(found, model=model, source=source)


@functools.cache
def detect() -> CpuFeatures:
    """This machine's features: CPUID and XGETBV where they can be executed, else the kernel's
    `/proc/cpuinfo` flags; no extensions at all on a machine that is not x86-64."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return CpuFeatures(frozenset(), model=platform.machine(), source="not x86-64")
    try:
        return _from_cpuid()
    except OSError as exc:  # no executable memory (a hardened kernel, say)
        log.info("cannot run CPUID directly (%s); reading /proc/cpuinfo", exc)
        return _from_proc_cpuinfo()


def _from_proc_cpuinfo() -> CpuFeatures:
    flags: list[str] = []
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "flags" and not flags:
                    flags = value.split()
                elif key == "model name" and not model:
                    model = value.strip()
                if flags and model:
                    break
    except OSError:
        pass
    return features_from_flags(flags, model=model, source="/proc/cpuinfo")


# x86-64 System V machine code for two leaf functions.
# cpuid(eax=leaf, ecx=subleaf) -> out[0..3] = eax, ebx, ecx, edx (rbx is callee-saved).
_CPUID_CODE = bytes.fromhex(
    "53"  # push rbx
    "4989d0"  # mov r8, rdx
    "89f8"  # mov eax, edi
    "89f1"  # mov ecx, esi
    "0fa2"  # cpuid
    "418900"  # mov [r8], eax
    "41895804"  # mov [r8+4], ebx
    "41894808"  # mov [r8+8], ecx
    "4189500c"  # mov [r8+12], edx
    "5b"  # pop rbx
    "c3"  # ret
)
# xgetbv(ecx=index) -> edx:eax as one 64-bit value. Only valid when CPUID reports OSXSAVE.
_XGETBV_CODE = bytes.fromhex(
    "89f9"  # mov ecx, edi
    "0f01d0"  # xgetbv
    "48c1e220"  # shl rdx, 32
    "4809d0"  # or rax, rdx
    "c3"  # ret
)
_CPUID_FN = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32 * 4))
_XGETBV_FN = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint32)
_PROT_READ, _PROT_WRITE, _PROT_EXEC = 1, 2, 4


class _CodePage:
    """An anonymous page holding the two functions, writable while filled, then read+execute."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._mmap = libc.mmap
        self._mmap.restype = ctypes.c_void_p
        self._mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        self._mprotect = libc.mprotect
        self._mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self._munmap = libc.munmap
        self._munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.size = mmap.PAGESIZE
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        address = self._mmap(None, self.size, _PROT_READ | _PROT_WRITE, flags, -1, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap of a code page failed")
        self.address: int = address
        ctypes.memmove(address, _CPUID_CODE, len(_CPUID_CODE))
        ctypes.memmove(address + 64, _XGETBV_CODE, len(_XGETBV_CODE))
        if self._mprotect(address, self.size, _PROT_READ | _PROT_EXEC) != 0:
            errno = ctypes.get_errno()
            self.close()
            raise OSError(errno, "the kernel refused an executable page")
        self.cpuid_fn = _CPUID_FN(address)
        self.xgetbv_fn = _XGETBV_FN(address + 64)

    def cpuid(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        out = (ctypes.c_uint32 * 4)()
        self.cpuid_fn(leaf, subleaf, ctypes.byref(out))
        return out[0], out[1], out[2], out[3]

    def close(self) -> None:
        self._munmap(self.address, self.size)


def _bit(value: int, n: int) -> bool:
    return bool(value >> n & 1)


def _from_cpuid() -> CpuFeatures:
    page = _CodePage()
    try:
        max_leaf = page.cpuid(0)[0]
        _, _, ecx1, _ = page.cpuid(1)
        _, ebx7, ecx7, edx7 = page.cpuid(7, 0) if max_leaf >= 7 else (0, 0, 0, 0)
        eax7_1 = page.cpuid(7, 1)[0] if max_leaf >= 7 else 0
        xcr0 = page.xgetbv_fn(0) if _bit(ecx1, 27) else 0  # OSXSAVE: the kernel uses XSAVE
        model = _brand(page)
    finally:
        page.close()
    cpu = {
        "SSE42": _bit(ecx1, 20),
        "AVX": _bit(ecx1, 28),
        "F16C": _bit(ecx1, 29),
        "FMA": _bit(ecx1, 12),
        "AVX2": _bit(ebx7, 5),
        "BMI2": _bit(ebx7, 8),
        "AVX512": all(_bit(ebx7, n) for n in (16, 28, 31, 17, 30)),  # F, CD, VL, DQ, BW
        "AVX512_VBMI": _bit(ecx7, 1),
        "AVX512_VNNI": _bit(ecx7, 11),
        "AVX512_BF16": _bit(eax7_1, 5),
        "AVX_VNNI": _bit(eax7_1, 4),
        "AMX_TILE": _bit(edx7, 24),
        "AMX_INT8": _bit(edx7, 25),
    }
    has = {f for f, present in cpu.items() if present}
    allowed = {f for f in has if xcr0 & _NEEDS_XCR0.get(f, 0) == _NEEDS_XCR0.get(f, 0)}
    return CpuFeatures(frozenset(allowed), model=model, source="cpuid", cpu_only=frozenset(has - allowed))


def _brand(page: _CodePage) -> str:
    if page.cpuid(0x80000000)[0] < 0x80000004:
        return ""
    raw = b"".join(
        int(r).to_bytes(4, "little") for leaf in (0x80000002, 0x80000003, 0x80000004) for r in page.cpuid(leaf)
    )
    return raw.split(b"\0", 1)[0].decode("ascii", "replace").strip()


if __name__ == "__main__":
    import json

    print(json.dumps(detect().to_dict(), indent=2))
