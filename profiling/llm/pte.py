"""ExecuTorch ``.pte`` decoder LLMs on the device.

The program (see :mod:`edgeship.exporters.llm_pte`) has one method, ``forward(tokens[1, T], input_pos[1])``, that
returns the logits of the last of the ``T`` tokens and keeps the KV cache inside the program as mutable buffers. A
prompt is one call (or chunks of ``max_prefill`` tokens), a decode step is a call with one token.

It runs on ExecuTorch's C++ runtime through edgeship's shim (:mod:`edgeship.profiling.backends.pte_lean`). The two
LLM ops outside XNNPACK, ``llama::update_cache`` and ``llama::custom_sdpa``, come from one of two places
(``EDGESHIP_PTE_LLM_KERNELS``, :func:`~edgeship.profiling.backends.pte_lean.llm_kernels_wanted`):

* the shim's own, which load no torch library: the profiler's worker blocks torch and uses these (SmolLM2 int4:
  peak RSS 204 MB, decode as fast as with the wheel's; see the README);
* the executorch wheel's, built against ATen: torch's shared libraries get mapped (about 110 MB RSS) but the torch
  package is not imported. The default in a process that may import torch, since ExecuTorch aborts a process that
  registers a kernel name twice and an export in the same process would load them.

The Python bindings (which import torch: about 350 MB and 3 s more) are the fallback where the shim cannot be built,
said in :meth:`PteLLMRuntime.info`; ``EDGESHIP_PTE_RUNTIME=lean`` makes that an error, ``=pybindings`` forces them.
A remote device still needs the executorch wheel, which edgeship does not provision for LLMs (``not_provisionable``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgeship.errors import ArtifactLoadError, RuntimeMissingError
from edgeship.profiling.backends.pte import _executorch_version, check_header
from edgeship.profiling.llm.runtime import LLMRuntime
from edgeship.quiet import muted_stderr

ENTRY = "model.pte"
META_METHOD = "edgeship_llm"
OWN_KERNELS = "edgeship's update_cache / custom_sdpa (the shim's own; no torch library)"
WHEEL_KERNELS = "the executorch wheel's update_cache / custom_sdpa (built against ATen: torch's libraries mapped)"


class PteLLMRuntime(LLMRuntime):
    format: ClassVar[str] = "pte"
    torch_free: ClassVar[bool] = False
    requires: ClassVar[tuple[str, ...]] = ("executorch",)
    # the runtime itself no longer needs torch (the shim's own LLM kernels), but edgeship's device venv does not
    # install the executorch wheel (its requirements pull torchao and a long list of host-side packages)
    not_provisionable: ClassVar[str | None] = (
        "edgeship does not install the executorch runtime on remote devices yet (its wheel's requirements pull "
        "torchao and host-side packages); run .pte LLMs locally on the device")

    # the wheel's LLM kernels in a process that holds torch, the shim's own elsewhere (pte_lean.llm_kernels_wanted)
    kernels_follow_process: ClassVar[bool] = True

    @classmethod
    def runs_torch_free(cls) -> bool:
        """True where the shim builds here and EDGESHIP_PTE_LLM_KERNELS does not ask for the wheel's kernels: the
        profiler then blocks torch, and the runtime uses the shim's own LLM kernels."""
        from edgeship.profiling.backends import pte_lean

        return pte_lean.llm_kernels_setting() != "executorch" and pte_lean.usable()

    def __init__(self, path: Path, runtime: Mapping[str, Any], threads: int | None = None) -> None:
        path = Path(path)
        file = path / str(runtime.get("entry") or ENTRY) if path.is_dir() else path
        if not file.is_file():
            raise ArtifactLoadError(f"{file}: no such ExecuTorch program; re-export it with edgeship export --format pte")
        check_header(file)
        with muted_stderr():  # ExecuTorch's cpuinfo probes and threadpool reset: six lines before every chat reply
            program, self.notes, self.kernels = _open_program(file, threads)
            program.threads()  # with threads=None the pool (and its probes) would start at the first call, unmuted
        self._version = _executorch_version()
        meta = {**_embedded_meta(program), **dict(runtime)}
        self.method_name = str(meta.get("method") or "forward")
        if self.method_name not in program.method_names:
            raise ArtifactLoadError(f"{file}: no '{self.method_name}' method (it has "
                                    f"{', '.join(sorted(program.method_names))}); not an edgeship LLM .pte")
        missing = [k for k in ("max_context", "vocab_size") if k not in meta]
        if missing:
            raise ArtifactLoadError(f"{file}: the manifest entry and the program both lack {', '.join(missing)}; "
                                    "re-export it with edgeship export --format pte")
        try:
            program.load_method(self.method_name)
        except Exception as e:  # the C++ loader reports a missing kernel or delegate as an error code
            raise ArtifactLoadError(f"{file}: cannot load method '{self.method_name}' ({_first(e)}); a kernel it needs "
                                    "is missing from this executorch runtime, or the file is damaged") from None
        self.path = file
        self.threads = threads
        self.program: Any = program
        self.max_context = int(meta["max_context"])
        self.vocab_size = int(meta["vocab_size"])
        self.max_prefill = max(1, int(meta.get("max_prefill") or 1))
        self.takes_input_pos = bool(meta.get("takes_input_pos", True))
        if not self.takes_input_pos:
            raise ArtifactLoadError(f"{file}: the program takes no input position; only edgeship's "
                                    "forward(tokens, input_pos) layout is supported")
        self.meta = meta
        self.position = 0
        self._closed_info: dict[str, Any] = {}

    def reset(self) -> None:
        # the cache is not cleared: custom_sdpa attends to positions < input_pos + T only, so stale K/V are never read
        self.position = 0

    def append(self, ids: Sequence[int]) -> np.ndarray:
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("append() needs at least one token id")
        self.check_room(len(ids))
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            from edgeship.errors import InputError

            raise InputError(f"token id {bad[0]} is outside this model's vocabulary of {self.vocab_size}")
        logits: Any = None
        for lo in range(0, len(ids), self.max_prefill):
            chunk = ids[lo:lo + self.max_prefill]
            tokens = np.array([chunk], dtype=np.int64)
            pos = np.array([self.position], dtype=np.int64)
            self.program.execute(self.method_name, [tokens, pos])
            logits = self.program.outputs(self.method_name, 1)[0]
            self.position += len(chunk)
        # copy: the bindings reuse the output buffer on the next call (the shim's outputs are copies already)
        return np.array(np.asarray(logits).reshape(-1)[-self.vocab_size:], dtype=np.float32, copy=True)

    def info(self) -> dict[str, Any]:
        if self.program is None:  # closed: what it was
            return dict(self._closed_info)
        lean = self.program.kind == "lean"
        return {
            "runtime": "executorch", "version": self._version,
            "threads": int(self.program.threads()), "threads_requested": self.threads,
            "runtime_path": "C++ runtime through edgeship's ctypes shim" if lean
                            else "executorch Python bindings (import torch)",
            "executes": "XNNPACK delegate + ExecuTorch portable/quantized kernels + LLM kernels: " + self.kernels,
            "kv_cache": f"static, inside the program ({self.max_context} positions), llama::update_cache",
            "method": self.method_name, "max_prefill": self.max_prefill,
            "backends": list(self.program.backend_names()),
            "notes": [*self.notes] + ([] if lean else
                                      ["the executorch Python runtime imports torch: load time and RSS include it"]),
        }

    def close(self) -> None:
        if self.program is not None:
            self._closed_info = self.info()
        program, self.program = self.program, None
        if program is not None and hasattr(program, "close"):
            program.close()


def _open_program(file: Path, threads: int | None) -> tuple[Any, list[str], str]:
    """The encoders' :func:`~edgeship.profiling.backends.pte._open` (the shim where it builds here, else the Python
    bindings, with notes saying which and why), with the LLM kernels registered on the path it takes; and which:
    the wheel's, which map torch's shared libraries, or the shim's own, which need no torch library
    (:func:`~.pte_lean.llm_kernels_wanted`)."""
    from edgeship.profiling.backends import pte_lean
    from edgeship.profiling.backends.pte import _open

    used: list[str] = []

    def register(path: str) -> None:
        if path == "pybindings":
            try:
                from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  # llama::custom_sdpa & co.
            except ImportError as e:
                raise RuntimeMissingError(f"the executorch runtime is not installed ({e}); pip install "
                                          "'edgeship[export]' (or executorch) to run .pte LLMs") from None
            used.append(WHEEL_KERNELS + ", through the Python bindings")
        elif pte_lean.llm_kernels_wanted() == "edgeship":
            used.append(OWN_KERNELS if pte_lean.register_own_llm_kernels() else WHEEL_KERNELS + " (registered already)")
        else:
            pte_lean.load_llm_kernels(threads)
            used.append(WHEEL_KERNELS)

    program, notes = _open(file, threads, per_op=False, kernels=register)
    return program, notes, used[-1]


def _embedded_meta(program: Any) -> dict[str, Any]:
    """The runtime dict the exporter stored in the program, so a bare .pte opens without a manifest."""
    if META_METHOD not in program.method_names:
        return {}
    try:
        program.load_method(META_METHOD)
        program.execute(META_METHOD, [])
        doc = json.loads(program.outputs(META_METHOD, 1)[0])
    except (ValueError, RuntimeError, IndexError, TypeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


__all__ = ["PteLLMRuntime"]
