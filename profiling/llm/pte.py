"""ExecuTorch ``.pte`` decoder LLMs on the device.

The program (see :mod:`edgeship.exporters.llm_pte`) has one method, ``forward(tokens[1, T], input_pos[1])``, that
returns the logits of the last of the ``T`` tokens and keeps the KV cache inside the program as mutable buffers. A
prompt is one call (or chunks of ``max_prefill`` tokens), a decode step is a call with one token.

It runs on ExecuTorch's C++ runtime through edgeship's shim (:mod:`edgeship.profiling.backends.pte_lean`), with the
wheel's LLM kernels (``llama::custom_sdpa``, ``update_cache``) loaded next to it. Those kernels are built against
ATen, so torch's shared libraries are mapped (about 110 MB RSS), but the torch package is not imported: the
Python bindings, which import it, cost about 350 MB and 3 s before the model loads (SmolLM2 int4: peak RSS see the
README). Not torch-free, then: the device needs the torch wheel installed. Where the shim cannot be built, the
runtime falls back to the Python bindings and says so in :meth:`PteLLMRuntime.info`; ``EDGESHIP_PTE_RUNTIME=lean``
makes that an error, ``=pybindings`` forces the bindings.
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

ENTRY = "model.pte"
META_METHOD = "edgeship_llm"


class PteLLMRuntime(LLMRuntime):
    format: ClassVar[str] = "pte"
    torch_free: ClassVar[bool] = False
    requires: ClassVar[tuple[str, ...]] = ("executorch",)
    # Not torch-free: the wheel's LLM kernels these programs call (llama::custom_sdpa, update_cache) link torch's
    # shared libraries (the C++ path maps them without importing torch; the Python bindings import it), and a device
    # venv built from pushed wheels does not get torch (hundreds of MB per platform).
    not_provisionable: ClassVar[str | None] = (
        "the .pte LLM runner needs executorch's LLM kernels, which link torch's libraries, and edgeship does not "
        "install torch on devices")

    def __init__(self, path: Path, runtime: Mapping[str, Any], threads: int | None = None) -> None:
        path = Path(path)
        file = path / str(runtime.get("entry") or ENTRY) if path.is_dir() else path
        if not file.is_file():
            raise ArtifactLoadError(f"{file}: no such ExecuTorch program; re-export it with edgeship export --format pte")
        check_header(file)
        program, self.notes = _open_program(file, threads)
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
            "runtime_path": ("C++ runtime through edgeship's ctypes shim, with the wheel's LLM kernels (torch's "
                             "shared libraries mapped, the torch package not imported)") if lean
                            else "executorch Python bindings (import torch)",
            "executes": "XNNPACK delegate + ExecuTorch portable/quantized/LLM custom kernels",
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


def _open_program(file: Path, threads: int | None) -> tuple[Any, list[str]]:
    """The shim with the LLM kernels where it builds here, else the Python bindings; notes say which and why."""
    from edgeship.profiling.backends import pte_lean
    from edgeship.profiling.backends.pte import _lean_program

    try:
        mode = pte_lean.mode()
    except pte_lean.LeanUnavailable as e:
        raise ArtifactLoadError(str(e)) from None
    notes: list[str] = []
    if mode == "pybindings":
        notes.append(f"{pte_lean.ENV}=pybindings: ran through the executorch Python bindings (they import torch)")
    else:
        try:
            pte_lean.load_llm_kernels(threads)
            return _lean_program(file, threads), notes
        except pte_lean.LeanUnavailable as e:
            if mode == "lean":
                raise RuntimeMissingError(f"{pte_lean.ENV}=lean: the C++ ExecuTorch runtime is unavailable ({e})"
                                          ) from None
            notes.append(f"C++ runtime unavailable ({e}): ran through the executorch Python bindings, so load time "
                         "and RSS include torch (~350 MB)")
        except RuntimeError as e:
            raise ArtifactLoadError(f"{file}: the executorch runtime cannot load it ({_first(e)}); the file is "
                                    "corrupt, truncated or from an incompatible executorch version; re-export it"
                                    ) from None
    return _pybindings(file, threads), notes


def _pybindings(file: Path, threads: int | None) -> Any:
    from edgeship.profiling.backends.pte import _PybindProgram

    try:
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  # llama::custom_sdpa, update_cache
    except ImportError as e:
        raise RuntimeMissingError(f"the executorch runtime is not installed ({e}); pip install 'edgeship[export]' "
                                  "(or executorch) to run .pte LLMs") from None
    try:
        return _PybindProgram(file, threads)
    except RuntimeMissingError:
        raise
    except Exception as e:
        raise ArtifactLoadError(f"{file}: the executorch runtime cannot load it ({_first(e)}); the file is corrupt, "
                                "truncated or from an incompatible executorch version; re-export it") from None


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
