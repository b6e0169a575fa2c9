"""ONNX Runtime GenAI folders on the device: ``og.Model`` + one ``og.Generator`` whose KV cache we append to.

Torch-free. ``max_context`` is the folder's ``search.max_length`` (the shared KV buffer the export sized).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgeship.errors import ArtifactLoadError, RuntimeMissingError
from edgeship.profiling.llm.runtime import LLMRuntime

GENAI_CONFIG = "genai_config.json"
PREFILL_CHUNK = 256  # tokens per append_tokens call (128: the same peak within 12 MB, 3% slower at 2000 tokens)


class GenAIRuntime(LLMRuntime):
    format: ClassVar[str] = "onnx"
    torch_free: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = ("onnxruntime-genai",)

    def __init__(self, path: Path, runtime: Mapping[str, Any], threads: int | None = None) -> None:
        try:
            import onnxruntime_genai as og
        except ImportError:
            raise RuntimeMissingError("running ONNX GenAI artifacts needs onnxruntime-genai: pip install "
                                      "'edgeship[llm]'") from None
        self._og = og
        cfg_file = Path(path) / GENAI_CONFIG
        try:
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            self.max_context = int(cfg["search"]["max_length"])
            self.vocab_size = int(cfg["model"]["vocab_size"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ArtifactLoadError(f"{path}: not an ONNX GenAI folder ({GENAI_CONFIG}: {type(e).__name__}: {e}); "
                                    "re-export it") from None
        self.threads = threads
        self.kv_cache_dtype = str(runtime.get("kv_cache_dtype", "fp32"))  # bundles before int8 caches: fp32
        try:
            config = og.Config(str(path))
            if threads:
                config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                    "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
            self._model = og.Model(config)
        except Exception as e:  # onnxruntime-genai raises plain RuntimeError for any broken file
            raise ArtifactLoadError(f"{path}: onnxruntime-genai cannot load it ({str(e).splitlines()[0][:200]}): the "
                                    "folder is corrupt or truncated; re-export or re-copy it") from None
        self._generator: Any = None
        self.reset()

    def reset(self) -> None:
        og = self._og
        # the old generator goes first: each holds a KV buffer of max_length tokens (94 MB for SmolLM2-135M at 2048),
        # and replacing it in one assignment kept both alive while the new one allocated, a second cache at the peak
        self._generator = None
        params = og.GeneratorParams(self._model)
        params.set_search_options(max_length=self.max_context, do_sample=False)
        self._generator = og.Generator(self._model, params)
        self.position = 0

    def append(self, ids: Sequence[int]) -> np.ndarray:
        self.check_room(len(ids))
        # a long prompt goes in chunks: onnxruntime's CPU GroupQueryAttention holds heads x chunk x context fp32
        # scores at once (SmolLM2, a 2000-token prompt in one call: peak 567 MB; in chunks of 256: 381 MB, and
        # 12% sooner to the first token)
        for i in range(0, len(ids), PREFILL_CHUNK):
            self._generator.append_tokens(np.asarray(ids[i:i + PREFILL_CHUNK], dtype=np.int32))
        self.position += len(ids)
        logits = np.asarray(self._generator.get_logits(), dtype=np.float32)
        return logits.reshape(-1, logits.shape[-1])[-1]

    def info(self) -> dict[str, Any]:
        return {"runtime": "onnxruntime-genai", "version": str(self._og.__version__), "threads": self.threads,
                "execution_provider": "CPU", "kv_cache": f"shared buffer of {self.max_context} tokens ({self.kv_cache_dtype})"}

    def close(self) -> None:
        self._generator = None
        self._model = None
