"""The seam between the causal-LM export pipeline and the per-format LLM exporters.

Decoder LLMs do not fit the encoder exporter protocol (one graph, one forward, cosine fidelity): they carry a
KV cache, two phases (prefill, decode) and are judged by next-token agreement. The core LLM pipeline
(``edgeship.llm``) loads the model, writes the bundle and measures fidelity through the *device* runtime
(:mod:`edgeship.profiling.llm`); a format only turns a Hugging Face causal LM into files.

Adding an LLM format is one exporter module (a function registered in :data:`LLM_EXPORTERS`), one
:class:`~edgeship.profiling.llm.runtime.LLMRuntime` module on the device side, and the line in
:data:`edgeship.vocab.LLM_FORMATS` that names both (``tests/sdk/test_vocab.py`` checks they agree).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeship.exporters.base import Stage, StageClock
from edgeship.registry import Registry
from edgeship.vocab import LLM_FORMATS

if TYPE_CHECKING:
    from torch import nn

    from edgeship.llm_fidelity import LLMReference
    from edgeship.manifest import LLMFidelity


@dataclass(frozen=True)
class KVCacheDType:
    bytes_per_element: int
    formats: tuple[str, ...] | None  # the formats whose runtime reads a cache of this type (None: every format)
    how: str
    calibrated: bool = False  # its scales come from calibration text (the core tokenizes some for the exporter)


#: the static KV cache's element type (``--kv-cache``). fp32 is what every format's runtime keeps. int8 needs an
#: attention kernel that reads a quantized cache: onnxruntime's GroupQueryAttention does on CPU (per-channel scales
#: calibrated at export); the ExecuTorch and LiteRT graphs here keep fp32 caches.
KV_CACHE_DTYPES = {
    "fp32": KVCacheDType(4, None, "fp32"),
    "int8": KVCacheDType(1, ("onnx",), "int8, symmetric, one scale per KV channel (kv head x head dim) calibrated "
                         "on text the fidelity check does not read", calibrated=True),
}


@dataclass(frozen=True)
class LLMExportRequest:
    """Everything an LLM exporter may use, handed in by the core."""

    model: nn.Module  # a transformers *ForCausalLM in fp32, eval mode, adapters already merged
    hf_dir: Path  # a plain HF directory (config.json + safetensors + tokenizer files) holding the same weights
    recipe: str  # one of LLM_RECIPES
    max_context: int  # static KV-cache length (prompt + generated tokens)
    group_size: int  # block size for grouped (block-wise) 4-bit weights
    out: Path  # a directory the exporter creates and fills (the core stages and renames it atomically)
    workdir: Path  # scratch space, deleted after the export
    options: dict[str, Any] = field(default_factory=dict)
    #: the core's fidelity check on a candidate folder (path, runtime dict), through the device runtime against the
    #: PyTorch fp32 reference; an exporter that searches for what to keep in higher precision scores builds with it
    score: Callable[[Path, dict[str, Any]], LLMFidelity] | None = None
    reference: LLMReference | None = None  # the prompts and PyTorch's greedy continuations that score() uses
    kv_cache: str = "fp32"  # a KV_CACHE_DTYPES key that lists this format (the core checks before it calls)
    #: token sequences as the runtime will see them (plain text, chat-templated turns), disjoint from the reference's,
    #: for an exporter that calibrates scales (the int8 KV cache); filled when the request needs them
    calibration: tuple[tuple[int, ...], ...] = ()
    #: the core's clock: seconds per stage for the manifest, a failure inside one named with it
    clock: StageClock = field(default_factory=lambda: StageClock("llm", lambda m: None))

    def stage(self, stage: Stage) -> AbstractContextManager[None]:
        """``with req.stage(Stage.LOWER): ...``: timed exclusively, as the encoder exporters' stages are."""
        return self.clock.stage(stage)


@dataclass
class LLMExportResult:
    """What one LLM exporter call produced; the core adds checksums, sizes, time and fidelity."""

    files: list[Path]  # every file written, relative to ``request.out``
    runtime: dict[str, Any]  # what the device runtime needs to open it (kind, entry file, methods, dtypes ...)
    quantization: dict[str, Any]  # scheme actually applied (weights bits, group size, activations, embeddings ...)
    kv_cache_bytes_per_token: int  # bytes the static KV cache holds per token of context
    tool: dict[str, str] = field(default_factory=dict)  # tool name -> version that made the files
    warnings: list[str] = field(default_factory=list)


LLMExporter = Callable[[LLMExportRequest], LLMExportResult]

#: format name -> exporter function. Filled by the ``@LLM_EXPORTERS.register`` decorator in each module
#: :data:`LLM_EXPORTER_MODULES` names (from the vocabulary), which the core imports lazily (each pulls its own
#: heavy converter).
LLM_EXPORTERS: Registry[LLMExporter] = Registry("LLM exporter")
LLM_EXPORTER_MODULES = {f.name: f.exporter for f in LLM_FORMATS.values()}


def kv_cache_bytes_per_token(config: Any, bytes_per_element: int = 4) -> int:
    """K and V for every layer and KV head at one position: 2 * layers * kv_heads * head_dim * element size."""
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return 2 * layers * kv_heads * head_dim * bytes_per_element
