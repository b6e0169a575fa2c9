"""Device runtime for LiteRT decoder LLMs written by :mod:`edgeship.exporters.llm_tflite`, torch-free.

The ``.tflite`` holds ``prefill_<L>`` signatures (a chunk of L token ids, padded, with the index of its last real
token) and a ``decode`` signature (one id); both take and return the KV cache as tensors. This runtime keeps the
cache between calls, feeds a prompt in prefill chunks and single tokens through ``decode``, and returns the logits
of the last token. It runs on ``ai-edge-litert`` or, where only that exists (older Raspberry Pi OS images),
``tflite-runtime`` (:func:`edgeship.profiling.backends.tflite.runtime_module`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgeship.errors import ArtifactLoadError, InputError, RuntimeMissingError
from edgeship.profiling.backends.tflite import check_bounds, check_header, runtime_module
from edgeship.profiling.llm.runtime import LLMRuntime


class TfliteLLMRuntime(LLMRuntime):
    format: ClassVar[str] = "tflite"
    torch_free: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = ("ai-edge-litert",)  # part of the plain install

    def __init__(self, path: Path, runtime: Mapping[str, Any], threads: int | None = None) -> None:
        path = Path(path)
        file = path / str(runtime.get("file", "model.tflite")) if path.is_dir() else path
        if not file.is_file():
            raise ArtifactLoadError(f"{file}: the LiteRT LLM file is missing; re-export with --format tflite")
        check_header(file)
        check_bounds(file)
        try:
            self.max_context = int(runtime["max_context"])
            self.vocab_size = int(runtime["vocab_size"])
            prefill = {int(n): str(s) for n, s in dict(runtime["prefill_signatures"]).items()}
            decode = str(runtime["decode_signature"])
            kv = dict(runtime["kv_cache"])
            self._kv_names = [str(n) for n in kv["names"]]
            kv_shapes = [tuple(int(d) for d in s) for s in kv["shapes"]]
            axes = [int(a) for a in kv["time_axes"]]  # each buffer's position axis
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactLoadError(f"{file}: the manifest's runtime entry lacks {e} (written by another edgeship "
                                    "version?); re-export the bundle") from None
        mod, self._runtime, self._version = runtime_module()
        self.file = file
        self.threads = threads
        try:
            self._interp = mod.Interpreter(model_path=str(file), num_threads=int(threads) if threads else None)
        except (ValueError, RuntimeError) as e:
            raise ArtifactLoadError(f"{file}: the LiteRT runtime ({self._runtime} {self._version}) cannot load it "
                                    f"({_first(e)}); re-copy or re-export it") from None
        sigs = self._interp.get_signature_list()
        missing = [s for s in (decode, *prefill.values()) if s not in sigs]
        if missing:
            raise ArtifactLoadError(f"{file}: signature(s) {', '.join(missing)} missing (it has "
                                    f"{', '.join(sorted(sigs))}); re-export with --format tflite")
        self._kv_shapes = kv_shapes
        self._slice_names = [str(n) for n in kv.get("slices", [])]
        if not len(self._slice_names) == len(self._kv_names) == len(kv_shapes) == len(axes):
            raise ArtifactLoadError(f"{file}: the manifest lists {len(self._kv_names)} KV inputs but "
                                    f"{len(self._slice_names)} KV slice outputs, {len(kv_shapes)} shapes and "
                                    f"{len(axes)} position axes; re-export the bundle")
        try:
            self._decode = _Signature(self._interp, decode, self._kv_names, self._slice_names, axes)
            self._prefill = {n: _Signature(self._interp, s, self._kv_names, self._slice_names, axes)
                             for n, s in sorted(prefill.items())}
        except (AttributeError, TypeError) as e:  # the in-place KV writes use the interpreter wrapper's tensor()
            raise RuntimeMissingError(f"{self._runtime} {self._version} lacks the per-signature tensor access this "
                                      f"runtime needs ({_first(e)}); pip install -U ai-edge-litert") from None
        self.position = 0

    def reset(self) -> None:
        # entries at and past the position are masked by the graph, so the buffers need no clearing
        self.position = 0
        for sig in (self._decode, *self._prefill.values()):
            sig.synced = 0

    def append(self, ids: Sequence[int]) -> np.ndarray:
        toks = np.asarray(list(ids), dtype=np.int64)
        if toks.size == 0:
            raise InputError("append() needs at least one token id")
        if int(toks.min()) < 0 or int(toks.max()) >= self.vocab_size:
            raise InputError(f"token ids must lie in 0..{self.vocab_size - 1} (got {int(toks.min())}.."
                             f"{int(toks.max())}); was the prompt tokenized with this model's tokenizer?")
        self.check_room(int(toks.size))
        logits = np.empty(0, np.float32)
        done = 0
        while done < toks.size:
            n, chunk = self._plan(int(toks.size) - done)
            sig = self._prefill[chunk] if chunk else self._decode
            logits = self._step(sig, toks[done:done + n], chunk or 1)
            done += n
        return logits

    def _plan(self, left: int) -> tuple[int, int]:
        """(tokens to feed, prefill chunk length, or 0 for one decode step) at the current position.

        Whole chunks first (the longest that fits), then the remainder padded into the shortest chunk. A chunk must
        fit the cache from the current position on: LiteRT's DYNAMIC_UPDATE_SLICE clamps a slice that would run
        past the end, which would overwrite earlier entries instead.
        """
        room = self.max_context - self.position
        fits = [c for c in self._prefill if c <= room]
        if left == 1 or not fits:
            return 1, 0
        whole = [c for c in fits if c <= left]
        if whole:
            return max(whole), max(whole)
        return left, min(fits)

    def _step(self, sig: _Signature, toks: np.ndarray, length: int) -> np.ndarray:
        n = int(toks.size)
        self._sync(sig)
        feed = np.zeros((1, length), np.int32)
        feed[0, :n] = toks
        pos = np.arange(self.position, self.position + length, dtype=np.int32)
        logits, slices = sig.run(feed, pos, np.array([n - 1], np.int32) if sig is not self._decode else None)
        start, stop = self.position, self.position + n
        for target in {id(sig): sig, id(self._decode): self._decode}.values():
            target.write(start, n, slices)
            target.synced = stop
        self.position = stop
        return logits.reshape(-1)[: self.vocab_size].astype(np.float32, copy=False)

    def _sync(self, sig: _Signature) -> None:
        """Bring a prefill signature's cache buffers up to the current position from the decode ones (the master)."""
        if sig is self._decode or sig.synced >= self.position:
            return
        sig.copy_from(self._decode, sig.synced, self.position)
        sig.synced = self.position

    def info(self) -> dict[str, Any]:
        return {"runtime": self._runtime, "runtime_version": self._version, "threads": self.threads,
                "executes": "LiteRT interpreter, XNNPACK CPU delegate (default)",
                "kv_cache": f"{len(self._kv_names)} float32 tensors {sorted({str(list(s)) for s in self._kv_shapes})} "
                            "kept by edgeship between "
                            "signature calls", "prefill_chunks": sorted(self._prefill),
                "max_context": self.max_context}

    def close(self) -> None:
        self._prefill.clear()


class _Signature:
    """One signature driven through the interpreter wrapper, with its KV-cache inputs written in place.

    The LiteRT signature runner copies every input in and every output out on each call, which for the KV cache is
    the whole cache twice per token. Here only the token ids, positions and new K/V entries cross into Python; the
    cache inputs are numpy views on the interpreter's own buffers (taken and dropped around each write: the
    interpreter refuses to run while a view is alive, as it may reallocate).
    """

    def __init__(self, interp: Any, key: str, kv_names: Sequence[str], slice_names: Sequence[str],
                 axes: Sequence[int]) -> None:
        runner = interp.get_signature_runner(key)
        self.key = key
        self._w = interp._interpreter  # the pybind wrapper: SetTensor / Invoke / GetTensor / tensor per subgraph
        self._sub = int(runner._subgraph_index)
        ins, outs = dict(runner._inputs), dict(runner._outputs)
        missing = [n for n in (*kv_names, "tokens", "input_pos") if n not in ins]
        missing += [n for n in (*slice_names, "logits") if n not in outs]
        if missing:
            raise ArtifactLoadError(f"signature '{key}' lacks {', '.join(missing)}; re-export with --format tflite")
        self._tokens, self._pos, self._last = ins["tokens"], ins["input_pos"], ins.get("last")
        self._kv = [int(ins[n]) for n in kv_names]
        self._slices = [int(outs[n]) for n in slice_names]
        self._logits = int(outs["logits"])
        self._at = [(slice(None),) * a for a in axes]  # index prefix up to each tensor's position axis
        self._w.AllocateTensors(self._sub)
        for idx in self._kv:  # fresh buffers hold whatever memory they got: NaN bits would survive the mask
            self._view(idx)[...] = 0.0
        self.synced = 0  # positions [0, synced) of this signature's cache buffers are valid

    def _view(self, idx: int) -> np.ndarray:
        return self._w.tensor(self._w, idx, self._sub)  # type: ignore[no-any-return]

    def run(self, tokens: np.ndarray, pos: np.ndarray, last: np.ndarray | None) -> tuple[np.ndarray, list[np.ndarray]]:
        self._w.SetTensor(self._tokens, tokens, self._sub)
        self._w.SetTensor(self._pos, pos, self._sub)
        if self._last is not None and last is not None:
            self._w.SetTensor(self._last, last, self._sub)
        self._w.Invoke(self._sub)
        return self._w.GetTensor(self._logits, self._sub), [self._w.GetTensor(i, self._sub) for i in self._slices]

    def write(self, start: int, n: int, slices: Sequence[np.ndarray]) -> None:
        """The first ``n`` new entries of each slice output into the cache buffers at ``start``."""
        for idx, new, at in zip(self._kv, slices, self._at, strict=True):
            self._view(idx)[(*at, slice(start, start + n))] = new[(*at, slice(0, n))]

    def copy_from(self, other: _Signature, start: int, stop: int) -> None:
        for mine, theirs, at in zip(self._kv, other._kv, self._at, strict=True):
            self._view(mine)[(*at, slice(start, stop))] = other._view(theirs)[(*at, slice(start, stop))]


def _first(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:300]
