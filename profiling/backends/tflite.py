"""LiteRT (``.tflite``) backend, torch-free.

Uses ``ai_edge_litert.interpreter`` and, where only the older ``tflite_runtime`` package
is installed (common on Raspberry Pi OS), that one with the same behaviour. Inputs and
outputs come from the model's signature runner when it has a SignatureDef, so they carry
the names the exporter gave them (``input_ids``, ``attention_mask`` -> ``sentence_embedding``).
Most files in the wild have none; those run by input/output tensor index (names from their
tensors), as LiteRT's ``benchmark_model`` does. One interpreter is only ever driven one way,
never through its signature runner and raw ``invoke()`` both (LiteRT refuses mixing them:
"There is at least 1 reference to internal data"). Quantized (int8/uint8) inputs and outputs
are handled by their scale and zero point: :meth:`TfliteBackend.synthesize` and
:meth:`TfliteBackend.float_outputs`.

Options (runtime ``options`` in the manifest, or ``--option`` on the command line):

* ``xnnpack`` (bool, default True): LiteRT's default XNNPACK CPU delegate.
* ``delegate`` (path to a ``.so``): an external delegate (GPU/NPU). :meth:`info` says which
  ops it took, or why it could not be loaded and that the CPU ran the model instead.
* ``signature`` (str): which signature to run when the file has several.
* ``engine`` (``auto``, ``compiled`` or ``interpreter``): what runs the model. ``compiled`` is LiteRT's
  ``CompiledModel`` on XNNPACK with a weight cache: XNNPACK packs the weights into a file (this process's own,
  unlinked once opened) and maps it, instead of packing them into anonymous memory next to the file's own pages of
  them. It needs ``ai-edge-litert``, XNNPACK, no external delegate and a signature with fixed shapes (every file
  edgeship exports). ``auto`` takes it when the file's float GEMM weights (what XNNPACK packs a second copy of)
  reach 24 MB: the ``CompiledModel`` stack has a fixed cost of its own (libLiteRt's pages, its environment), and
  below that size it takes more than it saves. ``edgeship profile``, MiniLM, peak RSS: fp32 137 -> 106 MB, but
  int8-dynamic 75 -> 79 MB and int4 67 -> 75 MB, which therefore stay on the interpreter. Same kernels, same
  outputs. A file written moments before (its page cache in large folios, Linux 6.18 here) maps more of itself
  per touch under either engine: fp32 then 163 (interpreter) vs 168 MB. On a device whose temporary directory is
  a RAM disk (tmpfs) the packed weights sit in RAM either way. An interpreter loaded without delegates describes
  the signature first and is dropped before the model is compiled.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgeship.errors import ArtifactLoadError, InputError, RuntimeMissingError
from edgeship.profiling.backends import Backend, option_flag
from edgeship.quiet import mute_stderr_at_exit, muted_stderr
from edgeship.spec import TensorSpec, check_feeds, dim_name, shown, synthesize
from edgeship.vocab import TFLITE_SIGNATURE

OPTIONS = ("xnnpack", "delegate", "signature", "engine")
ENGINES = ("auto", "compiled", "interpreter")
IDENTIFIER = b"TFL3"  # flatbuffer file identifier of every LiteRT/TFLite model, at byte 4
_INT32 = np.iinfo(np.int32)
_BUFFER_DTYPES = frozenset({"float32", "float16", "int32", "int8", "uint8", "bool"})  # what a TensorBuffer holds
_COMPILED_FROM_BYTES = 24 << 20  # float GEMM weights from which `auto` takes the compiled engine (module docstring)
# ops whose second input is a weight (constant, or a DEQUANTIZE of one: XNNPACK packs that as fp32 too)
_GEMMS = frozenset({"FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV"})


def runtime_module() -> tuple[Any, str, str]:
    """(interpreter module, package name, version): ai-edge-litert first, then tflite-runtime."""
    from edgeship.profiling.sysinfo import dist_version

    try:
        from ai_edge_litert import interpreter as mod

        return mod, "ai-edge-litert", dist_version("ai-edge-litert") or "?"
    except ImportError:
        pass
    try:
        from tflite_runtime import interpreter as mod

        return mod, "tflite-runtime", dist_version("tflite-runtime") or "?"
    except ImportError as e:
        raise RuntimeMissingError(f"no LiteRT runtime is installed ({e}); pip install edgeship (brings ai-edge-litert) "
                                  "or, on Raspberry Pi OS, pip install tflite-runtime") from None


def check_header(path: Path) -> None:
    """Refuse files that are not a LiteRT flatbuffer before the interpreter sees them."""
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[4:8] != IDENTIFIER:
        raise ArtifactLoadError(f"{path}: not a LiteRT/TFLite model (no 'TFL3' identifier at byte 4; the file is "
                                "corrupt or another format); re-export it with edgeship export --format tflite")


def check_bounds(path: Path) -> None:
    """Refuse a flatbuffer whose tables or constant buffers point past the end of the file.

    ai-edge-litert verifies the flatbuffer, but tflite-runtime 2.14 does not and crashes the
    whole process (SIGSEGV) on a truncated file, so the runner checks the parts that matter
    itself: the root table, the subgraphs and every constant buffer (inline or offset/size).
    """
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        # mapped, not read: only the pages of the tables looked at become resident (reading the file into memory
        # added its whole size to the worker's peak RSS before the interpreter had even loaded it)
        _check_tables(path, data)


def _check_tables(path: Path, data: Any) -> None:
    import struct

    size = len(data)

    def bad(what: str) -> ArtifactLoadError:
        return ArtifactLoadError(f"{path}: truncated or corrupt LiteRT model ({what} lies outside the {size}-byte file); "
                                 "re-copy or re-export it")

    def u32(at: int) -> int:
        if at < 0 or at + 4 > size:
            raise bad(f"offset {at}")
        return int(struct.unpack_from("<I", data, at)[0])

    def field(table: int, i: int) -> int:  # absolute position of field i of a table, or 0 when absent
        vt = table - struct.unpack_from("<i", data, table)[0] if 0 <= table <= size - 4 else -1
        if vt < 0 or vt + 4 > size:
            raise bad("a table")
        vt_len = struct.unpack_from("<H", data, vt)[0]
        if 4 + 2 * i + 2 > vt_len:
            return 0
        off = struct.unpack_from("<H", data, vt + 4 + 2 * i)[0]
        return table + off if off else 0

    def vector(at: int, what: str) -> tuple[int, int]:  # (start, length) of the vector referenced at ``at``
        start = at + u32(at)
        n = u32(start)
        return start + 4, n

    root = u32(0)
    for idx, name, elem in ((2, "subgraphs", 4), (4, "buffers", 4)):
        pos = field(root, idx)
        if not pos:
            continue
        start, n = vector(pos, name)
        if start + elem * n > size:
            raise bad(f"the {name} table")
        if name != "buffers":
            continue
        for k in range(n):
            buf = start + 4 * k + u32(start + 4 * k)
            d = field(buf, 0)
            if d:
                b0, blen = vector(d, "buffer data")
                if b0 + blen > size:
                    raise bad(f"constant buffer {k}")
            o, z = field(buf, 1), field(buf, 2)
            if o and z:
                off, ln = struct.unpack_from("<QQ", data, o)[0], struct.unpack_from("<Q", data, z)[0]
                if off > 1 and off + ln > size:
                    raise bad(f"constant buffer {k}")


def _dtype(t: Any) -> str:
    return str(np.dtype(t))


class TfliteBackend(Backend):
    format: ClassVar[str] = "tflite"
    suffix: ClassVar[str] = ".tflite"
    options_accepted: ClassVar[tuple[str, ...]] = OPTIONS

    def __init__(self, path: Path, threads: int | None = None, options: Mapping[str, Any] | None = None) -> None:
        opts = self.checked_options(options)
        check_header(path)
        check_bounds(path)
        mod, self.runtime, self._version = runtime_module()
        self.path = path
        self.threads = threads
        self.xnnpack = option_flag(opts.get("xnnpack", True))
        self.notes: list[str] = []
        self.delegate_report: dict[str, Any] | None = None
        delegates = []
        want = opts.get("delegate")
        if want:
            try:
                delegates.append(mod.load_delegate(str(want)))
                self.delegate_report = {"path": str(want), "loaded": True}
            except (ValueError, OSError, AttributeError, RuntimeError) as e:
                cpu = "XNNPACK CPU" if self.xnnpack else "the reference CPU kernels"
                why = f"{type(e).__name__}: {_first(e)}"
                self.delegate_report = {"path": str(want), "loaded": False, "error": why, "ran_on": cpu}
                self.notes.append(f"delegate {want} could not be loaded ({why}); {cpu} ran the model instead")
        kwargs: dict[str, Any] = {"model_path": str(path), "num_threads": int(threads) if threads else None}
        if delegates:
            kwargs["experimental_delegates"] = delegates
        engine = str(opts.get("engine", "auto")).strip().lower()
        if engine not in ENGINES:
            raise ArtifactLoadError(f"tflite: engine '{opts['engine']}' is not one of {', '.join(ENGINES)}")
        # a compiled-engine candidate's interpreter has no XNNPACK: it only describes the signature, and XNNPACK
        # would pack the weights into anonymous memory when the signature runner allocates
        candidate = engine != "interpreter" and self.runtime == "ai-edge-litert" and self.xnnpack and not want
        if not self.xnnpack or candidate:
            kwargs["experimental_op_resolver_type"] = mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        self.compiled: _Compiled | None = None
        self.interpreter: Any = None
        self.runner: Any = None  # the signature runner, when the interpreter runs a signature
        ins, outs = self._load(mod, kwargs, opts.get("signature"))
        why_not = self._not_compilable(ins, outs) if candidate else None
        if engine == "compiled" and (why_not or not candidate):
            why_not = why_not or ("it needs ai-edge-litert" if self.runtime != "ai-edge-litert" else
                                  "it runs on XNNPACK only (no xnnpack=false, no external delegate)")
            raise ArtifactLoadError(f"{path}: engine=compiled cannot run this model: {why_not}; leave out the option "
                                    "(or engine=interpreter)")
        if candidate and why_not is None and (engine == "compiled" or self._float_gemm_bytes() >= _COMPILED_FROM_BYTES):
            # the interpreter goes first, with its own mapping of the file: loading verifies the flatbuffer, which
            # touches every constant buffer's header, and where the file's page cache is in large folios (a freshly
            # written file) each touch maps a whole folio: MiniLM fp32 mapped 40 MB that way in each of two
            # mappings (the quickstart's peak: 209 MB with both, 168 MB with one)
            self.interpreter = self.runner = None
            try:
                # the error maker must not hold this backend: a cycle through the compiled model kept the artifact
                # mapped until the garbage collector ran, past the bundle writer's POSIX_FADV_DONTNEED, so a profile
                # right after the export saw the file's page cache in large folios (MiniLM fp32: 168 vs 112 MB)
                self.compiled = _Compiled(path, self.signature or "", threads, ins, outs,
                                          functools.partial(_unprepared, self.runtime, self._version))
            except ArtifactLoadError as e:  # e.g. no writable temporary directory for the cache
                if engine == "compiled":
                    raise
                self.notes.append(f"LiteRT's CompiledModel could not take it ({_first(e)}); the interpreter ran it")
        if candidate and self.compiled is None:  # the interpreter runs it, on XNNPACK
            del kwargs["experimental_op_resolver_type"]
            ins, outs = self._load(mod, kwargs, opts.get("signature"))
        self.inputs = tuple(TensorSpec(name, _dtype(d["dtype"]), self._shape(name, d)) for name, d in ins)
        self.outputs = tuple(name for name, _ in outs)
        self.quantized_io = {name: d["quantization"] for name, d in (*ins, *outs)
                             if d.get("quantization") and d["quantization"][0]}
        if any(s.dtype in ("int8", "uint8") for s in self.inputs if s.name in self.quantized_io):
            self.notes.append("quantized inputs are synthesised as N(0, 1) floats quantized with each input's scale "
                              "and zero point")
        if want and self.delegate_report and self.delegate_report["loaded"]:
            self.delegate_report.update(self._delegation(mod, str(want)))

    def _load(self, mod: Any, kwargs: Mapping[str, Any], signature: Any) -> tuple[list[tuple[str, Any]],
                                                                                    list[tuple[str, Any]]]:
        path = self.path
        try:
            self.interpreter = mod.Interpreter(**kwargs)
        except ValueError as e:  # "The model is not a valid Flatbuffer buffer": truncated or damaged
            raise ArtifactLoadError(f"{path}: the LiteRT runtime cannot load it ({_first(e)}); the file is corrupt or "
                                    "truncated; re-copy or re-export it") from None
        except RuntimeError as e:  # an op the installed runtime has no kernel for, or a delegate that failed
            raise self._unprepared(str(path), e) from None
        sigs = self.interpreter.get_signature_list()
        self.dim_hints: dict[str, tuple[int, str]] = {}
        if sigs:
            return self._bind_signature(sigs, signature)
        if signature:
            raise ArtifactLoadError(f"{path}: no signature '{signature}': the model has no SignatureDef; leave out "
                                    "--option signature and it runs by tensor index")
        return self._bind_tensors()

    def _not_compilable(self, ins: Sequence[tuple[str, Any]], outs: Sequence[tuple[str, Any]]) -> str | None:
        if self.runner is None:
            return "the model has no SignatureDef"
        dynamic = [n for n, d in ins if not all(isinstance(x, int) for x in self._shape(n, d))]
        if dynamic:
            return f"input(s) {', '.join(dynamic)} have dynamic dims"
        odd = sorted({_dtype(d["dtype"]) for _, d in (*ins, *outs)} - _BUFFER_DTYPES)
        return f"LiteRT's tensor buffers hold no {', '.join(odd)}" if odd else None

    def _float_gemm_bytes(self) -> int:
        """Bytes of the float weights of the file's GEMM ops (the copy XNNPACK packs)."""
        tensors = {int(t["index"]): t for t in self.interpreter.get_tensor_details()}
        weights = {int(o["inputs"][1]) for o in self.interpreter._get_ops_details()
                   if o["op_name"] in _GEMMS and len(o["inputs"]) > 1}
        return sum(int(np.prod(tensors[i]["shape"])) * np.dtype(tensors[i]["dtype"]).itemsize for i in weights
                   if i in tensors and _dtype(tensors[i]["dtype"]) in ("float32", "float16"))

    def _bind_signature(self, sigs: Mapping[str, Any], want: Any) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
        key = str(want or (TFLITE_SIGNATURE if TFLITE_SIGNATURE in sigs else sorted(sigs)[0]))
        if key not in sigs:
            raise ArtifactLoadError(f"{self.path}: no signature '{key}' (it has {', '.join(sorted(sigs))})")
        self.signature: str | None = key
        self.runner = self.interpreter.get_signature_runner(key)
        ins = sorted(self.runner.get_input_details().items(), key=lambda kv: int(kv[1]["index"]))
        outs = sorted(self.runner.get_output_details().items(), key=lambda kv: int(kv[1]["index"]))
        return ins, outs

    def _bind_tensors(self) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
        """No SignatureDef (most .tflite files in the wild): the subgraph's input/output tensors by index.

        Names are the tensors' own where they have unique ones. The interpreter is then only ever
        driven through set_tensor/invoke/get_tensor, never through a signature runner.
        """
        self.signature = None
        self.runner = None
        self.notes.append("the model has no SignatureDef: inputs and outputs are taken by tensor index, named after "
                          "their tensors")
        ins = _by_index(self.interpreter.get_input_details(), "input")
        outs = _by_index(self.interpreter.get_output_details(), "output")
        self._in_index = {name: int(d["index"]) for name, d in ins}
        self._out_index = {name: int(d["index"]) for name, d in outs}
        self._allocated = {name: tuple(int(x) for x in d["shape"]) for name, d in ins}
        self.interpreter.allocate_tensors()
        return ins, outs

    def _shape(self, name: str, detail: Mapping[str, Any]) -> tuple[int | str, ...]:
        """Dims from ``shape_signature`` (-1 is dynamic); the size the converter allocated for a dynamic dim
        is the model's own default for it (LiteRT's benchmark_model runs that size too)."""
        sig = detail.get("shape_signature")
        dims = [int(x) for x in (sig if sig is not None and len(sig) else detail["shape"])]
        allocated = [int(x) for x in detail["shape"]]
        out = tuple(dim_name(name, k, x) for k, x in enumerate(dims))
        for k, d in enumerate(out):
            if isinstance(d, str) and k < len(allocated) and allocated[k] > 0:
                self.dim_hints[d] = (allocated[k], "the size the model file allocates")
        return out

    # ---- feeds ------------------------------------------------------------------------------------
    def synthesize(self, specs: Sequence[TensorSpec], dims: Mapping[str, int], seed: int = 0) -> dict[str, np.ndarray]:
        """As :func:`edgeship.spec.synthesize`, but a quantized input gets N(0, 1) floats quantized with its scale
        and zero point (the values a float model would see), not uniform integers."""
        feeds = synthesize(specs, dims, seed=seed)
        rng = np.random.default_rng(seed + 1)
        for s in specs:
            q = self.quantized_io.get(s.name)
            if q is None or s.dtype not in ("int8", "uint8") or s.name not in feeds:
                continue
            info = np.iinfo(s.dtype)
            x = rng.standard_normal(feeds[s.name].shape)
            feeds[s.name] = np.clip(np.round(x / q[0]) + q[1], info.min, info.max).astype(s.dtype)
        return feeds

    def float_outputs(self, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Quantized outputs as floats, ``(q - zero_point) * scale``, for comparing with a float reference."""
        out = dict(outputs)
        for name, v in outputs.items():
            q = self.quantized_io.get(name)
            if q is not None and np.issubdtype(np.asarray(v).dtype, np.integer):
                out[name] = (np.asarray(v).astype(np.float32) - np.float32(q[1])) * np.float32(q[0])
        return out

    def adapt_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """int64 token ids -> int32 (LiteRT's integer type), refusing values that would overflow."""
        out = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
        for s in self.inputs:
            v = out.get(s.name)
            if v is None or s.dtype != "int32" or v.dtype != np.int64:
                continue
            if v.size and (int(v.min()) < _INT32.min or int(v.max()) > _INT32.max):
                raise InputError(f"input '{s.name}': values up to {int(v.max())} do not fit int32, the model's integer "
                                 "type (LiteRT has no int64 inputs); check the token ids")
            out[s.name] = v.astype(np.int32)
        return super().adapt_feeds(out)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.compiled is not None:  # a TensorBuffer takes a wrong size or type in silence: check first
            try:
                check_feeds(self.inputs, feeds)
            except InputError as e:
                raise self._refused(str(e)) from None
            return self.compiled.run(feeds)
        try:
            if self.runner is None:
                return self._invoke(feeds)
            res = self.runner(**feeds)
        except (ValueError, RuntimeError) as e:  # shapes the static graph cannot take
            if "Delegate) failed to prepare" in str(e):  # signature runners prepare lazily: a delegate refused it now
                raise self._unprepared(self.path.name, e) from None
            raise self._refused(_first(e)) from None
        return {n: np.array(res[n]) for n in self.outputs}

    def _refused(self, why: str) -> InputError:
        return InputError(f"{self.path.name}: LiteRT refused the inputs ({why}); the model takes "
                          + ", ".join(f"{s.name} {s.dtype}{shown(s.shape)}" for s in self.inputs))

    def _unprepared(self, where: str, e: BaseException) -> ArtifactLoadError:
        return _unprepared(self.runtime, self._version, where, e)

    def _invoke(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One run by tensor index; resizes (and re-plans memory) only when a feed's shape changes."""
        it = self.interpreter
        resized = False
        for name, idx in self._in_index.items():
            shape = feeds[name].shape
            if shape != self._allocated[name]:
                it.resize_tensor_input(idx, list(shape))
                self._allocated[name] = tuple(shape)
                resized = True
        if resized:
            it.allocate_tensors()
        for name, idx in self._in_index.items():
            it.set_tensor(idx, feeds[name])
        it.invoke()
        return {name: it.get_tensor(idx) for name, idx in self._out_index.items()}

    # ---- reporting ---------------------------------------------------------------------------------
    def _delegation(self, mod: Any, lib: str) -> dict[str, Any]:
        """Which original ops the delegate's partitions replaced (walked back from their outputs to their inputs).

        Measured on a second interpreter with only that delegate (no XNNPACK, whose partitions
        would be indistinguishable); the Python wrapper exposes no execution plan, so the
        replaced ops are recovered from the DELEGATE nodes' boundary tensors.
        """
        probe = mod.Interpreter(model_path=str(self.path), experimental_delegates=[mod.load_delegate(lib)],
                                experimental_op_resolver_type=mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        probe.allocate_tensors()
        return delegation_summary(probe._get_ops_details(), lib)

    def info(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "runtime": self.runtime,
            "runtime_version": self._version,
            "threads": self.threads,
            "xnnpack": self.xnnpack,
            "signature": self.signature,
            "engine": ("CompiledModel, XNNPACK with a weight cache" if self.compiled is not None else "Interpreter"),
            "notes": list(self.notes),
        }
        if self.delegate_report is not None:
            d["delegate"] = dict(self.delegate_report)
        if self.quantized_io:
            d["quantized_io"] = {k: {"scale": float(v[0]), "zero_point": int(v[1])} for k, v in self.quantized_io.items()}
        return d


_muted_at_exit = False


def _unprepared(runtime: str, version: str, where: str, e: BaseException) -> ArtifactLoadError:
    """The file is fine as a flatbuffer but the runtime cannot prepare it: at load, or on the first run (signature
    runners prepare lazily, and a delegate may refuse the graph then)."""
    return ArtifactLoadError(f"{where}: LiteRT cannot prepare the model ({_first(e)}); update the runtime "
                             f"({runtime} {version}) or re-export it")


def compile_with_weight_cache(path: Path, threads: int | None) -> Any:
    """LiteRT's ``CompiledModel`` of ``path`` on XNNPACK with a weight cache file; RuntimeError/ValueError if LiteRT
    cannot compile it, ArtifactLoadError if there is no writable place for the cache.

    XNNPACK packs the weights once, into the cache file, and maps it (the interpreter packs them into anonymous
    memory). The file is this process's alone, in a fresh directory removed as soon as LiteRT has opened it: the
    open file keeps it until exit, and no cache of another model (or an older file) can ever be read as this one's.
    LiteRT logs every accelerator it registers and, at exit, destroys (about 20 INFO lines): muted, unless
    ``$EDGESHIP_VERBOSE``.
    """
    global _muted_at_exit
    from ai_edge_litert.compiled_model import CompiledModel
    from ai_edge_litert.cpu_options import CpuOptions
    from ai_edge_litert.hardware_accelerator import HardwareAccelerator
    from ai_edge_litert.options import Options

    try:
        work = tempfile.mkdtemp(prefix="edgeship-xnnpack-")
    except OSError as e:
        raise ArtifactLoadError(f"{path}: no file for XNNPACK's weight cache ({e}); point TMPDIR at a writable "
                                "directory") from None
    try:
        with muted_stderr():
            options = Options(hardware_accelerators=HardwareAccelerator.CPU,
                              cpu_options=CpuOptions(num_threads=int(threads or 0),
                                                     xnnpack_weight_cache_path=os.path.join(work, "weights.cache")))
            model = CompiledModel.from_file(str(path), options=options)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not _muted_at_exit:
        mute_stderr_at_exit()
        _muted_at_exit = True
    return model


class _Compiled:
    """One fixed-shape signature on :func:`compile_with_weight_cache`'s model."""

    def __init__(self, path: Path, key: str, threads: int | None, ins: Sequence[tuple[str, Any]],
                 outs: Sequence[tuple[str, Any]], unprepared: Callable[[str, BaseException], ArtifactLoadError]) -> None:
        self.key, self._where, self._unprepared, self._fresh = key, path.name, unprepared, True
        try:
            self.model = compile_with_weight_cache(path, threads)
        except (RuntimeError, ValueError) as e:
            raise unprepared(str(path), e) from None
        self._ins = {n: self.model.create_input_buffer_by_name(key, n) for n, _ in ins}
        self._outs = {n: (self.model.create_output_buffer_by_name(key, n), tuple(int(x) for x in d["shape"]),
                          np.dtype(d["dtype"])) for n, d in outs}
        self._out_map = {n: b for n, (b, _, _) in self._outs.items()}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # the first run sets up (and logs) LiteRT's environment, at the first buffer write, and packs the weights
        with muted_stderr() if self._fresh else contextlib.nullcontext():
            for n, b in self._ins.items():
                b.write(feeds[n])
            try:
                self.model.run_by_name(self.key, self._ins, self._out_map)
            except RuntimeError as e:
                raise self._unprepared(self._where, e) from None
        self._fresh = False
        return {n: b.read(int(np.prod(shape)), dtype).reshape(shape) for n, (b, shape, dtype) in self._outs.items()}

    def __del__(self) -> None:  # LiteRT logs the environment's teardown
        try:
            with muted_stderr():
                self._ins, self._outs, self._out_map, self.model = {}, {}, {}, None
        except (OSError, AttributeError, TypeError):  # at interpreter shutdown, or a half-built object
            pass


def delegation_summary(ops: list[dict[str, Any]], label: str) -> dict[str, Any]:
    """Which original ops the DELEGATE nodes of an interpreter replaced, from ``_get_ops_details()``.

    The node list holds the original ops plus one DELEGATE node per partition; the ops a
    partition replaced are those between its input and output tensors (walked backwards).
    """
    original = [o for o in ops if o["op_name"] != "DELEGATE"]
    parts = [o for o in ops if o["op_name"] == "DELEGATE"]
    producer = {int(t): o for o in original for t in o["outputs"]}
    taken: collections.Counter[str] = collections.Counter()
    seen: set[int] = set()
    for p in parts:
        stop = {int(t) for t in p["inputs"]}
        todo = [int(t) for t in p["outputs"]]
        while todo:
            t = todo.pop()
            op = producer.get(t)
            if t in stop or op is None or int(op["index"]) in seen:
                continue
            seen.add(int(op["index"]))
            taken[op["op_name"]] += 1
            todo.extend(int(i) for i in op["inputs"] if i >= 0)
    left = collections.Counter(o["op_name"] for o in original if int(o["index"]) not in seen)
    return {"partitions": len(parts), "ops_total": len(original), "ops_taken": sum(taken.values()),
            "taken_by_op": dict(taken), "left_on_cpu_by_op": dict(left),
            "note": f"{label}: {sum(taken.values())} of {len(original)} ops in {len(parts)} partition(s)"}


def _by_index(details: Sequence[Mapping[str, Any]], kind: str) -> list[tuple[str, Any]]:
    """(name, detail) in the subgraph's order; a tensor without a unique name is ``input_0``, ``output_1``..."""
    names = [str(d.get("name") or "") for d in details]
    return [(n if n and names.count(n) == 1 else f"{kind}_{i}", d) for i, (n, d) in enumerate(zip(names, details,
                                                                                                  strict=True))]


def _first(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:300]
