"""Device runtime for ``.litertlm`` LLM bundles (:mod:`edgeship.exporters.llm_litertlm`), torch-free.

Two paths over the same file, because LiteRT-LM's Python API (``litert-lm-api`` 0.18.1) is text in / text out:
``Session.run_prefill`` takes strings (the engine tokenizes with the packed ``tokenizer.json`` and prepends the
start token, if the metadata has one), ``run_decode``/``run_decode_async`` return text and no logits, and there is
no token-id input. So:

* **generation and timing** (``edgeship profile``, ``chat``) go through the LiteRT-LM engine
  (:meth:`LiteRTLMRuntime.generate_timed`): prompt ids are detokenized by the engine's own tokenizer, prefilled as
  text, decoded greedily (top-k 1) and streamed; the engine's own benchmark counters give the real prompt and
  generated token counts;
* **logits** (:meth:`LiteRTLMRuntime.append`, used by edgeship's teacher-forced fidelity) come from the ``.tflite``
  section packed in the file, run on the LiteRT interpreter through its stock ``decode`` signature one token at a
  time (the whole KV cache in and out of each call: slow, but the same bytes the engine runs).
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgeship.errors import ArtifactLoadError, InputError, RuntimeMissingError
from edgeship.profiling.backends.tflite import runtime_module
from edgeship.profiling.llm.runtime import ContextOverflowError, LLMRuntime

MAGIC = b"LITERTLM"  # litert-lm-builder's header magic (8 bytes), then major/minor/patch uint32
TFLITE_SECTION = "TFLiteModel"


@dataclass(frozen=True)
class GenerationTiming:
    """One greedy generation through the engine: real token counts from the engine's benchmark counters."""

    prompt_tokens: int  # as the engine tokenized the prompt text (incl. a start token it prepended)
    prefill_ns: int  # run_prefill wall time
    ttft_ns: int  # run_prefill start to the first streamed text chunk
    chunk_ns: tuple[int, ...]  # wall time of each streamed chunk after the first (one token, or a few bytes' worth)
    decode_tokens: int  # tokens the engine generated (it stops early at a stop token)
    decode_seconds: float  # first chunk to last
    text: str


def tflite_section(path: Path) -> tuple[int, int]:
    """(begin, end) byte offsets of the packed TFLite model, read with litert-lm-builder's own header reader."""
    import io

    try:
        from litert_lm_builder import litertlm_core, litertlm_peek
    except ImportError as e:
        raise RuntimeMissingError(f"reading a .litertlm needs litert-lm-builder ({e}); "
                                  "pip install 'edgeship[llm]'") from None
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:8] != MAGIC:
        raise ArtifactLoadError(f"{path}: not a .litertlm file (no '{MAGIC.decode()}' magic); re-export it with "
                                "--format litertlm")
    try:
        meta = litertlm_peek.read_litertlm_header(str(path), io.StringIO())
        sections = meta.SectionMetadata()
        size = path.stat().st_size
        for i in range(sections.ObjectsLength() if sections else 0):
            s = sections.Objects(i)
            if litertlm_core.any_section_data_type_to_string(s.DataType()) == TFLITE_SECTION:
                begin, end = int(s.BeginOffset()), int(s.EndOffset())
                if not 0 < begin < end <= size:
                    raise ArtifactLoadError(f"{path}: the TFLite section ({begin}..{end}) lies outside the "
                                            f"{size}-byte file (truncated?); re-copy or re-export it")
                return begin, end
    except (struct.error, ValueError, IndexError) as e:
        raise ArtifactLoadError(f"{path}: the .litertlm header is unreadable ({e}); re-copy or re-export it") from None
    raise ArtifactLoadError(f"{path}: the .litertlm holds no TFLite model section; re-export it")


class LiteRTLMRuntime(LLMRuntime):
    format: ClassVar[str] = "litertlm"
    torch_free: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = ("litert-lm-api", "litert-lm-builder", "ai-edge-litert")
    not_provisionable: ClassVar[str | None] = None
    #: the profiler times generation with :meth:`generate_timed` (the engine), not with :meth:`append`
    timed_generation: ClassVar[bool] = True

    def __init__(self, path: Path, runtime: Mapping[str, Any], threads: int | None = None) -> None:
        path = Path(path)
        file = path / str(runtime.get("file", "model.litertlm")) if path.is_dir() else path
        if not file.is_file():
            raise ArtifactLoadError(f"{file}: the .litertlm file is missing; re-export with --format litertlm")
        try:
            self.max_context = int(runtime["max_context"])
            self.vocab_size = int(runtime["vocab_size"])
            self._decode_sig = str(runtime.get("decode_signature", "decode"))
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactLoadError(f"{file}: the manifest's runtime entry lacks {e}; re-export the bundle") from None
        self._section = tflite_section(file)
        try:
            import litert_lm
        except ImportError as e:
            raise RuntimeMissingError(f"running a .litertlm needs litert-lm-api ({e}); pip install 'edgeship[llm]' "
                                      "(wheels exist for x86-64 Linux)") from None
        self._lm = litert_lm
        self.file, self.threads = file, threads
        self._cache_dir = tempfile.mkdtemp(prefix="edgeship-litertlm-")  # compiled-model caches stay out of bundles
        with contextlib.suppress(AttributeError):
            litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
        backend = litert_lm.Backend.CPU(thread_count=int(threads)) if threads else litert_lm.Backend.CPU()
        try:
            self._engine = litert_lm.Engine(str(file), backend=backend, max_num_tokens=self.max_context,
                                            cache_dir=self._cache_dir, enable_benchmark=True)
        except RuntimeError as e:
            shutil.rmtree(self._cache_dir, ignore_errors=True)
            raise ArtifactLoadError(f"{file}: LiteRT-LM ({_version('litert-lm-api')}) cannot load it ({e}); "
                                    "re-copy or re-export it") from None
        self._interp: Any = None
        self._kv: dict[str, np.ndarray] = {}
        self.position = 0

    # ---- logits: the packed .tflite on the LiteRT interpreter (teacher-forced fidelity) ----------------------------
    def _runner(self) -> Any:
        if self._interp is None:
            mod, self._lite, self._lite_version = runtime_module()
            begin, end = self._section
            with open(self.file, "rb") as f:
                f.seek(begin)
                content = f.read(end - begin)
            try:
                self._interp = mod.Interpreter(model_content=content,
                                               num_threads=int(self.threads) if self.threads else None)
                runner = self._interp.get_signature_runner(self._decode_sig)
            except (ValueError, RuntimeError) as e:
                raise ArtifactLoadError(f"{self.file}: the packed .tflite does not load on {self._lite} "
                                        f"{self._lite_version} ({str(e).splitlines()[0][:200]})") from None
            self._decode = runner
            self._kv_spec = {n: (tuple(int(d) for d in v["shape"]), v["dtype"])
                             for n, v in runner.get_input_details().items() if n.startswith("kv_cache_")}
            self._zero_kv()
        return self._decode

    def _zero_kv(self) -> None:
        self._kv = {n: np.zeros(shape, dtype) for n, (shape, dtype) in getattr(self, "_kv_spec", {}).items()}

    def reset(self) -> None:
        self.position = 0
        self._zero_kv()

    def append(self, ids: Sequence[int]) -> np.ndarray:
        toks = [int(i) for i in ids]
        if not toks:
            raise InputError("append() needs at least one token id")
        if min(toks) < 0 or max(toks) >= self.vocab_size:
            raise InputError(f"token ids must lie in 0..{self.vocab_size - 1} (got {min(toks)}..{max(toks)}); was "
                             "the prompt tokenized with this model's tokenizer?")
        self.check_room(len(toks))
        runner = self._runner()
        out: dict[str, np.ndarray] = {}
        for t in toks:
            out = runner(tokens=np.array([[t]], np.int32), input_pos=np.array([self.position], np.int32), **self._kv)
            self._kv = {n: out[n] for n in self._kv}
            self.position += 1
        return np.asarray(out["logits"], np.float32).reshape(-1)[: self.vocab_size]

    # ---- generation: the LiteRT-LM engine ----------------------------------------------------------------------------
    def prompt_text(self, ids: Sequence[int]) -> str:
        return self._engine.detokenize([int(i) for i in ids])

    def generate_timed(self, ids: Sequence[int], new_tokens: int) -> GenerationTiming:
        """Greedy generation of up to ``new_tokens`` after the prompt ``ids`` (detokenized, then prefilled as text)."""
        if len(ids) + new_tokens > self.max_context:
            raise ContextOverflowError(f"{len(ids)} prompt tokens plus {new_tokens} new ones do not fit this "
                                       f"artifact's max context {self.max_context}: shorten the prompt or "
                                       "--new-tokens, or re-export with a larger --max-context")
        text = self.prompt_text(ids)
        lm = self._lm
        session = self._engine.create_session(apply_prompt_template=False, max_output_tokens=int(new_tokens),
                                              sampler_config=lm.SamplerConfig(top_k=1, temperature=0.0, seed=0))
        try:
            t0 = time.perf_counter_ns()
            try:
                session.run_prefill([text])
            except RuntimeError as e:
                raise InputError(f"LiteRT-LM refused the prompt ({e}); is it longer than the max context "
                                 f"{self.max_context}?") from None
            prefill_ns = time.perf_counter_ns() - t0
            stamps, chunks = [], []
            for r in session.run_decode_async():
                stamps.append(time.perf_counter_ns())
                chunks.append("".join(r.texts))
            info = session.get_benchmark_info()
        finally:
            session.close()
        if not stamps:
            raise InputError("LiteRT-LM generated nothing for the prompt (a stop token first?)")
        return GenerationTiming(
            prompt_tokens=int(info.last_prefill_token_count), prefill_ns=prefill_ns, ttft_ns=stamps[0] - t0,
            chunk_ns=tuple(b - a for a, b in itertools.pairwise(stamps)),
            decode_tokens=int(info.last_decode_token_count), decode_seconds=(stamps[-1] - stamps[0]) / 1e9,
            text="".join(chunks))

    def stream_text(self, ids: Sequence[int], new_tokens: int) -> Iterator[str]:
        """Greedy reply to the prompt ``ids`` (already chat-templated), streamed as the engine emits text."""
        yield from self._stream(self.prompt_text(ids), new_tokens)

    def generate_text(self, prompt: str, new_tokens: int) -> str:
        """Greedy reply to ``prompt`` as given (no chat template applied here)."""
        return "".join(self._stream(prompt, new_tokens))

    def _stream(self, prompt: str, new_tokens: int) -> Iterator[str]:
        session = self._engine.create_session(apply_prompt_template=False, max_output_tokens=int(new_tokens),
                                              sampler_config=self._lm.SamplerConfig(top_k=1, temperature=0.0, seed=0))
        try:
            session.run_prefill([prompt])
            for r in session.run_decode_async():
                yield "".join(r.texts)
        finally:
            session.close()

    def info(self) -> dict[str, Any]:
        return {"runtime": "litert-lm-api", "runtime_version": _version("litert-lm-api"), "threads": self.threads,
                "executes": "LiteRT-LM engine, CPU backend (generation and timing); the packed .tflite on the "
                            "LiteRT interpreter for logits (teacher-forced fidelity only)",
                "io": "text in/out: prompt ids detokenized by the engine's tokenizer, re-tokenized by the engine",
                "kv_cache": "kept by the LiteRT-LM engine", "max_context": self.max_context}

    def close(self) -> None:
        self._interp = None
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.close()
            self._engine = None
        shutil.rmtree(getattr(self, "_cache_dir", ""), ignore_errors=True)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"
