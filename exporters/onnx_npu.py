"""ONNX recipe ``npu``: a QNN HTP context binary for the target's Snapdragon Hexagon NPU, compiled offline.

The ``npu`` row of :class:`edgeship.exporters.onnx.OnnxExporter`'s table dispatches here (it builds its
own graph). Stages (each timed by :meth:`ExportContext.stage`):

1. **lower** (+ serialize): ``torch.onnx`` (dynamo) at *static* shapes from the bundle's inputs (sequence length or
   image size from the profile). The HTP needs static shapes: edgeship's dynamic ``int8-static``
   MiniLM with its data-dependent padding trim left the whole encoder on the CPU (three tiny HTP
   partitions). No padding trim here: the app pads to the static length and the mask does the rest.
2. **optimize**: the additive attention mask's fill value ``float32.min`` becomes :data:`MASK_FILL`
   (a tensor holding -3.4e38 next to attention scores leaves no quantization steps for the scores:
   MiniLM fell to cosine 0.27), then onnxruntime's ``qnn_preprocess_model`` fuses Erf-GELU into
   ``Gelu`` (the QNN EP rejects ``Erf``: six CPU islands split MiniLM into seven partitions).
3. **quantize**: QDQ with onnxruntime's QNN config (``get_qnn_qdq_config``), 8-bit activations
   first, then 16-bit (A16W8) when 8-bit ones miss the profile's fidelity floor (MiniLM A8W8:
   mean cosine 0.86; A16W8: 0.999), checked on the CPU against PyTorch.
4. **compile**: the QNN EP partitions the graph and compiles its partitions into an ``EPContext``
   model + ``*_qnn.bin`` for the profile's ``htp_arch`` / ``soc_model``; coverage comes from that
   partitioning (:mod:`edgeship.exporters.qnn_coverage`), failing below the profile's minimum.
5. **validate**: the context model runs on onnxruntime-qnn's x86 HTP simulator on a few held-out
   inputs against PyTorch (numerics only; its timings are marked SIMULATED, never latency).

The artifact file itself is the static QDQ model (the portable fallback any ORT build runs); the
context model and binary sit beside it and are recorded with checksums in ``details["npu"]``.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeship.errors import ExportError, FidelityError, RuntimeMissingError, UnsupportedRecipeError
from edgeship.exporters.base import ExportContext, ExportOutput, Stage, padding_advice
from edgeship.manifest import Fidelity, sha256_file
from edgeship.vocab import Recipe

if TYPE_CHECKING:
    from edgeship.targets.schema import QnnTarget

RECIPE = Recipe.NPU
# exp(-50) ~ 2e-22: padded keys still get no attention weight, and quantized scores keep their resolution
MASK_FILL = -50.0
ACTIVATION_BITS = (8, 16)
N_SIMULATED = 4  # held-out inputs run on the simulator (~6-9 s per MiniLM inference there)
CPU_OPTIONS = {"graph_optimization": "all", "denormal_as_zero": True}


@dataclass(frozen=True)
class Quantized:
    path: Path
    activation_bits: int
    cpu_cosine: dict[str, float]  # activation bits -> mean cosine of the QDQ graph on the CPU


def export_npu(ctx: ExportContext, out: Path) -> ExportOutput:
    """The ``npu`` recipe end to end (see the module docstring)."""
    qnn_target = _check(ctx)
    static = _static_onnx(ctx)
    with ctx.stage(Stage.OPTIMIZE):
        prepared = _prepare(static, ctx.workdir)
    q = _quantize(ctx, prepared)
    from edgeship.exporters.qnn_coverage import compile_context

    with ctx.stage(Stage.COMPILE):
        compiled = compile_context(q.path, ctx.workdir / "npu-ctx", qnn_target)
    cov = compiled.coverage
    warnings: list[str] = []
    if cov["flops_share_htp"] < qnn_target.min_flops_coverage:
        _degraded(ctx, ExportError(
            f"onnx/npu: only {cov['flops_share_htp']:.1%} of the estimated FLOPs compile into HTP partitions (the "
            f"{ctx.target.name} minimum is {qnn_target.min_flops_coverage:.0%}); ops left to the CPU: "
            + ", ".join(f"{f['op_type']} ({f['reason'][:80]})" for f in cov["fell_out"][:4])
            + "; rewrite those ops or pass --allow-degraded to keep it"), warnings)
    with ctx.stage(Stage.VALIDATE):
        sim, sim_secs = _simulate(ctx, compiled.context_model, qnn_target)
    if not sim.passed:
        _degraded(ctx, FidelityError(
            f"onnx/npu: the compiled context binary reaches mean cosine {sim.mean_cosine:.4f} vs PyTorch on the HTP "
            f"simulator, below the {ctx.target.name} floor {sim.floor_mean_cosine}; pass --allow-degraded to keep it"),
            warnings)
    shutil.copyfile(q.path, out)
    files = _publish(compiled.context_model, compiled.binary, out.parent)
    npu = _npu_record(compiled, qnn_target, files, out, sim, sim_secs)
    quant = {"recipe": RECIPE, "format": "QDQ (onnxruntime get_qnn_qdq_config)",
             "weights": "uint8 asymmetric (the QNN config default; symmetric int8 made the HTP reject LayerNorm), "
                        "per-channel for Conv, per-tensor otherwise",
             "activations": f"uint{q.activation_bits} asymmetric per-tensor, MinMax calibrated",
             "activation_bits_tried": q.cpu_cosine, "calibration": ctx.calibration_source,
             "calibration_samples": len(ctx.calibration), "mask_fill": MASK_FILL}
    ctx.log(f"[onnx/npu] HTP coverage {cov['flops_share_htp']:.1%} of FLOPs ({cov['nodes_htp']}/{cov['nodes_total']} "
            f"nodes, {cov['partitions']} partition(s)); simulator mean cosine {sim.mean_cosine:.4f}")
    return ExportOutput(path=out, runtime=_runtime(ctx, out, npu), quantization=quant, details={"npu": npu},
                        warnings=warnings)


def _degraded(ctx: ExportContext, error: ExportError, warnings: list[str]) -> None:
    """Raise ``error``, or with --allow-degraded keep going and record it as a DEGRADED warning."""
    if not ctx.allow_degraded:
        raise error
    warnings.append(f"DEGRADED: {error}")


def _npu_record(compiled: Any, qnn_target: QnnTarget, files: list[dict[str, Any]], out: Path, sim: Fidelity,
                sim_secs: list[float]) -> dict[str, Any]:
    """``details["npu"]``: the context files with checksums, versions, coverage and simulator numerics."""
    rel = out.parent.name
    return {
        "backend": "QNNExecutionProvider / HTP", "htp_arch": qnn_target.htp_arch, "soc_model": qnn_target.soc_model,
        "context_model": f"{rel}/{compiled.context_model.name}", "context_binary": f"{rel}/{compiled.binary.name}",
        "files": [{**f, "path": f"{rel}/{f['path']}"} for f in files],
        "size_bytes": sum(f["size_bytes"] for f in files), "versions": compiled.versions,
        "ep_sdk_version": compiled.ep_sdk_version, "compile_seconds": round(compiled.seconds, 3),
        "coverage": compiled.coverage, "simulator_fidelity": sim.to_dict(),
        "simulator_seconds_per_inference": [round(s, 3) for s in sim_secs],
        "simulator_note": "SIMULATED (x86 HTP simulator): numerics only; these seconds are not a latency",
        "portable_fallback": f"{rel}/{out.name}: the same static QDQ graph, for any onnxruntime build (CPU here)",
    }


def _runtime(ctx: ExportContext, out: Path, npu: dict[str, Any]) -> dict[str, Any]:
    runtime: dict[str, Any] = {"name": "onnxruntime", "options": dict(CPU_OPTIONS), "opset": _opset(out),
                               "execution_providers": ["CPUExecutionProvider"], "static_shapes": True,
                               "graph": {"graph": "dynamo-static", "trims_padding": False},
                               "npu": {"execution_provider": "QNNExecutionProvider", "context_model": npu["context_model"],
                                       "needs": "onnxruntime-qnn on an ARM64 Snapdragon host with the Hexagon NPU"}}
    lm = ctx.model
    seq = next((int(n) for spec in lm.inputs for n, d in zip(ctx.heldout[0][spec.name].shape, spec.shape, strict=False)
                if d == "sequence"), None)
    advice = padding_advice(lm, static_length=seq)
    if advice:
        runtime["input_padding"] = advice
    return runtime


def _check(ctx: ExportContext) -> QnnTarget:
    qnn_target = ctx.target.qnn
    if qnn_target is None:
        raise UnsupportedRecipeError(f"onnx/npu: target {ctx.target.name} names no Snapdragon HTP; the npu recipe needs "
                                     "a profile whose NPU accelerator has a qnn table (e.g. --target galaxy-s24)")
    import importlib.util

    if importlib.util.find_spec("onnxruntime_qnn") is None:
        raise RuntimeMissingError("onnx/npu needs onnxruntime-qnn to compile the HTP context binary: "
                                  "pip install 'edgeship[npu]'")
    shapes = {k: v.shape for k, v in ctx.heldout[0].items()}
    for feeds in [*ctx.heldout, *ctx.calibration]:
        if {k: v.shape for k, v in feeds.items()} != shapes:
            raise ExportError(f"onnx/npu: the NPU graph has static shapes {shapes}, but some held-out or calibration "
                              "inputs differ; pad every text to the sequence length (--seq-len) and give images one size")
    return qnn_target


def _static_onnx(ctx: ExportContext) -> Path:
    """fp32 ONNX at the example's exact shapes: no dynamic dims, no padding trim."""
    import torch

    path = ctx.workdir / "onnx-npu-static.onnx"
    lm = ctx.model
    with ctx.stage(Stage.LOWER), torch.inference_mode(False), torch.no_grad():
        prog = torch.onnx.export(lm.module, lm.torch_args(ctx.heldout[0]), dynamo=True, optimize=True, opset_version=18,
                                 input_names=[s.name for s in lm.inputs], output_names=[s.name for s in lm.outputs],
                                 verbose=False, report=False)
        if prog is None:
            raise ExportError("torch.onnx.export returned no program")
    with ctx.stage(Stage.SERIALIZE):
        prog.save(str(path))
    return path


def cap_mask_fill(model: Any, fill: float = MASK_FILL) -> int:
    """Replace small float initializers holding ~float32.min (the additive mask fill) with ``fill``; returns the count."""
    from onnx import numpy_helper

    n = 0
    for init in model.graph.initializer:
        if init.data_type != 1 or np.prod(init.dims, dtype=np.int64) > 4:  # 1 = FLOAT
            continue
        a = numpy_helper.to_array(init)
        if (a < -1e30).any():
            init.CopyFrom(numpy_helper.from_array(np.where(a < -1e30, np.float32(fill), a).astype(np.float32), init.name))
            n += 1
    return n


def unshare_vectors(model: Any) -> int:
    """Give every consumer of a shared 0-/1-D initializer its own copy; returns the copies made.

    The exporter deduplicates equal constants, so a fresh LayerNorm's bias (zeros) can be the very
    tensor a Linear uses as bias. The quantizer then gives it one int32 bias encoding, which the
    HTP rejects for LayerNorm (``backendValidateOpConfig ... error 3110``): every LayerNorm of a
    random-init ViT fell to the CPU. Vectors are small; copying them costs nothing.
    """
    inits = {i.name: i for i in model.graph.initializer if len(i.dims) <= 1}
    seen: set[str] = set()
    copies = 0
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name not in inits:
                continue
            if name in seen:
                copy = model.graph.initializer.add()
                copy.CopyFrom(inits[name])
                copy.name = f"{name}__{node.name or k}_{copies}"
                node.input[k] = copy.name
                copies += 1
            seen.add(name)
    return copies


def _prepare(static: Path, workdir: Path) -> Path:
    import onnx
    from onnxruntime.quantization.execution_providers.qnn import qnn_preprocess_model

    model = onnx.load(str(static))
    cap_mask_fill(model)
    unshare_vectors(model)
    capped = workdir / "onnx-npu-capped.onnx"
    onnx.save(model, str(capped))
    fused = workdir / "onnx-npu-prepared.onnx"
    return fused if qnn_preprocess_model(str(capped), str(fused)) else capped


class _Reader:
    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def _quantize(ctx: ExportContext, prepared: Path) -> Quantized:
    """A8W8 first; A16W8 when 8-bit activations miss the floor (checked on the CPU against PyTorch)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    tried: dict[str, float] = {}
    floor = ctx.floor(RECIPE)
    best: tuple[float, Path, int] | None = None
    root = logging.getLogger()
    level = root.level
    for bits in ACTIVATION_BITS:
        path = ctx.workdir / f"onnx-npu-a{bits}w8.onnx"
        with ctx.stage(Stage.QUANTIZE):
            root.setLevel(logging.ERROR)  # the quantizer logs per-tensor advice at WARNING on the root logger
            try:
                cfg = get_qnn_qdq_config(str(prepared), _Reader(ctx.calibration),
                                         activation_type=QuantType.QUInt8 if bits == 8 else QuantType.QUInt16,
                                         weight_type=QuantType.QUInt8, per_channel=True)
                quantize(str(prepared), str(path), cfg)
            finally:
                root.setLevel(level)
        with ctx.stage(Stage.VALIDATE):
            fid = ctx.evaluate(path, "onnx", CPU_OPTIONS)
        tried[f"a{bits}w8"] = round(fid.mean_cosine, 5)
        if best is None or fid.mean_cosine > best[0]:
            best = (fid.mean_cosine, path, bits)
        if fid.mean_cosine >= floor:
            break
    assert best is not None
    ctx.log("[onnx/npu] QDQ on the CPU: " + ", ".join(f"{k} {v:.4f}" for k, v in tried.items())
            + f" mean cosine; using a{best[2]}w8")
    return Quantized(best[1], best[2], tried)


def _simulate(ctx: ExportContext, context_model: Path, qnn_target: QnnTarget) -> tuple[Fidelity, list[float]]:
    """The compiled context model on the x86 HTP simulator vs PyTorch, on the first few held-out inputs."""
    from edgeship.fidelity import compare
    from edgeship.profiling.backends.qnn import QnnBackend

    n = int(ctx.options.get("npu_simulated_inputs", N_SIMULATED))
    model = QnnBackend(context_model, options={"htp_arch": qnn_target.htp_arch, "soc_model": qnn_target.soc_model,
                                               "simulate": True})
    name = ctx.model.outputs[0].name
    got, secs = [], []
    for feeds in ctx.heldout[:n]:
        t0 = time.perf_counter_ns()
        got.append(model.run(model.adapt_feeds(feeds))[name])
        secs.append((time.perf_counter_ns() - t0) / 1e9)
    fid = compare([r[name] for r in ctx.reference[:n]], got, name, ctx.floor(RECIPE), classifier=ctx.model.classifier)
    return fid, secs


def _publish(context_model: Path, binary: Path, dest: Path) -> list[dict[str, Any]]:
    """Copy the context model and its binary into the bundle; their names stay (the model names the .bin)."""
    files = []
    for src in (context_model, binary):
        shutil.copyfile(src, dest / src.name)
        files.append({"path": src.name, "sha256": sha256_file(dest / src.name), "size_bytes": src.stat().st_size})
    return files


def _opset(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=0)


__all__ = ["MASK_FILL", "RECIPE", "cap_mask_fill", "export_npu", "unshare_vectors"]
