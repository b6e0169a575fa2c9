"""ExecuTorch ``.pte`` backend: ExecuTorch's C++ runtime without torch where it can be built, else its Python bindings.

The executorch wheel's Python bindings import torch (~3-5 s, ~350 MB RSS before the model loads;
a C++ app on a phone pays neither). Its C++ runtime does not: :mod:`.pte_lean` compiles a small
shim against the wheel's headers and libraries once and drives it through ctypes, so a ``.pte``
runs in a torch-free process (the runner blocks torch there, as for ONNX and LiteRT). Where that
cannot be built (no C++ compiler, a wheel without headers) or per-op timings are asked for (the
ETDump inspector is torch-side), the Python bindings run it and the result's notes say why.
``EDGESHIP_PTE_RUNTIME=lean|pybindings`` forces one path. Every import of executorch happens
inside :class:`PteBackend`.

Options: ``per_op`` (bool) adds per-operator timings from an ETDump to :meth:`info`, taken
in a separate, instrumented load of the program after the timed runs so the event tracer
does not slow the latency samples; ``per_op_runs`` (int, default 10) sets how many runs
it averages; ``method`` (str) picks the method to run. Without it the runner runs ``forward``,
or the only method there is: a ``.pte`` from ExecuTorch's own scripts has no edgeship I/O
description and may hold several methods, and its inputs are synthesised from the method's
metadata (dtype and sizes; a dynamic dim's planned upper bound is the size it reports).
"""

from __future__ import annotations

import json
import re
import struct
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgeship.errors import ArtifactLoadError, InputError, RuntimeMissingError
from edgeship.profiling.backends import Backend
from edgeship.profiling.sysinfo import dist_version
from edgeship.spec import TensorSpec
from edgeship.vocab import PTE_IO_METHOD

IO_METHOD = PTE_IO_METHOD
OPTIONS = ("per_op", "per_op_runs", "method")
# c10::ScalarType codes reported by MethodMeta.input_tensor_meta(i).dtype()
_SCALAR_TYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16", 6: "float32", 7: "float64",
                 11: "bool"}
_WRAPPERS = {"OPERATOR_CALL", "DELEGATE_CALL", "Method::execute"}


def check_header(path: Path) -> None:
    """Refuse files that are not a complete ExecuTorch program before the C++ loader sees them.

    The loader aborts the whole process (not an exception) when it logs a non-UTF-8
    file identifier, and reports truncation only as an error code.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(40)
    if len(head) < 8 or head[4:6] != b"ET" or not head[6:8].isdigit():
        raise ArtifactLoadError(f"{path}: not an ExecuTorch program (no 'ETnn' identifier at byte 4; the file is "
                                "corrupt or another format); re-export it with edgeship export --format pte")
    if head[8:12] == b"eh00" and len(head) >= 40:
        header_len, = struct.unpack_from("<I", head, 12)
        program_size, seg_base, seg_size = struct.unpack_from("<QQQ", head, 16)
        expected = max(program_size, seg_base + seg_size if header_len >= 32 and seg_size else 0)
        if size < expected:
            raise ArtifactLoadError(f"{path}: truncated ExecuTorch program ({size} of {expected} bytes); re-copy or "
                                    "re-export it")


def limit_threads(portable_lib: Any, torch: Any, threads: int | None) -> None:
    """Hold the executorch Python bindings to ``threads`` cores. XNNPACK runs on ExecuTorch's shared threadpool (one
    thread per core by default) and ExecuTorch's own kernels in these bindings (the LLM's custom SDPA) on ATen's
    OpenMP pool: with only the first reset, a 1-thread SmolLM2 run kept a second core busy (CPU time / wall time
    1.99; 1.00 with both, same tokens/s)."""
    if threads:
        portable_lib._unsafe_reset_threadpool(int(threads))
        torch.set_num_threads(int(threads))


class _PybindProgram:
    """The executorch Python bindings behind :class:`~.pte_lean.LeanProgram`'s interface (imports torch)."""

    kind = "pybindings"

    def __init__(self, path: Path, threads: int | None) -> None:
        try:
            import executorch.kernels.quantized  # noqa: F401  # registers embedding_byte & co. before any load
            import torch
            from executorch.extension.pybindings import portable_lib
            from executorch.runtime import Runtime, Verification
        except ImportError as e:
            raise RuntimeMissingError(f"the executorch runtime is not installed ({e}); pip install "
                                      "'edgeship[export]' (or executorch) to run .pte files") from None
        self._torch = torch
        self._portable = portable_lib
        limit_threads(portable_lib, torch, threads)
        self.runtime = Runtime.get()
        self.verification = Verification.InternalConsistency
        self.program = self.runtime.load_program(path, verification=self.verification)
        self.method_names = tuple(self.program.method_names)
        self._methods: dict[str, Any] = {}
        self._wrapped: dict[str, tuple[list[np.ndarray], list[Any]]] = {}
        self._results: dict[str, Sequence[Any]] = {}

    def load_method(self, name: str) -> None:
        m = self.program.load_method(name)
        if m is None:
            raise RuntimeError(f"method '{name}' did not load")
        self._methods[name] = m

    def num_inputs(self, name: str) -> int:
        return int(self._methods[name].metadata.num_inputs())

    def num_outputs(self, name: str) -> int:
        return int(self._methods[name].metadata.num_outputs())

    def input_meta(self, name: str, index: int) -> tuple[int, tuple[int, ...]]:
        info = self._methods[name].metadata.input_tensor_meta(index)
        return int(info.dtype()), tuple(int(d) for d in info.sizes())

    def torch_inputs(self, name: str, arrays: Sequence[np.ndarray]) -> list[Any]:
        last = self._wrapped.get(name)
        if last is None or len(last[0]) != len(arrays) or any(a is not b for a, b in zip(arrays, last[0], strict=True)):
            # the timed loop feeds the same arrays every run: wrap them once (from_numpy shares their memory), so
            # the samples time execute() and not the wrapping (~7% of a 0.1 ms method, measured)
            last = (list(arrays), [self._torch.from_numpy(np.ascontiguousarray(a)) for a in arrays])
            self._wrapped[name] = last
        return last[1]

    def last_inputs(self, name: str) -> list[Any]:
        return self._wrapped[name][1]

    def execute(self, name: str, arrays: Sequence[np.ndarray]) -> int:
        self._results[name] = self._methods[name].execute(self.torch_inputs(name, arrays))
        return len(self._results[name])

    def outputs(self, name: str, count: int) -> list[Any]:
        return [r.numpy() if hasattr(r, "numpy") else r for r in self._results[name][:count]]

    def threads(self) -> int:
        return int(self._portable._threadpool_get_thread_count())

    def backend_names(self) -> list[str]:
        return list(self.runtime.backend_registry.registered_backend_names)


def _lean_program(path: Path, threads: int | None) -> Any:
    from edgeship.profiling.backends import pte_lean

    if threads:
        pte_lean.set_threads(int(threads))
    return pte_lean.LeanProgram(path)


def _open(path: Path, threads: int | None, per_op: bool,
          kernels: Callable[[str], None] | None = None) -> tuple[Any, list[str]]:
    """The torch-free C++ runtime where it can be built here, else the Python bindings; notes say which and why.
    ``kernels(path)`` runs first on the path taken (``"lean"`` or ``"pybindings"``): a format registers the extra
    kernels its programs call there (the LLM runtime's); LeanUnavailable from it falls back as the shim's would."""
    from edgeship.profiling.backends import pte_lean

    try:
        mode = pte_lean.mode()
    except pte_lean.LeanUnavailable as e:
        raise ArtifactLoadError(str(e)) from None
    notes: list[str] = []
    if mode == "pybindings":
        notes.append(f"{pte_lean.ENV}=pybindings: ran through the executorch Python bindings (they import torch)")
    elif per_op and mode == "auto":
        notes.append("per-op timings need ExecuTorch's ETDump inspector, which imports torch: ran through the "
                     "executorch Python bindings, so load time and RSS include torch")
    else:
        try:
            if kernels is not None:
                kernels("lean")
            return _lean_program(path, threads), notes
        except pte_lean.LeanUnavailable as e:
            if mode == "lean":
                raise RuntimeMissingError(f"{pte_lean.ENV}=lean: the torch-free ExecuTorch runtime is unavailable "
                                          f"({e})") from None
            notes.append(f"torch-free runtime unavailable ({e}): ran through the executorch Python bindings, so load "
                         "time and RSS include torch (~350 MB)")
        except RuntimeError as e:
            raise ArtifactLoadError(f"{path}: the executorch runtime cannot load it ({_first(e)}); the file is "
                                    "corrupt, truncated or from an incompatible executorch version; re-export it") from None
    try:
        if kernels is not None:
            kernels("pybindings")
        return _PybindProgram(path, threads), notes
    except RuntimeMissingError:
        raise
    except Exception as e:  # RuntimeError with an error code from the C++ loader
        raise ArtifactLoadError(f"{path}: the executorch runtime cannot load it ({_first(e)}); the file is corrupt, "
                                "truncated or from an incompatible executorch version; re-export it") from None


def _executorch_version() -> str:
    # read from the installed metadata: importing executorch.version would import nothing heavy, but the torch-free
    # runner blocks the executorch package outright
    return dist_version("executorch") or "unknown"


class PteBackend(Backend):
    format: ClassVar[str] = "pte"
    suffix: ClassVar[str] = ".pte"
    options_accepted: ClassVar[tuple[str, ...]] = OPTIONS
    torch_free: ClassVar[bool] = False  # not always: see runs_torch_free
    per_op_capable: ClassVar[bool] = True  # the worker passes options["per_op"] on --per-op

    @classmethod
    def runs_torch_free(cls, options: Mapping[str, Any]) -> bool:
        """True where the C++ runtime shim builds and loads here and no per-op ETDump (a torch-side tool) is asked."""
        from edgeship.profiling.backends import pte_lean

        return not options.get("per_op") and pte_lean.usable()

    def __init__(self, path: Path, threads: int | None = None, options: Mapping[str, Any] | None = None) -> None:
        opts = self.checked_options(options)
        check_header(path)
        self.path = path
        self.threads = threads
        self.per_op = bool(opts.get("per_op", False))
        self.per_op_runs = int(opts.get("per_op_runs", 10))
        self.program, self.notes = _open(path, threads, self.per_op)
        self.methods = tuple(sorted(self.program.method_names))
        self.method_name = self._pick_method(opts.get("method"))
        try:
            self.program.load_method(self.method_name)
        except Exception as e:
            raise ArtifactLoadError(f"{path}: cannot load method '{self.method_name}' ({_first(e)}); an operator kernel "
                                    f"or delegate it needs is missing from this runtime (backends: "
                                    f"{', '.join(self.program.backend_names())})") from None
        self.io = self._io()
        self.dim_hints: dict[str, tuple[int, str]] = {}
        self.inputs = self._input_specs()
        self.outputs = tuple(self.io.get("output_names") or
                             [f"output_{i}" for i in range(self.program.num_outputs(self.method_name))])
        self._n_outputs = self.program.num_outputs(self.method_name)
        self._version = _executorch_version()
        self._ran = False
        self._per_op_result: dict[str, Any] | None = None

    def _pick_method(self, want: Any) -> str:
        """``--method NAME``, else ``forward``, else the program's only method besides our I/O description."""
        runnable = [m for m in self.methods if m != IO_METHOD]
        if want:
            if str(want) not in runnable:
                raise ArtifactLoadError(f"{self.path}: no method '{want}'; it has {', '.join(runnable) or 'none'}")
            return str(want)
        if "forward" in runnable:
            return "forward"
        if len(runnable) == 1:
            return runnable[0]
        raise ArtifactLoadError(f"{self.path}: no 'forward' method and several others ({', '.join(runnable) or 'none'}); "
                                f"pick one with --method NAME, e.g. --method {runnable[0] if runnable else 'forward'}")

    def _io(self) -> dict[str, Any]:
        # the description edgeship writes is of ``forward``; another method is described by its metadata alone
        if IO_METHOD not in self.methods or self.method_name != "forward":
            return {}
        try:
            self.program.load_method(IO_METHOD)
            self.program.execute(IO_METHOD, [])
            doc = json.loads(self.program.outputs(IO_METHOD, 1)[0])
            return doc if isinstance(doc, dict) else {}
        except (ValueError, RuntimeError, IndexError, TypeError):
            return {}  # a foreign or damaged description: fall back to the method metadata

    def _input_specs(self) -> tuple[TensorSpec, ...]:
        n = self.program.num_inputs(self.method_name)
        names = self.io.get("input_names") or [f"input_{i}" for i in range(n)]
        shapes = self.io.get("input_shapes") or []
        specs = []
        for i, name in enumerate(names):
            try:
                code, planned = self.program.input_meta(self.method_name, i)
            except (RuntimeError, IndexError) as e:  # an int/bool/list argument: nothing to synthesise from
                raise ArtifactLoadError(f"{self.path}: input {i} of method '{self.method_name}' is not a tensor "
                                        f"({_first(e)}); edgeship feeds tensors only") from None
            dtype = _SCALAR_TYPES.get(code, "float32")
            shape: tuple[int | str, ...] = tuple(shapes[i]) if i < len(shapes) else planned
            # a dynamic dim's planned size is its upper bound: memory is planned for it
            self.dim_hints.update({d: (planned[k], "the largest size the program plans memory for")
                                   for k, d in enumerate(shape) if isinstance(d, str) and k < len(planned)})
            specs.append(TensorSpec(name, dtype, shape))
        return tuple(specs)

    def adapt_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
        for s in self.inputs:  # the graph was traced with these dtypes; ints of another width are safe to cast
            v = out.get(s.name)
            if v is not None and str(v.dtype) != s.dtype and np.issubdtype(v.dtype, np.integer) and "int" in s.dtype:
                out[s.name] = v.astype(s.dtype)
        return super().adapt_feeds(out)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._execute(feeds)
        res = self.program.outputs(self.method_name, self._n_outputs)
        return {n: np.asarray(r) for n, r in zip(self.outputs, res, strict=True)}

    def run_timed(self, feeds: Mapping[str, np.ndarray]) -> None:
        # copying outputs to numpy costs ~10 us right after execute() (measured on a 0.28 ms MLP, 3.5% of it)
        # and is no part of what a device app pays
        self._execute(feeds)

    def _execute(self, feeds: Mapping[str, np.ndarray]) -> None:
        arrays = [feeds[s.name] for s in self.inputs]
        try:
            self.program.execute(self.method_name, arrays)
        except RuntimeError as e:  # the runtime logs the failing kernel on stderr and returns only an error code
            raise InputError(f"{self.path.name}: method '{self.method_name}' failed on the inputs ({_first(e)}; the "
                             "runtime's log above names the kernel); it takes "
                             + ", ".join(f"{s.name} {s.dtype}{list(s.shape)}" for s in self.inputs)) from None
        self._ran = True

    def info(self) -> dict[str, Any]:
        lean = self.program.kind == "lean"
        d: dict[str, Any] = {
            "runtime": "executorch",
            "runtime_version": self._version,
            "runtime_path": "C++ runtime through edgeship's ctypes shim (no torch)" if lean
                            else "executorch Python bindings (import torch)",
            "threads": int(self.program.threads()),
            "threads_requested": self.threads,
            "backends_available": self.program.backend_names(),
            "io_described": bool(self.io),
            "method": self.method_name,
            "methods": list(self.methods),
            "notes": [*self.notes] + ([] if lean else
                                      ["the executorch Python runtime imports torch: load time and RSS include it"]),
        }
        others = [m for m in self.methods if m not in (self.method_name, IO_METHOD)]
        if others or not self.io:
            d["notes"].append(f"ran method '{self.method_name}' of {', '.join(self.methods)}"
                              + ("" if self.io else "; inputs synthesised from its metadata (no edgeship I/O description)"))
        if self.per_op:
            d["per_op"] = self.per_op_profile()
        return d

    # ---- per-operator timings ------------------------------------------------------------------
    def per_op_profile(self) -> dict[str, Any]:
        """Per-operator times from an ETDump of a separate, instrumented load of the same program."""
        if self._per_op_result is not None:
            return self._per_op_result
        if not self._ran:
            return {"available": False, "note": "no run yet: per-op timings are taken after the timed runs"}
        prog = self.program
        if not isinstance(prog, _PybindProgram):
            return {"available": False, "note": f"per-op timings need the executorch Python bindings "
                                                f"({prog.kind} runtime loaded; unset EDGESHIP_PTE_RUNTIME)"}
        feeds = prog.last_inputs(self.method_name)
        try:
            from executorch.devtools import Inspector
        except ImportError as e:
            return {"available": False, "note": f"executorch.devtools is not installed ({e}); no per-op timings"}
        with tempfile.TemporaryDirectory(prefix="edgeship-etdump-") as tmp:
            try:
                traced = prog.runtime.load_program(self.path, verification=prog.verification, enable_etdump=True)
                m = traced.load_method(self.method_name)
                for _ in range(self.per_op_runs):
                    m.execute(feeds)
                dump = Path(tmp) / "run.etdp"
                traced.write_etdump_result_to_file(str(dump), str(Path(tmp) / "debug.bin"))
            except RuntimeError as e:
                return {"available": False, "note": f"this executorch build records no ETDump ({_first(e)}); it needs "
                        "a runtime built with EXECUTORCH_ENABLE_EVENT_TRACER"}
            if not dump.is_file() or dump.stat().st_size == 0:
                return {"available": False, "note": "this executorch build wrote an empty ETDump (event tracer off)"}
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "Output Buffer not found": we ask for timings, not tensors
                insp = Inspector(etdump_path=str(dump))
            self._per_op_result = summarize_etdump(insp, self.per_op_runs)
        return self._per_op_result


def summarize_etdump(insp: Any, runs: int) -> dict[str, Any]:
    """Aggregate Inspector events of the ``Execute`` block by operator: mean ms per inference."""
    per_op: dict[str, dict[str, Any]] = {}
    totals = {"delegate_ms": 0.0, "portable_ms": 0.0}
    for block in insp.event_blocks:
        if block.name != "Execute":
            continue
        for ev in block.events:
            raw = list(ev.perf_data.raw) if ev.perf_data is not None else []
            if not raw:
                continue
            mean = float(np.mean(raw))
            if ev.name == "DELEGATE_CALL":
                totals["delegate_ms"] += mean
                continue
            if ev.name == "OPERATOR_CALL":
                totals["portable_ms"] += mean
                continue
            if ev.name in _WRAPPERS:
                continue
            portable = ev.name.startswith("native_call_")
            name = ev.name[len("native_call_"):] if portable else re.sub(r"\s+#\d+$", "", ev.name)
            row = per_op.setdefault(name, {"op": name, "kernel": "portable" if portable else "xnnpack", "calls": 0,
                                           "mean_ms": 0.0})
            row["calls"] += 1
            row["mean_ms"] += mean
    rows = sorted(per_op.values(), key=lambda r: -r["mean_ms"])
    for r in rows:
        r["mean_ms"] = round(r["mean_ms"], 4)
    total = totals["delegate_ms"] + totals["portable_ms"]
    return {"available": True, "runs": runs, "source": "ETDump (executorch event tracer), ms per inference",
            "delegate_ms": round(totals["delegate_ms"], 4), "portable_ms": round(totals["portable_ms"], 4),
            "delegate_share": round(totals["delegate_ms"] / total, 4) if total else None, "ops": rows}


def _first(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:300]
