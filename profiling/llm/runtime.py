"""The device-side protocol every LLM artifact format implements.

One method carries both phases: :meth:`LLMRuntime.append` feeds token ids at the current position (a prompt =
prefill, one id = a decode step) and returns the logits of the last one. That is all generation, TTFT/tok/s timing
and teacher-forced fidelity need, and it maps onto every runtime here (ONNX Runtime GenAI's ``append_tokens``, a
`.pte`'s prefill/decode methods with an input position, LiteRT prefill/decode signatures with KV tensors).

Device side: this module and the runtimes import no torch at module level.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgeship.errors import InputError, UnknownKeyError
from edgeship.vocab import LLM_FORMATS


class ContextOverflowError(InputError):
    """More tokens than the artifact's static KV cache holds."""


class LLMRuntime(ABC):
    """A loaded LLM artifact with its own KV cache, positioned after the tokens appended so far."""

    format: ClassVar[str]
    torch_free: ClassVar[bool] = True
    #: distributions the runtime imports beyond edgeship's plain install: what a remote device is given
    requires: ClassVar[tuple[str, ...]] = ()
    #: why edgeship cannot install this runtime on a remote device (None: it can)
    not_provisionable: ClassVar[str | None] = None
    #: which kernels run depends on the process (one holding torch gets others): the export then measures fidelity
    #: in a fresh process that runs like a device's (:func:`edgeship.llm_fidelity.measure_as_on_device`)
    kernels_follow_process: ClassVar[bool] = False

    @classmethod
    def runs_torch_free(cls) -> bool:
        """Whether this runtime, here, can run in a process that blocks torch (the profiler then blocks it)."""
        return cls.torch_free

    max_context: int  # static KV-cache length the artifact was exported with
    vocab_size: int
    position: int  # tokens appended since the last reset

    @abstractmethod
    def __init__(self, path: Path, runtime: Mapping[str, Any], threads: int | None = None) -> None:
        """``path`` is the artifact (file or directory) in the bundle; ``runtime`` its manifest ``runtime`` entry."""

    @abstractmethod
    def reset(self) -> None:
        """Forget every token: the next :meth:`append` starts at position 0."""

    @abstractmethod
    def append(self, ids: Sequence[int]) -> np.ndarray:
        """Feed ``ids`` at the current position; return float32 logits ``[vocab_size]`` for the last of them.

        Raises :class:`ContextOverflowError` (naming ``max_context``) before running when the cache would overflow.
        """

    @abstractmethod
    def info(self) -> dict[str, Any]:
        """Runtime name and version, threads, what executes (e.g. XNNPACK, CPU EP), and how the KV cache is kept."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release native resources early (optional)."""

    def check_room(self, n: int) -> None:
        if self.position + n > self.max_context:
            raise ContextOverflowError(
                f"{self.position + n} tokens do not fit this artifact's KV cache of {self.max_context}: "
                f"shorten the prompt or --new-tokens, or re-export with a larger --max-context")


#: format -> "module:Class", imported only when an artifact of that format is opened.
_RUNTIMES: dict[str, str] = {f.name: f.runtime for f in LLM_FORMATS.values()}


def register_llm_runtime(fmt: str, ref: str) -> None:
    _RUNTIMES[fmt] = ref


def get_llm_runtime(fmt: str) -> type[LLMRuntime]:
    if fmt not in _RUNTIMES:
        raise UnknownKeyError("LLM artifact format", fmt, _RUNTIMES)
    mod, _, cls = _RUNTIMES[fmt].partition(":")
    return getattr(importlib.import_module(mod), cls)  # type: ignore[no-any-return]


def open_llm(fmt: str, path: Path, runtime: Mapping[str, Any], threads: int | None = None) -> LLMRuntime:
    return get_llm_runtime(fmt)(path, runtime, threads=threads)
