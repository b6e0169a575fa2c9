"""ExecuTorch's C++ runtime without torch: a small C shim (``pte_lean.cpp``) driven through ctypes.

The executorch wheel's Python bindings link ``libtorch_cpu`` and ``libtorch_python`` and import the
torch package first: 355-400 MB RSS and 3-5 s before a model loads (measured with executorch 1.5.1
and a 22 MB MiniLM int8 program: peak RSS 425 MB). The same wheel ships the runtime proper
(``libexecutorch.so``, the XNNPACK delegate, the optimized and quantized CPU kernels) with its C++
headers and none of those libraries needs torch. This module compiles the shim once against them
(about 2 s with g++, cached under ``$EDGESHIP_CACHE_DIR``/``~/.cache/edgeship/pte-runtime``, keyed by
the shim's source, the executorch version and the compiler) and loads it; the same program then
peaks at 86 MB and loads in 0.05 s, with bit-identical outputs.

Nothing here imports torch or executorch's Python packages. :func:`runtime` raises
:class:`LeanUnavailable` with the reason (no C++ compiler, a wheel without headers, a failed
build) and the backend falls back to the Python bindings, saying so in its notes.
``EDGESHIP_PTE_RUNTIME=lean`` makes that a hard error, ``=pybindings`` skips this path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.machinery
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.profiling.sysinfo import dist_version

SOURCE = Path(__file__).with_name("pte_lean.cpp")
ENV = "EDGESHIP_PTE_RUNTIME"  # auto (default), lean, pybindings
MODES = ("auto", "lean", "pybindings")
# the components the shim links; --no-as-needed keeps the registration-only ones (kernels, delegate)
_LIBS = ("executorch", "executorch_threadpool", "executorch_kernels_optimized", "executorch_kernels_quantized",
         "executorch_backend_xnnpack")
# the definitions the wheel's executorch-config.cmake gives consumers (the libraries are built with them)
_DEFINES = ("C10_USING_CUSTOM_GENERATED_MACROS", "ET_EVENT_TRACER_ENABLED", "ET_USE_THREADPOOL")
# c10 ScalarType codes <-> numpy
DTYPES = {0: np.uint8, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.int64, 5: np.float16, 6: np.float32,
          7: np.float64, 11: np.bool_}
_CODES = {np.dtype(v): k for k, v in DTYPES.items()}
_MAX_RANK = 16


class LeanUnavailable(RuntimeError):
    """Why the torch-free runtime cannot be used here (one line, said in the result's notes)."""


def _setting(name: str, choices: tuple[str, ...]) -> str:
    """An environment switch whose first choice is the default; LeanUnavailable names the choices."""
    m = os.environ.get(name, choices[0]).strip().lower() or choices[0]
    if m not in choices:
        raise LeanUnavailable(f"{name}={m!r} is not one of {', '.join(choices)}")
    return m


def mode() -> str:
    return _setting(ENV, MODES)


def cache_dir() -> Path:
    if os.environ.get("EDGESHIP_CACHE_DIR"):
        return Path(os.environ["EDGESHIP_CACHE_DIR"]) / "pte-runtime"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgeship" / "pte-runtime"


def _wheel_root() -> Path:
    # a namespace package, found on sys.path without importing anything (and whether or not the runner has
    # already made the name unimportable in sys.modules)
    spec = importlib.machinery.PathFinder.find_spec("executorch")
    if spec is None or not spec.submodule_search_locations:
        raise LeanUnavailable("executorch is not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    missing = [str(p.relative_to(root)) for p in (root / "include" / "executorch", root / "lib")
               if not p.is_dir()]
    missing += [f"lib/lib{n}.so" for n in _LIBS if not (root / "lib" / f"lib{n}.so").is_file()]
    if missing:
        raise LeanUnavailable(f"this executorch install has no {', '.join(missing)} (a wheel without the C++ "
                              "runtime and headers)")
    return root


def _compiler() -> list[str]:
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand.split()[0]):
            return cand.split()
    raise LeanUnavailable("no C++ compiler on PATH (set CXX, or apt install g++) to build the torch-free runtime shim")


def _build(root: Path, out: Path, cxx: list[str]) -> None:
    inc = root / "include"
    cmd = [*cxx, "-std=c++17", "-O3", "-fPIC", "-shared", "-w", *(f"-D{d}" for d in _DEFINES),
           f"-I{inc}", f"-I{inc / 'executorch/runtime/core/portable_type/c10'}", str(SOURCE),
           "-o", str(out), f"-L{root / 'lib'}", "-Wl,--no-as-needed", *(f"-l{n}" for n in _LIBS),
           "-Wl,--as-needed", f"-Wl,-rpath,{root / 'lib'}"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LeanUnavailable(f"building the runtime shim failed: {e}") from None
    if done.returncode != 0:
        first = next((ln for ln in done.stderr.splitlines() if "error" in ln), done.stderr.strip()[:200])
        raise LeanUnavailable(f"building the runtime shim with {cxx[0]} failed: {first[:300]}")


def shim_path() -> Path:
    """The compiled shim for this executorch install, built on first use (atomically: concurrent runners agree)."""
    root = _wheel_root()
    cxx = _compiler()
    version = dist_version("executorch") or "unknown"
    cc = subprocess.run([*cxx, "--version"], capture_output=True, text=True, check=False).stdout.split("\n")[0]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, str(root.resolve()), cc, platform.machine()])
                         .encode()).hexdigest()[:16]
    out = cache_dir() / key / "libedgeship_pte.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
        built = Path(tmp) / out.name
        _build(root, built, cxx)
        os.replace(built, out)
    return out


@functools.cache
def _library() -> ctypes.CDLL:
    path = shim_path()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise LeanUnavailable(f"the runtime shim {path} does not load ({e})") from None
    vp, cp, sz, i64p = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_int64)
    ip = ctypes.POINTER(ctypes.c_int)
    sig: dict[str, tuple[Any, list[Any]]] = {
        "es_last_error": (cp, []), "es_open": (vp, [cp, ctypes.c_int]), "es_close": (None, [vp]),
        "es_method_names": (ctypes.c_int, [vp, cp, sz]), "es_load_method": (ctypes.c_int, [vp, cp]),
        "es_num_inputs": (ctypes.c_int, [vp, cp]), "es_num_outputs": (ctypes.c_int, [vp, cp]),
        "es_input_meta": (ctypes.c_int, [vp, cp, sz, ip, ip, i64p]),
        "es_set_input": (ctypes.c_int, [vp, cp, sz, ctypes.c_int, ctypes.c_int, i64p, vp]),
        "es_execute": (ctypes.c_int, [vp, cp]), "es_planned_bytes": (ctypes.c_int64, [vp, cp]),
        "es_output": (ctypes.c_int, [vp, cp, sz, ip, ip, ip, i64p, ctypes.POINTER(vp), ctypes.POINTER(sz),
                                     ctypes.POINTER(ctypes.c_double)]),
        "es_set_threads": (ctypes.c_int, [ctypes.c_uint]), "es_get_threads": (ctypes.c_int, []),
        "es_backend_names": (ctypes.c_int, [cp, sz]), "es_register_llm_kernels": (ctypes.c_int, []),
    }
    for name, (res, args) in sig.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def usable() -> bool:
    """Whether the torch-free path is asked for (``EDGESHIP_PTE_RUNTIME`` is not ``pybindings``) and the shim builds
    and loads here: what a runtime's ``runs_torch_free`` starts from."""
    if mode() == "pybindings":
        return False
    try:
        runtime()
    except LeanUnavailable:
        return False
    return True


def runtime() -> ctypes.CDLL:
    """The loaded shim; LeanUnavailable says why not (built and loaded once per process)."""
    try:
        return _library()
    except LeanUnavailable:
        _library.cache_clear()
        raise


def _names(fill: Any) -> list[str]:
    n = fill(None, 0)
    buf = ctypes.create_string_buffer(max(n, 0) + 1)
    fill(buf, len(buf))
    return [s for s in buf.value.decode().split("\n") if s]


class LeanProgram:
    """One loaded ``.pte``: methods by name, numpy in and out. Errors are RuntimeError with the runtime's reason."""

    kind = "lean"

    def __init__(self, path: Path) -> None:
        self._h: int | None = None
        self._lib = runtime()
        self._h = self._lib.es_open(str(path).encode(), 1)  # mmap: pages the delegate has packed can be dropped
        if not self._h:
            raise RuntimeError(self._error())
        self.method_names = tuple(_names(lambda b, n: self._lib.es_method_names(self._h, b, n)))
        self._keep: dict[str, list[np.ndarray]] = {}

    def _error(self) -> str:
        return str(self._lib.es_last_error().decode(errors="replace"))

    def _check(self, rc: int) -> int:
        if rc < 0:
            raise RuntimeError(self._error())
        return rc

    def load_method(self, name: str) -> None:
        self._check(self._lib.es_load_method(self._h, name.encode()))

    def num_inputs(self, name: str) -> int:
        return self._check(self._lib.es_num_inputs(self._h, name.encode()))

    def num_outputs(self, name: str) -> int:
        return self._check(self._lib.es_num_outputs(self._h, name.encode()))

    def input_meta(self, name: str, index: int) -> tuple[int, tuple[int, ...]]:
        """(c10 dtype code, planned sizes) of a tensor input; RuntimeError for an int/bool/list input."""
        dtype, ndim, sizes = ctypes.c_int(), ctypes.c_int(), (ctypes.c_int64 * _MAX_RANK)()
        self._check(self._lib.es_input_meta(self._h, name.encode(), index, ctypes.byref(dtype), ctypes.byref(ndim),
                                            sizes))
        return dtype.value, tuple(int(s) for s in sizes[: ndim.value])

    def execute(self, name: str, arrays: Sequence[np.ndarray]) -> int:
        """Run ``name`` on ``arrays`` (wrapped, not copied: they are kept alive until the next call)."""
        m = name.encode()
        keep = [np.ascontiguousarray(a) for a in arrays]
        for i, a in enumerate(keep):
            code = _CODES.get(a.dtype)
            if code is None:
                raise RuntimeError(f"input {i} has dtype {a.dtype}, which the runtime does not take")
            shape = (ctypes.c_int64 * max(a.ndim, 1))(*a.shape)
            self._check(self._lib.es_set_input(self._h, m, i, code, a.ndim, shape, a.ctypes.data))
        self._keep[name] = keep
        return self._check(self._lib.es_execute(self._h, m))

    def outputs(self, name: str, count: int) -> list[Any]:
        """The last execution's outputs as numpy copies (strings as str, scalars as Python numbers)."""
        out: list[Any] = []
        for i in range(count):
            kind, dtype, ndim = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
            sizes, data = (ctypes.c_int64 * _MAX_RANK)(), ctypes.c_void_p()
            nbytes, scalar = ctypes.c_size_t(), ctypes.c_double()
            self._check(self._lib.es_output(self._h, name.encode(), i, ctypes.byref(kind), ctypes.byref(dtype),
                                            ctypes.byref(ndim), sizes, ctypes.byref(data), ctypes.byref(nbytes),
                                            ctypes.byref(scalar)))
            view = memoryview((ctypes.c_char * nbytes.value).from_address(data.value) if data.value else b"")
            if kind.value == 0:
                np_type = DTYPES.get(dtype.value)
                if np_type is None:
                    raise RuntimeError(f"output {i} has dtype code {dtype.value}, which edgeship does not read")
                # one copy out of the method's planned memory, which the next execution overwrites
                out.append(np.frombuffer(view, dtype=np_type).reshape(tuple(sizes[: ndim.value])).copy())
            elif kind.value == 1:
                out.append(bytes(view).decode())
            elif kind.value == 5:
                out.append(None)
            else:
                out.append(int(scalar.value) if kind.value == 2 else
                           bool(scalar.value) if kind.value == 4 else float(scalar.value))
        return out

    def threads(self) -> int:
        return threads()

    def backend_names(self) -> list[str]:
        return backend_names()

    def close(self) -> None:
        if getattr(self, "_h", None):
            self._lib.es_close(self._h)
            self._h = None

    def __del__(self) -> None:
        self.close()


#: the wheel's LLM kernels (``llama::custom_sdpa``, ``llama::update_cache``), relative to its root. They are built
#: against ATen: loading them maps torch's shared libraries (measured: RSS 12 -> 121 MB) and imports no Python package,
#: against ~350 MB for the Python bindings, which import torch.
LLM_KERNELS = "extension/llm/custom_ops/libcustom_ops_aot_lib.so"


@functools.cache
def _llm_kernels() -> ctypes.CDLL:
    path = _wheel_root() / LLM_KERNELS
    if not path.is_file():
        raise LeanUnavailable(f"this executorch install has no {LLM_KERNELS} (the LLM custom kernels)")
    runtime()  # the shim first: the kernels register into the libexecutorch it has loaded (one soname, one copy)
    try:
        return ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        raise LeanUnavailable(f"the LLM custom kernels {path.name} do not load ({str(e)[:200]})") from None


LLM_KERNELS_ENV = "EDGESHIP_PTE_LLM_KERNELS"  # auto (default), executorch, edgeship
LLM_KERNEL_CHOICES = ("auto", "executorch", "edgeship")
_llm_kernels_in_use: list[str] = []  # which set this process registered: a second set would panic ExecuTorch
_runner_only: list[bool] = []  # runs_models_only() was called


def llm_kernels_setting() -> str:
    """``EDGESHIP_PTE_LLM_KERNELS`` as set: ``auto`` (default), ``executorch`` or ``edgeship``."""
    return _setting(LLM_KERNELS_ENV, LLM_KERNEL_CHOICES)


def llm_kernels_wanted() -> str:
    """Which LLM kernels this process uses: ``executorch`` (the wheel's, built against ATen: torch's libraries get
    mapped) or ``edgeship`` (the shim's own, no torch library; about as fast, see the README).

    ``auto`` picks the shim's own in a process that blocks torch (the profiler's worker), runs models only and has
    not imported torch (:func:`runs_models_only`: ``edgeship chat``) or has no wheel kernels,
    else the wheel's: ExecuTorch aborts the process when a kernel name is registered twice, and a process that may
    still import torch may export an LLM later, which loads the wheel's library (so ``edgeship`` set by hand is for
    runner processes). Whichever set a process registered first, it keeps."""
    m = llm_kernels_setting()
    if m != "auto":
        return m
    if _llm_kernels_in_use:
        return _llm_kernels_in_use[0]
    if "torch" in sys.modules and sys.modules["torch"] is None:
        return "edgeship"
    if _runner_only and "torch" not in sys.modules:
        return "edgeship"
    try:
        return "executorch" if (_wheel_root() / LLM_KERNELS).is_file() else "edgeship"
    except LeanUnavailable:
        return "edgeship"


def runs_models_only() -> None:
    """Declare this process one that runs models and exports none (``edgeship chat``): ``auto`` then takes the
    shim's own LLM kernels, as the profiler's worker does, so what it prints comes from the kernels a device runs
    (and torch's libraries stay unmapped). Not once torch is imported: such a process (a test run, a notebook) may
    still export, which loads the wheel's kernels, and ExecuTorch aborts on a second set.

    It matters beyond RSS: an int8-activation program rounds its activations at every layer, so the two kernel
    sets' float rounding grows into another rounding of the whole reply. SmolLM2 ``pte/int4-weight`` (Pi 5 bundle)
    answers the France question "The capital of France is Paris." with the shim's kernels and "L'Étoile, ..." with
    the wheel's (README: two roundings of one artifact, teacher-forced top-1 0.90 against each other)."""
    _runner_only[:] = [True]


def register_own_llm_kernels() -> int:
    """Register the shim's own ``llama::update_cache`` / ``llama::custom_sdpa`` (fp32, causal, no mask: what
    edgeship's exporter emits) where no kernel of that name is registered yet; return how many were added (0: the
    wheel's are registered already and run). They need no torch library. Not bit-identical to the wheel's (another
    summation order): fp32 outputs within 1e-6, and int8-activation artifacts as faithful (see the README)."""
    if _llm_kernels_in_use == ["executorch"]:
        return 0
    lib = runtime()
    n = int(lib.es_register_llm_kernels())
    if n < 0:
        raise LeanUnavailable(lib.es_last_error().decode(errors="replace"))
    if n:
        _llm_kernels_in_use[:] = ["edgeship"]
    return n


def load_llm_kernels(threads: int | None = None) -> None:
    """Register ExecuTorch's LLM kernels with the shim's runtime (once per process) and hold ATen's OpenMP pool,
    on which ``custom_sdpa`` runs, to ``threads``; LeanUnavailable says why not."""
    if _llm_kernels_in_use == ["edgeship"]:  # ExecuTorch panics when the wheel's library registers the names again
        raise LeanUnavailable("this process registered edgeship's own LLM kernels already")
    try:
        _llm_kernels()
    except LeanUnavailable:
        _llm_kernels.cache_clear()
        raise
    _llm_kernels_in_use[:] = ["executorch"]
    if threads:
        try:  # already loaded by the kernels: dlopen by soname returns that copy
            aten = ctypes.CDLL("libtorch_cpu.so")
            aten._ZN2at15set_num_threadsEi.argtypes = [ctypes.c_int]
            aten._ZN2at15set_num_threadsEi(int(threads))  # at::set_num_threads(int)
        except (OSError, AttributeError) as e:
            raise LeanUnavailable(f"cannot hold ATen's thread pool to {threads} ({str(e)[:200]})") from None


def set_threads(n: int) -> None:
    if runtime().es_set_threads(int(n)) != 0:
        raise RuntimeError(runtime().es_last_error().decode())


def threads() -> int:
    return int(runtime().es_get_threads())


def backend_names() -> list[str]:
    return _names(runtime().es_backend_names)
