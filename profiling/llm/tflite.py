"""Device runtime for LiteRT decoder LLMs written by :mod:`edgeship.exporters.llm_tflite`, torch-free.

The ``.tflite`` holds ``prefill_<L>`` signatures (a chunk of L token ids, padded, with the index of its last real
token) and ``decode`` signatures (one id) over caches of several lengths; all take the KV cache as inputs and return
the entries of the new positions. This runtime keeps the cache between calls, writes the new entries into it,
feeds a prompt in prefill chunks (over the short cache of ``prefill_<L>_<C>`` while the chunk fits it, else over the
full one) and single tokens through the decode signature with the shortest cache that holds the position, and
returns the logits of the last token.

Two engines run the file:

* ``ai-edge-litert``'s ``CompiledModel`` (the default): XNNPACK with its weight cache, so the packed weights exist
  once for all signatures instead of once per signature, and the cache arrays bound zero-copy (``TensorBuffer``
  over host memory, which the Python API takes as a vector only: hence the exporter's flat cache inputs). The
  prefill and full-length decode signatures share one set of arrays; the shorter decode caches share one scratch
  set, refilled from the full one when the position outgrows them. SmolLM2-135M int8 at context 2048 (2 threads,
  this repo's Intel VM): peak RSS 993 -> 475 MB, decode 55 -> 98 tok/s at position 100 (84 at 300, 63 at 600),
  but 54 -> 43 tok/s past half the context: XNNPACK copies each flat input into its 4-D view every call (a
  RESHAPE of a graph input), 20% of the samples at the full length, into each signature's own arena (so memory
  grows by a cache copy for each signature a session has run: 475 MB for short replies, 754 with all six).
* the interpreter (``tflite-runtime``, on older Raspberry Pi OS images, or a bundle from before flat caches): each
  signature owns its cache buffers, written in place through the interpreter's tensor views; it runs the prefill
  and full-length decode signatures only, since every further signature would add its own packed weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgeship.errors import ArtifactLoadError, InputError, RuntimeMissingError
from edgeship.profiling.backends.tflite import (
    check_bounds,
    check_header,
    compile_with_weight_cache,
    runtime_module,
)
from edgeship.profiling.llm.runtime import LLMRuntime
from edgeship.quiet import muted_stderr


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
            short_prefill = {int(c): {int(n): str(k) for n, k in dict(sigs).items()}
                             for c, sigs in dict(runtime.get("prefill_signatures_short") or {}).items()}
            decode = {int(c): str(s) for c, s in dict(runtime.get("decode_signatures")
                                                      or {self.max_context: runtime["decode_signature"]}).items()}
            kv = dict(runtime["kv_cache"])
            kv_names = [str(n) for n in kv["names"]]
            slice_names = [str(n) for n in kv.get("slices", [])]
            shapes = [tuple(int(d) for d in s) for s in kv["shapes"]]  # at max_context
            axes = [int(a) for a in kv["time_axes"]]  # each buffer's position axis
            flat = bool(kv.get("flat", False))
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactLoadError(f"{file}: the manifest's runtime entry lacks {e} (written by another edgeship "
                                    "version?); re-export the bundle") from None
        if not len(slice_names) == len(kv_names) == len(shapes) == len(axes):
            raise ArtifactLoadError(f"{file}: the manifest lists {len(kv_names)} KV inputs but {len(slice_names)} "
                                    f"KV slice outputs, {len(shapes)} shapes and {len(axes)} position axes; "
                                    "re-export the bundle")
        if self.max_context not in decode:
            raise ArtifactLoadError(f"{file}: no decode signature over the full context of {self.max_context} "
                                    f"(it lists {sorted(decode)}); re-export the bundle")
        mod, self._runtime, self._version = runtime_module()
        self.file, self.threads = file, threads
        self._layout = _Layout(kv_names, slice_names, shapes, axes)
        if flat and self._runtime == "ai-edge-litert":
            engine: _Engine = _Compiled(file, threads, self._layout, prefill, decode, self.max_context, short_prefill)
        else:  # the interpreter: full-length signatures only
            engine = _Interpreted(mod, file, threads, self._layout, prefill, decode[self.max_context],
                                  self.max_context, f"{self._runtime} {self._version}")
        self._engine = engine
        self._prefill = engine.prefill
        self._prefill_short = engine.prefill_short
        self._decode = engine.decode  # context -> signature, ascending
        self._chunks, self._contexts = sorted(self._prefill), sorted(self._decode)  # for info(), also after close()
        self._short_shown = {str(c): sorted(sigs) for c, sigs in self._prefill_short.items()}
        self._full = self._decode[max(self._decode)].cache
        self._master = self._full  # the cache set holding [0, position)
        self.position = 0

    def reset(self) -> None:
        # entries at and past the position are masked by the graph, so the arrays need no clearing
        self.position = 0
        for sig in (*self._prefill.values(), *self._decode.values()):  # the short prefills share the decode caches
            sig.cache.synced = 0
        self._master = self._full

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
            sig = self._prefill_sig(chunk) if chunk else next(s for c, s in self._decode.items() if c > self.position)
            logits = self._step(sig, toks[done:done + n], chunk or 1)
            done += n
        return logits

    def _plan(self, left: int) -> tuple[int, int]:
        """(tokens to feed, prefill chunk length, or 0 for one decode step) at the current position.

        Whole chunks first (the longest that fits), then the remainder padded into the shortest chunk. A chunk must
        fit the cache from the current position on: the runtime writes its entries there.
        """
        room = self.max_context - self.position
        fits = [c for c in self._prefill if c <= room]
        if left == 1 or not fits:
            return 1, 0
        whole = [c for c in fits if c <= left]
        if whole:
            return max(whole), max(whole)
        return left, min(fits)

    def _prefill_sig(self, chunk: int) -> _Sig:
        """The chunk's prefill over the shortest cache that holds it from the current position."""
        for context, sigs in self._prefill_short.items():
            if self.position + chunk <= context and chunk in sigs:
                return sigs[chunk]
        return self._prefill[chunk]

    def _step(self, sig: _Sig, toks: np.ndarray, length: int) -> np.ndarray:
        n = int(toks.size)
        self._ready(sig.cache)
        feed = np.zeros((1, length), np.int32)
        feed[0, :n] = toks
        pos = np.arange(self.position, self.position + length, dtype=np.int32)
        logits, slices = sig.run(feed, pos, np.array([n - 1], np.int32) if sig.prefill else None)
        sig.cache.write(self.position, n, slices)
        self.position += n
        sig.cache.synced = self.position
        self._master = sig.cache
        return logits.reshape(-1)[: self.vocab_size].astype(np.float32, copy=False)

    def _ready(self, target: _Cache) -> None:
        """Bring ``target`` up to the current position from the set last written (through the full set between
        two shorter ones: they may share memory)."""
        if target.synced >= self.position:
            return
        src = self._master
        if src is not self._full and target is not self._full:
            self._full.copy_from(src, self._full.synced, self.position)
            self._full.synced = self.position
            src = self._full
        target.copy_from(src, target.synced, self.position)
        target.synced = self.position
        for other in target.aliases:
            other.synced = 0

    def info(self) -> dict[str, Any]:
        return {"runtime": self._runtime, "runtime_version": self._version, "threads": self.threads,
                "executes": self._engine.executes,
                "kv_cache": f"{len(self._layout.names)} float32 arrays {self._layout.shown(self.max_context)} kept "
                            "by edgeship between signature calls" + self._engine.kv_note,
                "prefill_chunks": self._chunks, "decode_contexts": self._contexts,
                "prefill_short": self._short_shown,
                "max_context": self.max_context}

    def close(self) -> None:
        self._prefill, self._prefill_short, self._decode = {}, {}, {}  # the engine's buffers hold its environment
        self._engine.close()


class _Layout:
    """The manifest's KV-cache entry: input and output names, shapes at max_context, each tensor's position axis."""

    def __init__(self, names: list[str], slices: list[str], shapes: list[tuple[int, ...]], axes: list[int]) -> None:
        self.names, self.slices, self.axes = names, slices, axes
        self._shapes = shapes
        self._at = [(slice(None),) * a for a in axes]  # index prefix up to each tensor's position axis

    def shapes(self, context: int) -> list[tuple[int, ...]]:
        return [(*s[:a], context, *s[a + 1:]) for s, a in zip(self._shapes, self.axes, strict=True)]

    def shown(self, context: int) -> str:
        return str(sorted({str(list(s)) for s in self.shapes(context)}))

    def positions(self, i: int, start: int, stop: int) -> tuple[slice, ...]:
        return (*self._at[i], slice(start, stop))


class _Cache:
    """One set of KV-cache arrays (one per input tensor) and how far it is valid."""

    def __init__(self, layout: _Layout, arrays: Callable[[], list[np.ndarray]],
                 flat: Sequence[np.ndarray] = ()) -> None:
        self.layout, self.arrays = layout, arrays
        self.flat = list(flat)  # the same memory as vectors, for zero-copy binding (CompiledModel only)
        self.synced = 0  # positions [0, synced) are valid
        self.aliases: list[_Cache] = []  # sets sharing this one's memory

    def write(self, start: int, n: int, slices: Sequence[np.ndarray]) -> None:
        """The first ``n`` new entries of each slice output, into the arrays at ``start``."""
        pos = self.layout.positions
        for i, (mine, new) in enumerate(zip(self.arrays(), slices, strict=True)):
            mine[pos(i, start, start + n)] = new[pos(i, 0, n)]

    def copy_from(self, other: _Cache, start: int, stop: int) -> None:
        pos = self.layout.positions
        for i, (mine, theirs) in enumerate(zip(self.arrays(), other.arrays(), strict=True)):
            mine[pos(i, start, stop)] = theirs[pos(i, start, stop)]


class _Sig:
    """One signature: its cache set and a run of token ids and positions -> (logits, new K/V entries)."""

    prefill: bool
    cache: _Cache

    def run(self, tokens: np.ndarray, pos: np.ndarray, last: np.ndarray | None) -> tuple[np.ndarray, list[np.ndarray]]:
        raise NotImplementedError


class _Engine:
    prefill: dict[int, _Sig]  # chunk length -> signature over the full cache
    prefill_short: dict[int, dict[int, _Sig]]  # cache length (ascending) -> chunk length -> signature over that cache
    decode: dict[int, _Sig]  # cache length -> signature, ascending
    executes: str
    kv_note: str = ""

    def close(self) -> None:
        pass


class _Compiled(_Engine):
    """``CompiledModel`` on XNNPACK with a weight cache, cache arrays bound zero-copy."""

    def __init__(self, file: Path, threads: int | None, layout: _Layout, prefill: Mapping[int, str],
                 decode: Mapping[int, str], max_context: int,
                 short_prefill: Mapping[int, Mapping[int, str]] | None = None) -> None:
        # XNNPACK packs each signature's weights for its kernels; with a weight cache file it packs them once
        try:
            self.model = compile_with_weight_cache(file, threads)
        except (RuntimeError, ValueError) as e:
            raise ArtifactLoadError(f"{file}: LiteRT cannot compile it ({_first(e)}); re-copy or re-export it") from None
        sigs = self.model.get_signature_list()
        short_prefill = {c: m for c, m in (short_prefill or {}).items() if c in decode and c < max_context}
        _check_signatures(file, sigs, [*prefill.values(), *decode.values(),
                                       *(k for m in short_prefill.values() for k in m.values())], layout)
        self._memory: list[np.ndarray] = []  # every array bound to a TensorBuffer (which does not own it)
        full = self._cache(layout, [_aligned(int(np.prod(s))) for s in layout.shapes(max_context)], max_context)
        short = sorted(c for c in decode if c < max_context)
        scratch = [_aligned(int(np.prod(s))) for s in layout.shapes(short[-1])] if short else []
        caches = {c: self._cache(layout, scratch, c) for c in short}
        for c in caches.values():
            c.aliases = [o for o in caches.values() if o is not c]
        caches[max_context] = full
        self.prefill = {n: _CompiledSig(self.model, k, layout, full, True) for n, k in sorted(prefill.items())}
        self.prefill_short = {c: {n: _CompiledSig(self.model, k, layout, caches[c], True) for n, k in sorted(m.items())}
                              for c, m in sorted(short_prefill.items())}
        self.decode = {c: _CompiledSig(self.model, decode[c], layout, caches[c], False) for c in sorted(decode)}
        self.executes = ("LiteRT CompiledModel, XNNPACK CPU with its weight cache (weights packed once for "
                         f"{len(sigs)} signatures)")
        if short:
            self.kv_note = (f"; decode runs on the shortest cache that holds the position ({', '.join(map(str, short))}"
                            f" or {max_context})")

    def _cache(self, layout: _Layout, memory: list[np.ndarray], context: int) -> _Cache:
        views = [m[: int(np.prod(s))] for m, s in zip(memory, layout.shapes(context), strict=True)]
        self._memory.extend(views)
        shaped = [v.reshape(s) for v, s in zip(views, layout.shapes(context), strict=True)]
        return _Cache(layout, lambda: shaped, views)

    def close(self) -> None:
        self.prefill, self.prefill_short, self.decode = {}, {}, {}
        with muted_stderr():  # the environment's teardown log
            self.model = None

    def __del__(self) -> None:  # a runtime dropped without close()
        if getattr(self, "model", None) is not None:
            self.close()


class _CompiledSig(_Sig):
    def __init__(self, model: Any, key: str, layout: _Layout, cache: _Cache, prefill: bool) -> None:
        from ai_edge_litert.tensor_buffer import TensorBuffer

        self.model, self.key, self.cache, self.prefill = model, key, cache, prefill
        outs = model.get_output_tensor_details(key)
        self._ins = {n: model.create_input_buffer_by_name(key, n)
                     for n in (("tokens", "input_pos", "last") if prefill else ("tokens", "input_pos"))}
        self._in_map = {**self._ins, **{n: TensorBuffer.create_from_host_memory(a)
                                        for n, a in zip(layout.names, cache.flat, strict=True)}}
        self._outs = [(n, int(np.prod(outs[n]["shape"])), tuple(outs[n]["shape"])) for n in ("logits", *layout.slices)]
        self._out_map = {n: model.create_output_buffer_by_name(key, n) for n, _, _ in self._outs}
        self._fresh = True

    def run(self, tokens: np.ndarray, pos: np.ndarray, last: np.ndarray | None) -> tuple[np.ndarray, list[np.ndarray]]:
        if self._fresh:  # LiteRT sets up (and logs) another environment on a signature's first run
            self._fresh = False
            with muted_stderr():
                return self._run(tokens, pos, last)
        return self._run(tokens, pos, last)

    def _run(self, tokens: np.ndarray, pos: np.ndarray, last: np.ndarray | None) -> tuple[np.ndarray, list[np.ndarray]]:
        self._ins["tokens"].write(tokens)
        self._ins["input_pos"].write(pos)
        if last is not None:
            self._ins["last"].write(last)
        self.model.run_by_name(self.key, self._in_map, self._out_map)
        out = [self._out_map[n].read(size, np.float32).reshape(shape) for n, size, shape in self._outs]
        return out[0], out[1:]


class _Interpreted(_Engine):
    """The LiteRT interpreter (``tflite-runtime`` or a bundle with 4-D cache inputs): full-length signatures."""

    def __init__(self, mod: Any, file: Path, threads: int | None, layout: _Layout, prefill: Mapping[int, str],
                 decode: str, max_context: int, runtime: str) -> None:
        try:
            self.interp = mod.Interpreter(model_path=str(file), num_threads=int(threads) if threads else None)
        except (ValueError, RuntimeError) as e:
            raise ArtifactLoadError(f"{file}: the LiteRT runtime ({runtime}) cannot load it ({_first(e)}); re-copy "
                                    "or re-export it") from None
        _check_signatures(file, self.interp.get_signature_list(), [decode, *prefill.values()], layout)
        try:
            self.decode = {max_context: _InterpretedSig(self.interp, decode, layout, max_context, False)}
            self.prefill = {n: _InterpretedSig(self.interp, k, layout, max_context, True)
                            for n, k in sorted(prefill.items())}
        except (AttributeError, TypeError) as e:  # the in-place KV writes use the interpreter wrapper's tensor()
            raise RuntimeMissingError(f"{runtime} lacks the per-signature tensor access this runtime needs "
                                      f"({_first(e)}); pip install -U ai-edge-litert") from None
        self.prefill_short = {}  # each signature would add its own packed weights here
        self.executes = "LiteRT interpreter, XNNPACK CPU delegate (default)"
        self.kv_note = "; one copy per signature, written in place through the interpreter's tensor views"


class _InterpretedSig(_Sig):
    """A signature driven through the interpreter wrapper, its KV-cache inputs written in place.

    The LiteRT signature runner copies every input in and every output out on each call, which for the KV cache is
    the whole cache twice per token. Here only the token ids, positions and new K/V entries cross into Python; the
    cache inputs are numpy views on the interpreter's own buffers (taken and dropped around each access: the
    interpreter refuses to run while a view is alive, as it may reallocate).
    """

    def __init__(self, interp: Any, key: str, layout: _Layout, context: int, prefill: bool) -> None:
        runner = interp.get_signature_runner(key)
        self.key, self.prefill = key, prefill
        self._w = interp._interpreter  # the pybind wrapper: SetTensor / Invoke / GetTensor / tensor per subgraph
        self._sub = int(runner._subgraph_index)
        ins, outs = dict(runner._inputs), dict(runner._outputs)
        self._tokens, self._pos, self._last = ins["tokens"], ins["input_pos"], ins.get("last")
        kv = [int(ins[n]) for n in layout.names]
        self._slices = [int(outs[n]) for n in layout.slices]
        self._logits = int(outs["logits"])
        shapes = layout.shapes(context)
        self.cache = _Cache(layout, lambda: [self._w.tensor(self._w, i, self._sub).reshape(s)
                                             for i, s in zip(kv, shapes, strict=True)])
        self._w.AllocateTensors(self._sub)
        for a in self.cache.arrays():  # fresh buffers hold whatever memory they got: NaN bits would survive the mask
            a[...] = 0.0

    def run(self, tokens: np.ndarray, pos: np.ndarray, last: np.ndarray | None) -> tuple[np.ndarray, list[np.ndarray]]:
        self._w.SetTensor(self._tokens, tokens, self._sub)
        self._w.SetTensor(self._pos, pos, self._sub)
        if self._last is not None and last is not None:
            self._w.SetTensor(self._last, last, self._sub)
        self._w.Invoke(self._sub)
        return self._w.GetTensor(self._logits, self._sub), [self._w.GetTensor(i, self._sub) for i in self._slices]


def _check_signatures(file: Path, sigs: Mapping[str, Any], keys: Sequence[str], layout: _Layout) -> None:
    missing = [k for k in keys if k not in sigs]
    if missing:
        raise ArtifactLoadError(f"{file}: signature(s) {', '.join(missing)} missing (it has "
                                f"{', '.join(sorted(sigs))}); re-export with --format tflite")
    for k in keys:
        ins, outs = set(sigs[k].get("inputs", [])), set(sigs[k].get("outputs", []))
        lacking = [n for n in (*layout.names, "tokens", "input_pos") if n not in ins]
        lacking += [n for n in (*layout.slices, "logits") if n not in outs]
        if lacking:
            raise ArtifactLoadError(f"signature '{k}' lacks {', '.join(lacking)}; re-export with --format tflite")


def _aligned(n: int) -> np.ndarray:
    """``n`` zeroed float32 on a 64-byte boundary: LiteRT binds host memory zero-copy only there (it copies
    otherwise, silently, and the graph would read a stale cache)."""
    raw = np.zeros(n + 16, np.float32)
    off = (-raw.ctypes.data % 64) // 4
    return raw[off:off + n]


def _first(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:300]
