"""ExecuTorch ``.pte`` decoder LLMs on the device, through the executorch Python runtime.

The program (see :mod:`edgeship.exporters.llm_pte`) has one method, ``forward(tokens[1, T], input_pos[1])``, that
returns the logits of the last of the ``T`` tokens and keeps the KV cache inside the program as mutable buffers. A
prompt is one call (or chunks of ``max_prefill`` tokens), a decode step is a call with one token.

Not torch-free: ``executorch.runtime`` imports torch and torchao (~3 s and ~350 MB RSS before the model loads; a
C++ app on a phone pays neither). Every executorch/torch import happens inside :class:`PteLLMRuntime`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgeship.errors import ArtifactLoadError, RuntimeMissingError
from edgeship.profiling.backends.pte import check_header, limit_threads
from edgeship.profiling.llm.runtime import LLMRuntime

ENTRY = "model.pte"
META_METHOD = "edgeship_llm"


class PteLLMRuntime(LLMRuntime):
    format: ClassVar[str] = "pte"
    torch_free: ClassVar[bool] = False
    requires: ClassVar[tuple[str, ...]] = ("executorch",)
    # The lean C++ runner that keeps encoder .pte files torch-free (profiling/backends/pte_lean.py) does not link
    # the LLM custom ops these programs call (llama::custom_sdpa, update_cache); the Python bindings that do
    # import torch, and a device venv built from pushed wheels does not get torch (hundreds of MB per platform).
    not_provisionable: ClassVar[str | None] = (
        "the .pte LLM runner uses executorch's Python bindings, which import torch, and edgeship does not install "
        "torch on devices")

    def __init__(self, path: Path, runtime: Mapping[str, Any], threads: int | None = None) -> None:
        path = Path(path)
        file = path / str(runtime.get("entry") or ENTRY) if path.is_dir() else path
        if not file.is_file():
            raise ArtifactLoadError(f"{file}: no such ExecuTorch program; re-export it with edgeship export --format pte")
        check_header(file)
        self._torch, program, self._version = _load_program(file, threads)
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
            self._method = program.load_method(self.method_name)
        except Exception as e:  # the C++ loader reports a missing kernel or delegate as an error code
            raise ArtifactLoadError(f"{file}: cannot load method '{self.method_name}' ({_first(e)}); a kernel it needs "
                                    "is missing from this executorch runtime, or the file is damaged") from None
        self.path = file
        self.threads = threads
        self.program = program
        self.max_context = int(meta["max_context"])
        self.vocab_size = int(meta["vocab_size"])
        self.max_prefill = max(1, int(meta.get("max_prefill") or 1))
        self.takes_input_pos = bool(meta.get("takes_input_pos", True))
        if not self.takes_input_pos:
            raise ArtifactLoadError(f"{file}: the program takes no input position; only edgeship's "
                                    "forward(tokens, input_pos) layout is supported")
        self.meta = meta
        self.position = 0

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
        torch = self._torch
        logits: Any = None
        for lo in range(0, len(ids), self.max_prefill):
            chunk = ids[lo:lo + self.max_prefill]
            tokens = torch.tensor([chunk], dtype=torch.long)
            pos = torch.tensor([self.position], dtype=torch.long)
            logits = self._method.execute([tokens, pos])[0]
            self.position += len(chunk)
        # copy: the runtime reuses the output buffer on the next call
        return np.array(logits.numpy().reshape(-1)[-self.vocab_size:], dtype=np.float32, copy=True)

    def info(self) -> dict[str, Any]:
        from executorch.extension.pybindings import portable_lib

        return {
            "runtime": "executorch", "version": self._version,
            "threads": int(portable_lib._threadpool_get_thread_count()), "threads_requested": self.threads,
            "executes": "XNNPACK delegate + ExecuTorch portable/quantized/LLM custom kernels (Python bindings)",
            "kv_cache": f"static, inside the program ({self.max_context} positions), llama::update_cache",
            "method": self.method_name, "max_prefill": self.max_prefill,
            "backends": list(portable_lib._get_registered_backend_names()),
            "notes": ["the executorch Python runtime imports torch: load time and RSS include it"],
        }

    def close(self) -> None:
        self._method = None
        self.program = None


def _load_program(file: Path, threads: int | None) -> tuple[Any, Any, str]:
    try:
        import executorch.kernels.quantized  # noqa: F401  # registers the int8 embedding kernels before a load
        import torch
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  # llama::custom_sdpa, update_cache
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime, Verification
        from executorch.version import __version__
    except ImportError as e:
        raise RuntimeMissingError(f"the executorch runtime is not installed ({e}); pip install 'edgeship[export]' "
                                  "(or executorch) to run .pte LLMs") from None
    limit_threads(portable_lib, torch, threads)
    try:
        program = Runtime.get().load_program(file, verification=Verification.Minimal)
    except Exception as e:
        raise ArtifactLoadError(f"{file}: the executorch runtime cannot load it ({_first(e)}); the file is corrupt, "
                                "truncated or from an incompatible executorch version; re-export it") from None
    return torch, program, str(__version__)


def _embedded_meta(program: Any) -> dict[str, Any]:
    """The runtime dict the exporter stored in the program, so a bare .pte opens without a manifest."""
    if META_METHOD not in program.method_names:
        return {}
    try:
        raw = program.load_method(META_METHOD).execute([])[0]
        doc = json.loads(raw)
    except (ValueError, RuntimeError, IndexError, TypeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


__all__ = ["PteLLMRuntime"]
