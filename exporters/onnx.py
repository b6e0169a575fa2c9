"""ONNX exporter: ``torch.onnx.export`` (dynamo) + ONNX Runtime quantization.

Recipes (the support matrix below is the one source of truth):

* ``fp32``: torch.export-based ONNX with dynamic batch/sequence dims, optimised by onnxscript.
* ``fp16``: float16 weights and compute, float32 I/O (for GPU/NPU execution providers;
  ORT's CPU EP has few fp16 kernels and inserts casts).
* ``int8-dynamic``: per-channel int8 weights, activations quantized at run time (MatMulInteger), after the
  normalizations' outlier channels are smoothed into the next linear's weights when that tracks PyTorch
  better (:mod:`edgeship.exporters.onnx_smooth`; int8-static calibrates both graphs the same way).
* ``int8-static``: int8 linear layers and embedding tables with activation ranges calibrated on the
  user's data, MinMax or entropy, whichever tracks PyTorch better. Layers are ranked by sensitivity
  and the fewest needed are kept in float to meet the profile's floor. BERT-family encoders get
  int8-dynamic's fused kernels (``QAttention``, ``MatMulIntegerToFloat``) with constant scales
  (:mod:`edgeship.exporters.onnx_static`: QDQ ran 1.9x slower than int8-dynamic there); other
  models get QDQ, the form NPU execution providers (QNN, NNAPI) consume.
* ``int4-weight``: block-wise 4-bit weights (ORT ``MatMulNBits``), block size from the profile.
* ``npu``: static-shape QDQ compiled offline into a QNN HTP context binary for the profile's
  Snapdragon Hexagon NPU (:mod:`edgeship.exporters.onnx_npu`; needs the ``[npu]`` extra).

Text models whose outputs have no sequence dim get a padding trim at the front of every graph
(:func:`trim_padding`): trailing columns that are padding in every row are sliced off, so a short
sentence padded to 128 tokens costs what its real tokens cost. It is exact for fp32 and makes
int8 a little more accurate (dynamic and calibrated ranges no longer see padded positions).
"""

from __future__ import annotations

import ast
import json
import logging
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgeship.errors import ExportError
from edgeship.exporters.base import (
    ExportContext,
    Exporter,
    ExportOutput,
    RecipeSupport,
    Stage,
    describe_failure,
    padding_advice,
    register,
)
from edgeship.vocab import FORMATS, Recipe

OPSET = 18
TORCHSCRIPT_OPSET = 17
# model_type -> the ONNX Runtime transformer-optimizer family that fuses its attention blocks
FUSABLE = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "distilbert": "bert", "electra": "bert",
           "camembert": "bert"}
# Session options every ONNX artifact carries (tests/exporters/test_onnx.py guards each):
# * graph_optimization "all": QDQ int8 only becomes QLinearMatMul at "extended" or above; at "basic"
#   ORT runs DequantizeLinear + float MatMul and int8-static MiniLM ran 4x slower than at "all".
# * ORT's contrib SkipLayerNormalization CPU kernel ran ~7x slower than Add + LayerNormalization here
#   (onnxruntime 1.32, 128x384: 222 us vs 32 us), so graphs keep Add + LayerNormalization and ask the
#   runtime not to fuse them.
# * denormal_as_zero: padded positions push attention into denormal floats, which x86 runs slowly.
RUNTIME_OPTIONS = {"graph_optimization": "all", "disabled_optimizers": ["SkipLayerNormFusion"], "denormal_as_zero": True}
logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)


@dataclass(frozen=True)
class OnnxRecipe(RecipeSupport):
    """An ONNX table row: which base graph the recipe may start from and what it adds to the manifest."""

    fusable: bool = False  # may start from the attention-fused TorchScript graph (BERT family)
    # builds its own graph instead of the shared dynamic-shape base (npu: static shapes + a QNN compile), so
    # make(exporter, ctx, out) returns the whole ExportOutput
    own_graph: bool = False
    runtime: Mapping[str, Any] = field(default_factory=dict)  # extra runtime entries
    warnings: tuple[str, ...] = ()


@register("onnx")
class OnnxExporter(Exporter):
    format: ClassVar[str] = "onnx"
    suffix: ClassVar[str] = FORMATS["onnx"].suffix
    requires: ClassVar[tuple[str, ...]] = ("torch", "onnx", "onnxscript", "onnxruntime")

    # ---- fp32 base graph, shared by every recipe of one export ------------------------------
    def _fp32(self, ctx: ExportContext, recipe: str) -> Path:
        base = ctx.workdir / "onnx-fp32-base.onnx"
        if base.is_file():
            return base
        import torch

        lm = ctx.model
        args = lm.torch_args(ctx.heldout[0])
        dyn: dict[str, torch.export.Dim] = {}
        for name, d in lm.dims.items():
            # torch.export specialises a size-1 example dim; a batch Dim needs an example >= 2
            dyn[name] = torch.export.Dim(name, min=max(int(d.get("min", 1)), 1), max=int(d.get("max", 2**16)))
        shapes = tuple({i: dyn[s] for i, s in enumerate(spec.shape) if isinstance(s, str) and s in dyn}
                       for spec in lm.inputs)
        if lm.dims.get("batch") is not None:
            args = tuple(torch.cat([a, a]) for a in args)
        with ctx.stage(Stage.LOWER), torch.inference_mode(False), torch.no_grad():
            prog = torch.onnx.export(lm.module, args, dynamo=True, optimize=True, opset_version=OPSET,
                                     input_names=[s.name for s in lm.inputs], output_names=[s.name for s in lm.outputs],
                                     dynamic_shapes=shapes, verbose=False, report=False)
            if prog is None:
                raise ExportError("torch.onnx.export returned no program")
        with ctx.stage(Stage.SERIALIZE):
            prog.save(str(base))
            _check_single_file(base)
            if trims_padding(lm):
                trim_padding(base, [s.name for s in lm.inputs])
        return base

    # ---- fused graph (TorchScript export + ORT transformer optimizer) for BERT-family encoders ----
    def _fused(self, ctx: ExportContext, recipe: str) -> tuple[Path | None, dict[str, Any]]:
        """Attention-fused fp32 graph, or None with the reason (recorded in the manifest)."""
        lm = ctx.model
        mtype = str(getattr(lm.config, "model_type", "") or "")
        if ctx.options.get("onnx_graph", "auto") == "dynamo":
            return None, {"graph": "dynamo", "why": "options onnx_graph=dynamo"}
        if mtype not in FUSABLE or lm.inputs[0].name != "input_ids":
            return None, {"graph": "dynamo", "why": f"no attention fusion for model_type '{mtype or lm.task}'"}
        fused = ctx.workdir / "onnx-fp32-fused.onnx"
        info_path = ctx.workdir / "onnx-fp32-fused.json"
        if fused.is_file():
            return fused, json.loads(info_path.read_text())
        import torch
        from onnxruntime.transformers import optimizer
        from onnxruntime.transformers.fusion_options import FusionOptions

        raw = ctx.workdir / "onnx-fp32-torchscript.onnx"
        names_in = [s.name for s in lm.inputs]
        names_out = [s.name for s in lm.outputs]
        axes = {s.name: {i: d for i, d in enumerate(s.shape) if isinstance(d, str)} for s in (*lm.inputs, *lm.outputs)}
        with ctx.stage(Stage.LOWER), lm.native_attention_mask(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(lm.module, lm.torch_args(ctx.heldout[0]), str(raw), input_names=names_in,
                              output_names=names_out, dynamic_axes=axes, opset_version=TORCHSCRIPT_OPSET, dynamo=False)
        with ctx.stage(Stage.OPTIMIZE):
            fo = FusionOptions(FUSABLE[mtype])
            fo.enable_skip_layer_norm = False
            opt = optimizer.optimize_model(str(raw), model_type=FUSABLE[mtype],
                                           num_heads=int(lm.config.num_attention_heads),
                                           hidden_size=int(lm.config.hidden_size), opt_level=0, optimization_options=fo)
            stats = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
            if not stats.get("Attention"):
                return None, {"graph": "dynamo", "why": f"ORT's transformer optimizer fused no attention block ({stats})"}
            opt.save_model_to_file(str(fused))
            if trims_padding(lm):
                trim_padding(fused, names_in)
        info = {"graph": "fused", "exporter": "torch.onnx (TorchScript) + onnxruntime.transformers optimizer",
                "fused_ops": stats, "why": f"{mtype}: attention blocks fused for ONNX Runtime's CPU kernels"}
        info_path.write_text(json.dumps(info))
        return fused, info

    def export(self, ctx: ExportContext, recipe: str, out: Path) -> ExportOutput:
        spec = self.spec(recipe)
        assert isinstance(spec, OnnxRecipe) and spec.make is not None
        if spec.own_graph:
            return spec.make(self, ctx, out)  # type: ignore[no-any-return]
        fused, graph = self._fused(ctx, recipe) if spec.fusable else (None, {"graph": "dynamo"})
        base = fused if fused is not None else self._fp32(ctx, recipe)
        runtime: dict[str, Any] = {"name": "onnxruntime", "options": dict(RUNTIME_OPTIONS), "opset": OPSET,
                                   "execution_providers": ["CPUExecutionProvider"], "graph": graph, **spec.runtime}
        if fused is not None:
            runtime["opset"] = TORCHSCRIPT_OPSET
        trims = trims_padding(ctx.model)
        if trims:
            runtime["graph"] = {**graph, "trims_padding": True, "padding_note": PADDING_NOTE}
        advice = padding_advice(ctx.model, trims=trims)
        if advice:
            runtime["input_padding"] = advice
        npu = [r for r in ctx.target.preferred_backends("onnx")]
        if npu:
            runtime["preferred_execution_providers"] = [r.backend for r in npu] + ["CPUExecutionProvider"]
            runtime["options"]["providers"] = [r.backend for r in npu]
        out.parent.mkdir(parents=True, exist_ok=True)
        quant = {"recipe": recipe, **spec.make(self, ctx, base, fused is not None, out)}
        return ExportOutput(path=out, runtime=runtime, quantization=quant, warnings=list(spec.warnings))

    def _calibrate(self, ctx: ExportContext, base: Path,
                   prepare: Callable[[Path], tuple[Path, Callable[[Any, Path], None]]]) -> tuple[Path, Any, dict[str, Any]]:
        """Calibrate ``base`` and its smoothed twin with each method; keep the pair whose fully-quantized graph
        tracks PyTorch best. Returns (that graph, its ranges, the manifest's entries).

        MinMax keeps every outlier in range; entropy (KL) clips rare ones for finer steps. Which wins
        depends on the model (on MiniLM entropy needed 6 float layers where MinMax needed 15 for 0.99).
        ``prepare(graph)`` -> (the graph to calibrate, ``quantize_all(ranges, path)`` writing ``graph`` with every
        layer quantized).
        """
        smoothed, smoothing = self._smooth(ctx, base)
        tried: dict[str, float] = {}
        best: tuple[float, Path, str, Any] | None = None
        for src, label in ((base, ""), *(((smoothed, " (smoothed)"),) if smoothed is not None else ())):
            calibrated, quantize_all = prepare(src)
            for method in CALIBRATION_METHODS:
                with ctx.stage(Stage.CALIBRATE):
                    ranges = _calibration_ranges(calibrated, ctx.calibration, ctx.workdir, method)
                    probe = ctx.workdir / f"onnx-{ctx.recipe}-{method}-all.onnx"
                    quantize_all(ranges, probe)
                    tried[method + label] = ctx.evaluate(probe, "onnx", RUNTIME_OPTIONS).mean_cosine
                if best is None or tried[method + label] > best[0]:
                    best = (tried[method + label], src, method + label, ranges)
        assert best is not None
        _, graph, method, ranges = best
        ctx.log(f"[onnx/{ctx.recipe}] calibration: " + ", ".join(f"{m} {c:.4f}" for m, c in tried.items())
                + f" mean cosine fully quantized; using {method}")
        return graph, ranges, {"calibration_method": method, "calibration_methods_tried": tried,
                               "smoothing": {**smoothing, "adopted": graph == smoothed}}

    # ---- recipes that keep their most sensitive layers in float ------------------------------
    def _searched(self, ctx: ExportContext, base: Path, out: Path, quantize: Callable[[Path, Path, list[str]], None],
                  node_of: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Quantize every linear layer except the fewest most-sensitive ones needed to meet the floor.

        ``node_of``: torch module name -> ONNX node (default: the dynamo graph's MatMul of each layer). Several
        layers may share a node (a fused Attention holds q, k and v): keeping one keeps the node.
        """
        from edgeship.exporters.sensitivity import KeepSearch, keep_search

        if node_of is None:
            node_of = linear_nodes(base, ctx.model.linear_layers())
        if not node_of:
            raise ExportError(f"onnx/{ctx.recipe}: found no MatMul nodes with weight initializers to quantize")
        candidates = [n for n in ctx.model.linear_layers() if n in node_of]

        def build(kept: Sequence[str], _fallback: bool, path: Path) -> None:
            float_nodes = {node_of[n] for n in kept}
            quantize(base, path, [m for m in dict.fromkeys(node_of[n] for n in candidates) if m not in float_nodes])

        res = keep_search(ctx, KeepSearch(candidates, build, self.suffix, "onnxruntime", RUNTIME_OPTIONS))
        shutil.copyfile(res.artifact, out)
        return {**res.record, "kept_onnx_nodes": list(dict.fromkeys(node_of[n] for n in res.kept))}


    # ---- the support table: one row per recipe, the dispatch of export() ---------------------------
    # make(exporter, ctx, base graph, base is fused, out) -> the manifest's quantization entries
    def _make_fp32(self, ctx: ExportContext, base: Path, fused: bool, out: Path) -> dict[str, Any]:
        shutil.copyfile(base, out)
        return {}

    def _make_fp16(self, ctx: ExportContext, base: Path, fused: bool, out: Path) -> dict[str, Any]:
        with ctx.stage(Stage.QUANTIZE):
            _to_fp16(base, out)
        return {"weights": "float16", "io": "float32"}

    def _make_int8_dynamic(self, ctx: ExportContext, base: Path, fused: bool, out: Path) -> dict[str, Any]:
        record: dict[str, Any] = {"weights": "int8 symmetric per-channel (MatMul) / per-tensor (Gather)",
                                  "activations": "uint8 dynamic", "ops": "MatMul, Gather"}
        plain = self._all_dynamic(ctx, base, fused)
        smoothed, smoothing = self._smooth(ctx, base)
        if smoothed is None:
            shutil.copyfile(plain, out)
            return {**record, "smoothing": smoothing}
        candidate = self._all_dynamic(ctx, smoothed, fused)
        with ctx.stage(Stage.SEARCH):
            plain_cos, smooth_cos = (ctx.evaluate(p, "onnx", RUNTIME_OPTIONS).mean_cosine for p in (plain, candidate))
        shutil.copyfile(candidate if smooth_cos > plain_cos else plain, out)
        return {**record, "smoothing": {**smoothing, "adopted": smooth_cos > plain_cos,
                                        "search_mean_cosine": {"plain": round(plain_cos, 5),
                                                               "smoothed": round(smooth_cos, 5)}}}

    def _all_dynamic(self, ctx: ExportContext, src: Path, fused: bool) -> Path:
        """``src`` with every layer int8-dynamic, written once per work directory: int8-dynamic ships it and the
        fused int8-static starts from it."""
        path = ctx.workdir / f"{src.stem}-int8-all-dynamic.onnx"
        if not path.is_file():
            part = path.with_name(path.stem + ".part.onnx")  # a failed write must not look like a cached graph
            with ctx.stage(Stage.QUANTIZE):
                _dynamic_int8(src, part, fused=fused)
            part.replace(path)
        return path

    def _smooth(self, ctx: ExportContext, base: Path) -> tuple[Path | None, dict[str, Any]]:
        """``base`` with its normalizations' outputs smoothed (:mod:`edgeship.exporters.onnx_smooth`; written once
        per export, int8-dynamic and int8-static share it) and the manifest's record; None when nothing to smooth."""
        if not ctx.options.get("onnx_smoothing", True):  # the restoring Muls cost ~3% of MiniLM's int8 time
            return None, {"normalizations": 0, "why": "options onnx_smoothing=false"}
        key = (OnnxExporter, "smoothed", str(base))
        if key not in ctx.shared:
            ctx.shared[key] = self._write_smoothed(ctx, base)
        smoothed: tuple[Path | None, dict[str, Any]] = ctx.shared[key]
        return smoothed

    def _write_smoothed(self, ctx: ExportContext, base: Path) -> tuple[Path | None, dict[str, Any]]:
        from edgeship.exporters import onnx_smooth

        smoothed = ctx.workdir / f"{base.stem}-smoothed.onnx"
        with ctx.stage(Stage.CALIBRATE):
            try:
                norms = onnx_smooth.smooth(base, smoothed, ctx.calibration)
            except Exception as e:  # an optional improvement: the plain graph is still exported, and why is kept
                why = f"smoothing failed: {describe_failure(e)}"
                ctx.log(f"[onnx/{ctx.recipe}] WARNING: {why}; quantizing the plain graph")
                return None, {"normalizations": 0, "why": why}
        if not norms:
            return None, {"normalizations": 0, "why": "no normalization feeds a linear layer"}
        return smoothed, {"normalizations": norms, "alpha": onnx_smooth.ALPHA,
                          "calibration": ctx.calibration_source, "calibration_samples": len(ctx.calibration)}

    def _make_int8_static(self, ctx: ExportContext, base: Path, fused: bool, out: Path) -> dict[str, Any]:
        calibration = {"calibration": ctx.calibration_source, "calibration_samples": len(ctx.calibration)}
        if fused:
            return {**calibration, **self._static_fused(ctx, base, out)}
        node_of = linear_nodes(base, ctx.model.linear_layers())  # node names survive smoothing
        every = list(node_of.values())
        graph, ranges, record = self._calibrate(ctx, base, lambda g: (g, lambda r, p: _qdq(g, p, r, every)))
        return {"weights": "int8 symmetric per-channel; embedding tables uint8 per-tensor",
                "activations": f"uint8 asymmetric per-tensor at each quantized layer's input, "
                               f"{record['calibration_method']} calibrated; layer outputs stay float",
                "format": "QDQ", "npu_note": QDQ_NPU_NOTE, **calibration, **record,
                **self._searched(ctx, graph, out, lambda src, dst, nodes: _qdq(src, dst, ranges, nodes), node_of)}

    def _static_fused(self, ctx: ExportContext, base: Path, out: Path) -> dict[str, Any]:
        """int8-static on the attention-fused graph: int8-dynamic's fused kernels with calibrated activation scales."""
        from edgeship.exporters import onnx_static

        named = dict(ctx.model.module.named_modules())
        node_of = onnx_static.fused_linear_nodes(base, {n: named[n].weight.detach().float().numpy()
                                                        for n in ctx.model.linear_layers()})

        def prepare(src: Path) -> tuple[Path, Callable[[Any, Path], None]]:
            with ctx.stage(Stage.CALIBRATE):
                typed = onnx_static.typed_for_calibration(src, ctx.workdir / f"{src.stem}-typed.onnx")

            def quantize_all(ranges: Any, path: Path) -> None:
                onnx_static.make_static(self._all_dynamic(ctx, src, fused=True), path, ranges)
            return typed, quantize_all

        graph, ranges, record = self._calibrate(ctx, base, prepare)
        all_nodes = set(node_of.values())

        def quantize(src: Path, dst: Path, nodes: list[str]) -> None:
            dyn = dst.with_name(dst.stem + "-dynamic.onnx")
            _dynamic_int8(src, dyn, fused=True, exclude=sorted(all_nodes - set(nodes)))
            onnx_static.make_static(dyn, dst, ranges)
            dyn.unlink()

        return {"weights": "int8 symmetric per-channel (MatMul) / per-tensor (Attention QKV, embeddings)",
                "activations": f"uint8 asymmetric per-tensor at each quantized layer's input, "
                               f"{record['calibration_method']} calibrated (constant QuantizeLinear scales); "
                               "layer outputs stay float",
                "format": "QOperator (ORT QAttention, MatMulIntegerToFloat, QEmbedLayerNormalization)", **record,
                **self._searched(ctx, graph, out, quantize, node_of)}

    def _make_int4_weight(self, ctx: ExportContext, base: Path, fused: bool, out: Path) -> dict[str, Any]:
        block = ctx.target.int4_group_size
        return {"weights": f"int4 symmetric, block {block} (MatMulNBits); embeddings int4 along the hidden axis",
                "activations": "float32",
                **self._searched(ctx, base, out, lambda src, dst, nodes: _int4(src, dst, block, nodes))}

    def _make_npu(self, ctx: ExportContext, out: Path) -> ExportOutput:
        from edgeship.exporters.onnx_npu import export_npu  # needs onnxruntime-qnn (the [npu] extra)

        return export_npu(ctx, out)

    support: ClassVar[tuple[RecipeSupport, ...]] = (
        OnnxRecipe(Recipe.FP32, "torch.onnx dynamo export, dynamic batch/sequence", make=_make_fp32, fusable=True),
        OnnxRecipe(Recipe.FP16, "float16 weights and compute, float32 I/O (GPU/NPU EPs)", make=_make_fp16,
                   warnings=("fp16 targets GPU/NPU execution providers; ORT's CPU provider runs it through casts",)),
        OnnxRecipe(Recipe.INT8_DYNAMIC, "ORT quantize_dynamic, per-channel int8 weights incl. embeddings",
                   make=_make_int8_dynamic, fusable=True),
        OnnxRecipe(Recipe.INT8_STATIC, "calibrated int8: ORT's fused QAttention/MatMulIntegerToFloat kernels with "
                                       "static scales (BERT family), QDQ otherwise; sensitivity-ranked layers kept "
                                       "in float", True, make=_make_int8_static, fusable=True),
        OnnxRecipe(Recipe.INT4_WEIGHT, "ORT MatMulNBits, block-wise symmetric 4-bit weights", make=_make_int4_weight),
        OnnxRecipe(Recipe.NPU, "static-shape QDQ (QNN config, A8W8 or A16W8) compiled to a QNN HTP context binary "
                               "for the profile's Hexagon NPU, plus the QDQ model as portable fallback", True,
                   make=_make_npu, own_graph=True),
    )


QDQ_NPU_NOTE = ("QDQ int8 is the form the QNN and NNAPI execution providers take; on a device with onnxruntime-qnn "
                "pass providers=QNNExecutionProvider (or export the npu recipe)")
PADDING_NOTE = ("trailing columns that are padding in every row are sliced off inside the graph before the encoder "
                "runs; exact for this task (padded positions are masked keys and never reach the output)")


def trims_padding(lm: Any) -> bool:
    """True when the model can drop trailing all-padding columns without changing any output.

    Needs an ``attention_mask`` input, every input shaped (batch, sequence), and outputs without a
    sequence dim (pooled embeddings, sequence logits): token classification keeps its padding.
    """
    names = [s.name for s in lm.inputs]
    if "attention_mask" not in names:
        return False
    if any(tuple(s.shape) != ("batch", "sequence") for s in lm.inputs):
        return False
    return all("sequence" not in s.shape for s in lm.outputs)


def trim_padding(path: Path, seq_inputs: Sequence[str], mask: str = "attention_mask") -> None:
    """Rewrite ``path`` so the graph slices its (batch, sequence) inputs to the last column any row uses.

    A batch-1 text padded to a fixed length (what static-shape apps and our own tokenizer settings
    send) then costs what its real tokens cost: ``L = max(1, 1 + last column where some mask != 0)``.
    The graph stays exact: positions past ``L`` are padding in every row, so they are masked keys in
    attention and excluded from pooling. Left-padded input simply keeps its full length.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=OPSET)
    if opset < 13:
        raise ExportError(f"{path.name}: padding trim needs opset >= 13 (graph has {opset})")
    pre = "edgeship_trim/"
    renamed = {name: f"{pre}{name}" for name in seq_inputs}
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    consts = [numpy_helper.from_array(np.asarray(v, dtype=np.int64), pre + k) for k, v in
              {"axis0": [0], "axis1": [1], "zero": 0, "one": 1, "one1": [1], "start": [0]}.items()]
    nodes = [
        helper.make_node("Cast", [mask], [pre + "mask64"], to=TensorProto.INT64),
        helper.make_node("ReduceSum", [pre + "mask64", pre + "axis0"], [pre + "col_sum"], keepdims=0),
        helper.make_node("Greater", [pre + "col_sum", pre + "zero"], [pre + "col_used_b"]),
        helper.make_node("Cast", [pre + "col_used_b"], [pre + "col_used"], to=TensorProto.INT64),
        helper.make_node("Shape", [pre + "col_used"], [pre + "seq_len"]),
        helper.make_node("Squeeze", [pre + "seq_len"], [pre + "seq_len_s"]),
        helper.make_node("Add", [pre + "seq_len_s", pre + "one"], [pre + "limit"]),
        helper.make_node("Range", [pre + "one", pre + "limit", pre + "one"], [pre + "position"]),
        helper.make_node("Mul", [pre + "col_used", pre + "position"], [pre + "used_position"]),
        helper.make_node("ReduceMax", [pre + "used_position"], [pre + "last"], keepdims=1),
        helper.make_node("Max", [pre + "last", pre + "one1"], [pre + "end"]),
    ]
    nodes += [helper.make_node("Slice", [name, pre + "start", pre + "end", pre + "axis1"], [new])
              for name, new in renamed.items()]
    g.initializer.extend(consts)
    for n in reversed(nodes):
        g.node.insert(0, n)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _check_single_file(path: Path) -> None:
    data = path.with_name(path.name + ".data")
    if data.exists():  # > 2 GB models need external data; keep the bundle self-describing
        raise ExportError(f"{path.name}: model needs ONNX external data (> 2 GB); not supported by the bundle yet")


def linear_nodes(path: Path, layers: Sequence[str]) -> dict[str, str]:
    """Map torch module names (e.g. ``model.encoder.layer.0.output.dense``) to ONNX MatMul node names.

    The dynamo exporter records the module scope of every node in ``pkg.torch.onnx.name_scopes``.
    Only MatMuls with a constant (initializer) operand are layers; attention's activation x
    activation MatMuls are not.
    """
    import onnx

    wanted = set(layers)
    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    out: dict[str, str] = {}
    for node in m.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv") or not any(i in inits for i in node.input):
            continue
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = meta.get("pkg.torch.onnx.name_scopes")
        if not scopes:
            continue
        try:
            names = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            continue
        # scopes run outermost -> innermost, ending with the op ("linear"); the deepest known layer wins
        for scope in reversed(names):
            if scope in wanted:
                out.setdefault(str(scope), node.name)
                break
    return out


class _Reader:
    """ORT CalibrationDataReader over our feeds."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:  # pragma: no cover - ORT calls it for some methods
        pass


CALIBRATION_METHODS = ("minmax", "entropy")


def _calibration_ranges(base: Path, feeds: Sequence[dict[str, np.ndarray]], workdir: Path, method: str) -> Any:
    """Activation ranges from ``feeds``, collected one sample at a time.

    Trap: ORT's histogram collectors (entropy, percentile) stack every sample's activations into one
    array, which fails ("inhomogeneous shape") once samples differ in length, as they do after the
    graph trims padding. Collecting per sample merges histograms instead.
    """
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    kind = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy}[method]
    cal = create_calibrator(str(base), None, augmented_model_path=str(workdir / f"onnx-augmented-{method}.onnx"),
                            calibrate_method=kind, extra_options={"symmetric": False})
    for f in feeds:
        cal.collect_data(_Reader([f]))
    ranges = cal.compute_data()
    del cal
    return ranges


def embedding_gathers(graph: Any) -> list[str]:
    """Gather nodes of ``graph`` (an ``onnx.GraphProto``) that index a weight table (token / position / type embeddings)."""
    inits = {i.name for i in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "Gather" and n.input and n.input[0] in inits]


def _qdq(base: Path, out: Path, ranges: Any, nodes: Sequence[str]) -> None:
    """QDQ int8: ``nodes`` (linear layers) plus every embedding table, whose float copy was most of the file."""
    import onnx
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    model = onnx.load(str(base))
    todo = [*nodes, *embedding_gathers(model.graph)]  # read from the model already loaded: one parse per attempt
    if not todo:
        onnx.save(model, str(out))
        return
    # Layer outputs stay float: quantizing them too cost MiniLM its accuracy (every layer quantized: mean cosine
    # 0.951 vs 0.991 without) and time (QLinearMatMul + DequantizeLinear before every bias Add). Conv keeps its
    # output quantized, the only way ORT runs it as QLinearConv.
    q = QDQQuantizer(model, True, False, QuantType.QInt8, QuantType.QUInt8, ranges, todo, [],
                     ["MatMul", "Gemm", "Conv", "Gather"],
                     {"DefaultTensorType": onnx.TensorProto.FLOAT,
                      "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm", "Gather"]})
    q.quantize_model()
    q.model.save_model_to_file(str(out), False)


def _dynamic_int8(base: Path, out: Path, fused: bool, exclude: Sequence[str] = ()) -> None:
    """int8-dynamic's quantization (also the first step of int8-static on a fused graph); ``exclude``: nodes kept float."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # a fused graph also quantizes its Attention / EmbedLayerNormalization ops (QAttention: int8 QKV)
    ops = None if fused else ["MatMul", "Gather", "Conv"]
    quantize_dynamic(str(base), str(out), per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=ops,
                     nodes_to_exclude=list(exclude), extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def _int4(base: Path, out: Path, block: int, nodes: Sequence[str]) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    model = onnx.load(str(base))
    matmuls = {n.name for n in model.graph.node if n.op_type == "MatMul"}
    exclude = sorted(matmuls - set(nodes))
    cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, accuracy_level=4,
                                       op_types_to_quantize=("MatMul", "Gather"), quant_axes=(("MatMul", 0), ("Gather", 1)))
    q = MatMulNBitsQuantizer(model, block_size=block, is_symmetric=True, accuracy_level=4, nodes_to_exclude=exclude,
                             algo_config=cfg)
    q.process()
    q.model.save_model_to_file(str(out), False)


def _to_fp16(base: Path, out: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(base))
    fp16 = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    onnx.save(fp16, str(out))


__all__ = ["OnnxExporter", "linear_nodes"]
