"""ONNX Runtime backend (torch-free)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgeship.errors import ArtifactLoadError, RuntimeMissingError
from edgeship.profiling import fpenv
from edgeship.profiling.backends import Backend, option_flag
from edgeship.profiling.backends.onnx_mapped import mapped_graph
from edgeship.spec import TensorSpec, dim_name

_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64", "tensor(int32)": "int32",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(bool)": "bool",
}
_LEVELS = ("disable", "basic", "extended", "all")
OPTIONS = ("graph_optimization", "providers", "disabled_optimizers", "denormal_as_zero", "map_weights",
           "memory_pattern")


class OnnxBackend(Backend):
    format: ClassVar[str] = "onnx"
    suffix: ClassVar[str] = ".onnx"
    options_accepted: ClassVar[tuple[str, ...]] = OPTIONS

    def __init__(self, path: Path, threads: int | None = None, options: Mapping[str, Any] | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise RuntimeMissingError(f"onnxruntime is not installed ({e}); pip install edgeship (the runtime "
                                      "install brings it) or pip install onnxruntime") from None
        opts = self.checked_options(options)
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        # ONNX Runtime's own default; QDQ int8 needs >= "extended" to run as int8 kernels
        level = str(opts.get("graph_optimization", "all"))
        if level not in _LEVELS:
            raise ArtifactLoadError(f"onnx option graph_optimization={level!r}: use one of {', '.join(_LEVELS)}")
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[level]
        # Padded tokens drive attention scores to denormals; x86 handles those in microcode (MiniLM int8 with
        # 114 of 128 tokens padded: 7.0 ms -> 4.7 ms with flush-to-zero). Exporters set it per artifact.
        self.denormal_as_zero = str(opts.get("denormal_as_zero", False)).lower() in ("1", "true", "yes")
        if self.denormal_as_zero:
            so.add_session_config_entry("session.set_denormal_as_zero", "1")
        available = list(ort.get_available_providers())
        requested = [p for p in opts.get("providers", []) if p != "CPUExecutionProvider"]
        self.provider_notes = [f"{p} requested but not in this onnxruntime build (available: {', '.join(available)}); "
                               "ran on CPUExecutionProvider" for p in requested if p not in available]
        providers = [p for p in requested if p in available] + ["CPUExecutionProvider"]
        disabled = opts.get("disabled_optimizers") or []
        if isinstance(disabled, str):
            disabled = [d for d in disabled.split(",") if d]
        # ORT's memory pattern plans one block for a run's activations per input shape and keeps it: MiniLM at 128
        # dense tokens 83.0 -> 77.2 MB peak RSS (int4) without it, fp32 and int8 latency unchanged within noise
        self.memory_pattern = option_flag(opts.get("memory_pattern", False))
        so.enable_mem_pattern = self.memory_pattern
        self.weights = "loaded"
        mapped = mapped_graph(path) if option_flag(opts.get("map_weights", True)) else None
        try:
            # ORT leaves flush-to-zero on this thread after the first session (or never sets it for later
            # ones): undo that, and apply the mode around run() only (fpenv.py)
            with fpenv.preserved():
                self.session = self._session(ort, path, so, providers, disabled, mapped)
        except Exception as e:  # ORT raises its own Fail/InvalidProtobuf/RuntimeException types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ArtifactLoadError(f"{path}: onnxruntime cannot load it; the file is corrupt, truncated or not "
                                    f"ONNX ({first[:300]}); re-export or re-copy it") from None
        self._run_env = fpenv.flush_to_zero() if self.denormal_as_zero else None
        self._mode_on = False
        self.path = path
        self.threads = threads
        self.level = level
        self.disabled_optimizers = list(disabled)
        self.available_providers = available
        self.inputs = tuple(
            # anonymous dims (None, '?') get a name of their own position: converters often call every dim '?'
            TensorSpec(i.name, _ORT_TYPES.get(i.type, "float32"), tuple(dim_name(i.name, k, d) for k, d in enumerate(i.shape)))
            for i in self.session.get_inputs()
        )
        self.outputs = tuple(o.name for o in self.session.get_outputs())
        self._version = ort.__version__

    def _session(self, ort: Any, path: Path, so: Any, providers: list[str], disabled: list[str],
                 mapped: tuple[bytes, int] | None) -> Any:
        """The session, its weights memory-mapped from the artifact file where the graph allows (onnx_mapped.py);
        the file as it is when not, or when onnxruntime refuses the mapped graph (it then says why on the file)."""
        if mapped is not None:
            graph, n = mapped
            so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                        str(path.resolve().parent))
            try:
                session = ort.InferenceSession(graph, sess_options=so, providers=providers,
                                               disabled_optimizers=list(disabled) or None)
                self.weights = f"memory-mapped from the file ({n} initializers)"
                return session
            except Exception as e:  # fall back: the artifact's own load reports a real problem on the file
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                self.weights = f"loaded (mapping them failed: {first[:200]})"
                self.provider_notes.append(f"weights not memory-mapped, so peak RSS holds a copy of each: onnxruntime "
                                           f"refused the mapped graph ({first[:200]}); --option map_weights=false "
                                           "skips the attempt")
        return ort.InferenceSession(str(path), sess_options=so, providers=providers,
                                    disabled_optimizers=list(disabled) or None)

    @contextlib.contextmanager
    def float_mode(self) -> Iterator[None]:
        with fpenv.applied(self._run_env):
            self._mode_on = True
            try:
                yield
            finally:
                self._mode_on = False

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._mode_on:  # inside float_mode(): the mode is already on (fegetenv/fesetenv cost 2-4 us a call)
            res = self.session.run(None, dict(feeds))
            return {n: np.asarray(v) for n, v in zip(self.outputs, res, strict=True)}
        with fpenv.applied(self._run_env):
            res = self.session.run(None, dict(feeds))
        return {n: np.asarray(v) for n, v in zip(self.outputs, res, strict=True)}

    def info(self) -> dict[str, Any]:
        return {
            "runtime": "onnxruntime",
            "runtime_version": self._version,
            "threads": self.threads,
            "graph_optimization": self.level,
            "disabled_optimizers": self.disabled_optimizers,
            "denormal_as_zero": self.denormal_as_zero,
            "memory_pattern": self.memory_pattern,
            "providers_available": self.available_providers,
            "providers_used": list(self.session.get_providers()),
            "notes": self.provider_notes,
            "weights": self.weights,
        }
