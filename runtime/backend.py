"""llama.cpp's process-wide set-up, once, before the first model: its log routed into `logging`,
its compute backends loaded (the CPU variant `runtime.cpu` chooses, and any GPU backend the
build ships), and `llama_backend_init`.

llama-cpp-python binds no `ggml_backend_load`, and a build with `GGML_BACKEND_DL` has no
backend until one is loaded ("no backends are loaded"), so this binds ggml's registry through
ctypes and loads each module by path. A build with its CPU backend linked in (not the one
`install.sh` makes) is reported as "built-in": its kernels were fixed at compile time.
"""

from __future__ import annotations

import ctypes
import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp

from runtime.cpu import (
    KNOWN_CRASHES,
    CpuFeatures,
    CpuVariantError,
    VariantChoice,
    choose_variant,
    detect,
    shipped_variants,
)

__all__ = ["BackendReport", "ensure_backend", "load_backends", "loaded_report", "model_buffers"]

log = logging.getLogger(__name__)
llama_log = logging.getLogger("runtime.llama_cpp")

LIB_DIR = Path(llama_cpp.__file__).resolve().parent / "lib"
_CPU_PREFIX = "libggml-cpu-"
_NOT_BACKENDS = {"libggml.so", "libggml-base.so"}

_lock = threading.Lock()
_report: BackendReport | None = None
_initialised = False
# llama.cpp's report of each weight buffer as a model loads ("load_tensors:   CPU_REPACK model
# buffer size =    48.42 MiB"): which layouts, so which kernels, the model runs on.
_MODEL_BUFFER = re.compile(r"(\S+) model buffer size =\s*([0-9.]+) MiB")
_loading = threading.local()
_GGML_CONT = 5
_GGML_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}


@llama_cpp.llama_log_callback
def _log_to_python(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if not text:
        return
    line = text.decode("utf-8", "replace")
    buffers = getattr(_loading, "buffers", None)
    if buffers is not None and (match := _MODEL_BUFFER.search(line)):
        buffers[match.group(1)] = round(buffers.get(match.group(1), 0.0) + float(match.group(2)), 2)
    # ggml's levels: 1 debug, 2 info, 3 warn, 4 error, 5 the previous line continued. Its
    # info is a model's load report, line by line: kept at DEBUG, while warnings and errors
    # reach the appliance's log at their own level.
    if level != _GGML_CONT:
        _loading.level = _GGML_LEVELS.get(level, logging.DEBUG)
    python_level = getattr(_loading, "level", logging.DEBUG)
    if llama_log.isEnabledFor(python_level) and line.strip():
        llama_log.log(python_level, "%s", line.rstrip("\n"))


@contextmanager
def model_buffers() -> Iterator[dict[str, float]]:
    """Collect, into the dict yielded, the MiB of each weight buffer type a model loaded on this
    thread inside the block puts its weights in."""
    buffers: dict[str, float] = {}
    _loading.buffers = buffers
    try:
        yield buffers
    finally:
        _loading.buffers = None


def ensure_backend(cpu_variant: str = "auto") -> BackendReport:
    """Set llama.cpp up for this process (log, backends, `llama_backend_init`) if not done yet,
    and report its backends. See `load_backends` for `cpu_variant`."""
    global _initialised
    with _lock:
        if not _initialised:
            llama_cpp.llama_log_set(_log_to_python, ctypes.c_void_p(0))
    report = load_backends(cpu_variant)
    with _lock:
        if not _initialised:
            llama_cpp.llama_backend_init()
            _initialised = True
    return report


@dataclass(frozen=True, slots=True)
class BackendReport:
    """What this process runs llama.cpp on. `mode` is "dynamic" (a variant chosen and loaded
    here) or "built-in"; `extra_buffer_types` are the CPU backend's weight layouts on offer
    (CPU_REPACK is the repacked Q4_0/IQ4_NL path; AMX appears only in AMX builds)."""

    mode: str
    requested: str
    cpu: CpuFeatures
    choice: VariantChoice | None
    cpu_path: str
    extra_buffer_types: tuple[str, ...]
    gpu_backends: dict[str, str] = field(default_factory=dict)

    @property
    def variant(self) -> str:
        return self.choice.variant if self.choice else "built-in"

    def to_dict(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "requested": self.requested,
            "variant": self.variant,
            "reason": self.choice.reason if self.choice else "compiled into libggml",
            "cpu": self.cpu.to_dict(),
            "extra_buffer_types": list(self.extra_buffer_types),
            "passed_over": dict(self.choice.passed_over) if self.choice else {},
            "gpu_backends": dict(self.gpu_backends),
            "known_crashes": dict(KNOWN_CRASHES),
        }


class _Ggml:
    """The few registry calls of libggml that llama-cpp-python does not bind."""

    def __init__(self, lib_dir: Path) -> None:
        lib = ctypes.CDLL(_mapped(lib_dir, "libggml.so"))
        self.load = _fn(lib.ggml_backend_load, ctypes.c_void_p, ctypes.c_char_p)
        self.load_all = _fn(lib.ggml_backend_load_all_from_path, None, ctypes.c_char_p)
        self.reg_count = _fn(lib.ggml_backend_reg_count, ctypes.c_size_t)
        self.reg_get = _fn(lib.ggml_backend_reg_get, ctypes.c_void_p, ctypes.c_size_t)
        self.reg_name = _fn(lib.ggml_backend_reg_name, ctypes.c_char_p, ctypes.c_void_p)
        self.reg_dev_count = _fn(lib.ggml_backend_reg_dev_count, ctypes.c_size_t, ctypes.c_void_p)
        self.reg_dev_get = _fn(lib.ggml_backend_reg_dev_get, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
        self.proc_address = _fn(lib.ggml_backend_reg_get_proc_address, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p)
        base = ctypes.CDLL(_mapped(lib_dir, "libggml-base.so"))
        self.buft_name = _fn(base.ggml_backend_buft_name, ctypes.c_char_p, ctypes.c_void_p)

    def registries(self) -> dict[str, int]:
        regs = (self.reg_get(i) for i in range(self.reg_count()))
        return {self.reg_name(reg).decode(): reg for reg in regs if reg}

    def extra_buffer_types(self, reg: int) -> tuple[str, ...]:
        """The names of the extra buffer types of `reg`'s first device (none if it has none)."""
        address = self.proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
        if not address or not self.reg_dev_count(reg):
            return ()
        get = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)
        array = get(self.reg_dev_get(reg, 0))
        names: list[str] = []
        i = 0
        while array and array[i]:
            names.append(self.buft_name(array[i]).decode())
            i += 1
        return tuple(names)


def _mapped(lib_dir: Path, name: str) -> str:
    """The copy of library `name` that libllama already loaded. A wheel cannot hold symlinks, so
    `libggml.so`, `libggml.so.0` and `libggml.so.0.x.y` are separate files, and opening another
    copy than libllama's would give a second, empty backend registry."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                path = line.rstrip("\n").partition("/")[2]
                if path and Path("/" + path).parent == lib_dir and Path(path).name.startswith(name):
                    return "/" + path
    except OSError:
        pass
    return str(lib_dir / name)


def _fn(fn: ctypes._CFuncPtr, restype: object, *argtypes: object) -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn


def loaded_report() -> BackendReport | None:
    """The report of the backends loaded into this process, or None before the first load."""
    return _report


def load_backends(cpu_variant: str = "auto", *, lib_dir: Path = LIB_DIR, cpu: CpuFeatures | None = None) -> BackendReport:
    """Load the backends once per process and report what was loaded.

    Later calls return the first report when they ask for "auto" or for the variant loaded;
    asking for another one raises `CpuVariantError` (ggml cannot unload a CPU backend that
    models use). Also raises it when the request cannot be met (see
    `runtime.cpu.choose_variant`), before anything loads.
    """
    global _report
    with _lock:
        if _report is not None:
            if cpu_variant not in ("auto", _report.variant) and _report.mode == "dynamic":
                raise CpuVariantError(
                    f"CPU variant {_report.variant!r} is already loaded in this process; "
                    f"restart it to use {cpu_variant!r}"
                )
            return _report
        _report = _load(cpu_variant, lib_dir, cpu or detect())
        log.info(
            "llama.cpp CPU backend: %s (%s); extra buffer types: %s",
            _report.variant,
            _report.to_dict()["reason"],
            ", ".join(_report.extra_buffer_types) or "none",
        )
        return _report


def _load(requested: str, lib_dir: Path, cpu: CpuFeatures) -> BackendReport:
    ggml = _Ggml(lib_dir)
    existing = ggml.registries()
    if "CPU" in existing:  # linked in: nothing to choose
        if requested != "auto":
            log.warning("[runtime] cpu_variant = %r ignored: this llama.cpp build has its CPU backend built in", requested)
        bufts = ggml.extra_buffer_types(existing["CPU"])
        if "AMX" in bufts:
            log.warning("this llama.cpp build was compiled with AMX kernels, which crash on some CPUs (llama.cpp#20824)")
        return BackendReport("built-in", requested, cpu, None, "", bufts)
    if cpu.source == "not x86-64":  # runtime.cpu knows x86 only: let ggml score its own variants
        ggml.load_all(str(lib_dir).encode())
        registries = ggml.registries()
        if "CPU" not in registries:
            raise CpuVariantError(f"llama.cpp found no CPU backend for {cpu.model} in {lib_dir}")
        choice = VariantChoice("ggml's choice", f"picked by ggml for {cpu.model}")
        return BackendReport("dynamic", requested, cpu, choice, "", ggml.extra_buffer_types(registries["CPU"]))
    variants = shipped_variants(lib_dir)
    choice = choose_variant(cpu, variants, requested)
    path = variants[choice.variant]
    if not ggml.load(str(path).encode()):
        raise CpuVariantError(f"llama.cpp refused to load its CPU backend {path.name} (see the log)")
    registries = ggml.registries()
    if "CPU" not in registries:
        raise CpuVariantError(f"{path.name} loaded but registered no CPU backend")
    gpu = {}
    for module in sorted(lib_dir.glob("libggml-*.so")):
        if module.name in _NOT_BACKENDS or module.name.startswith(_CPU_PREFIX):
            continue
        # A GPU backend whose driver is missing declines to load: the CPU serves alone.
        gpu[module.name] = "loaded" if ggml.load(str(module).encode()) else "not loaded (no device or driver)"
    return BackendReport("dynamic", requested, cpu, choice, str(path), ggml.extra_buffer_types(registries["CPU"]), gpu)
