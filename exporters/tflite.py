"""LiteRT exporter: ``litert_torch.convert`` (no TensorFlow) + ai-edge-quantizer -> ``.tflite``.

Recipes (the support matrix below is the one source of truth):

* ``fp32``: the converted float graph; static shapes (batch 1, the profile's sequence length),
  which is what XNNPACK plans best and what an Android app feeds.
* ``fp16``: float16 weights (ai-edge-quantizer float casting); compute stays float32 on CPU,
  GPU delegates run it in fp16.
* ``int8-dynamic``: ai-edge-quantizer ``dynamic_wi8_afp32``: per-channel int8 weights for the
  fully connected layers and int8 embedding tables, activations quantized at run time.
  (litert-torch's PT2E dynamic path was reported to convert but not run, failing
  ``embedding_lookup.cc`` zero-point checks in LiteRT 2.3; not used here.)
* ``int8-static``: int8 weights *and* activations for the fully connected layers, activation
  ranges calibrated on the user's data, int8 embedding tables. The stock ``static_wi8_ai8``
  recipe (every op int8) gave mean cosine 0.61 on MiniLM and ran slower than fp32, so only
  FULLY_CONNECTED ops are quantized, and the layers ranked most sensitive
  (:func:`edgeship.exporters.sensitivity.rank_layers`), the fewest needed to meet the profile's
  floor, take int8 activations quantized per inference instead of calibrated ones (listed in the
  manifest). They used to stay float: on MiniLM (5 of 36 layers) that made int8-static 1.8x slower
  than int8-dynamic (5.9 vs 3.3 ms at 128 tokens) and 36% of fp32's size; now it is within a few
  percent of int8-dynamic's time at 27% of the size, same fidelity.
* ``int4-weight``: block-wise (block = the profile's ``int4_group_size``, 32/64/128/256)
  symmetric 4-bit weights for the fully connected layers with dynamic int8 activations, int8
  embeddings and convolutions; the layers that break the floor stay float.

LayerNorms: every recipe but ``int4-weight`` is quantized from a graph with its last-dim LayerNorms written out in
plain ops (:mod:`edgeship.exporters.norms`). From litert-torch's own lowering the converter folds each norm's scale
and shift into the weights of the linears reading it, which int8 per-channel weights quantize worse (MiniLM
``int8-dynamic`` mean / min cosine 0.9982 / 0.9971 folded, 0.9990 / 0.9985 written out; ``int8-static`` 0.9915 /
0.9868 and 0.9924 / 0.9891); block-wise int4 weights do better folded (0.9675 vs 0.9604 before any layer is kept),
so ``int4-weight`` keeps that graph. The manifest records the form under ``details.layer_norms``.

Not offered: int8 model inputs/outputs for microcontroller runtimes. Text models take int32
token ids (nothing to quantize), and ``int8-static`` keeps the non-FULLY_CONNECTED ops (layer
norms, softmax, pooling) in float for accuracy, so there is no integer-only graph whose float
interface could be swapped for int8.

Every artifact has one signature, ``serving_default``, whose inputs and outputs carry the
bundle's names (``input_ids``, ``attention_mask`` -> ``sentence_embedding``) so an app calls
them by name. Token ids are int32 (LiteRT has no int64 I/O); the runner casts int64 feeds
with an overflow check. The task, labels, pre-processing and I/O description are embedded
as flatbuffer metadata named ``edgeship`` (JSON) and repeated in the manifest.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from edgeship.errors import ExportError, UnsupportedRecipeError
from edgeship.exporters.base import (
    ExportContext,
    Exporter,
    ExportOutput,
    RecipeSupport,
    Stage,
    exception_chain,
    module_of,
    padding_advice,
    register,
)
from edgeship.exporters.norms import last_dim_norms, rewrite_layer_norms
from edgeship.vocab import FORMATS, TFLITE_METADATA, TFLITE_SIGNATURE, Recipe

if TYPE_CHECKING:
    from torch import nn

    from edgeship.models import LoadedModel

SIGNATURE = TFLITE_SIGNATURE
METADATA_NAME = TFLITE_METADATA
BLOCKS = (32, 64, 128, 256)  # block sizes ai-edge-quantizer offers for int4 weights
_NOT_LOWERED = re.compile(r"Lowering not found: (\S+)")
_ORIGIN = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')


@dataclass(frozen=True)
class TfliteRecipe(RecipeSupport):
    """A LiteRT table row: which fp32 graph the recipe is quantized from."""

    # litert-torch's own graph, where the converter folds each LayerNorm's scale and shift into the linears that
    # read it; False: the norms written out first (exporters/norms.py, measured there)
    folded_norms: bool = False


@register("tflite")
class TfliteExporter(Exporter):
    format: ClassVar[str] = "tflite"
    relative_cost: ClassVar[int] = 2
    suffix: ClassVar[str] = FORMATS["tflite"].suffix
    requires: ClassVar[tuple[str, ...]] = ("torch", "litert_torch", "ai_edge_quantizer", "ai_edge_litert")

    # ---- fp32 base graph, shared by the recipes of one export that take the same norm form ----------
    def _fp32(self, ctx: ExportContext, recipe: str) -> tuple[Path, dict[str, Any]]:
        spec = self.spec(recipe)
        assert isinstance(spec, TfliteRecipe)
        folded = spec.folded_norms
        stem = "tflite-fp32-base" + ("" if folded else "-norms")
        base, info_path = ctx.workdir / f"{stem}.tflite", ctx.workdir / f"{stem}.json"
        if base.is_file():
            return base, json.loads(info_path.read_text())
        import torch

        lm = ctx.model
        module, rewritten = (lm.module, 0) if folded else rewrite_layer_norms(lm.module, mean="reduce")
        wrapper = _signature_module(lm, module)
        sample = {s.name: torch.from_numpy(_int32(ctx.heldout[0][s.name])) for s in lm.inputs}
        with ctx.stage(Stage.LOWER), torch.no_grad(), litert_progress_off():
            try:
                edge = _convert(wrapper, sample)
            except Exception as e:
                why = explain_unlowered(e, wrapper, sample)
                if why:
                    raise ExportError(f"tflite/{recipe}: stage 'lower' failed: {why}") from e
                raise
        with ctx.stage(Stage.SERIALIZE), litert_progress_off():
            edge.export(str(base))
        info = {"layers": fc_layers(base, lm.module, lm.linear_layers()),
                "shapes": {s.name: list(sample[s.name].shape) for s in lm.inputs},
                "layer_norms": _norms_record(folded, rewritten, lm.module)}
        info_path.write_text(json.dumps(info))
        return base, info

    def export(self, ctx: ExportContext, recipe: str, out: Path) -> ExportOutput:
        spec = self.spec(recipe)
        base, info = self._fp32(ctx, recipe)
        buf = base.read_bytes()
        data, extra = spec.make(self, ctx, buf, info) if spec.make else (buf, {})
        quant: dict[str, Any] = {"recipe": recipe, **extra}
        warnings: list[str] = []
        meta = _metadata(ctx.model)
        with ctx.stage(Stage.SERIALIZE):
            data = embed_metadata(data, meta)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)  # into the bundle's staging directory, published atomically by the core
        runtime: dict[str, Any] = {
            "name": "litert", "options": {}, "signature": SIGNATURE,
            "input_dtypes": {s.name: _lite_dtype(s.dtype) for s in ctx.model.inputs},
            "cast": {s.name: "int64 -> int32, refused when a value overflows int32"
                     for s in ctx.model.inputs if s.dtype == "int64"},
            "runtimes": ["ai-edge-litert", "tflite-runtime"], "delegates": ["xnnpack (default)"],
        }
        seq = [info["shapes"][s.name][i] for s in ctx.model.inputs for i, d in enumerate(s.shape) if d == "sequence"]
        advice = padding_advice(ctx.model, static_length=seq[0] if seq else None)
        if advice:
            runtime["input_padding"] = advice
        npu = ctx.target.preferred_backends("tflite")
        if npu:
            runtime["preferred_delegates"] = [r.backend for r in npu]
            warnings.append("preferred delegate(s) " + ", ".join(r.backend for r in npu) + " are not bundled; pass "
                            "--option delegate=PATH/TO/DELEGATE.so on the device (the CPU runs it otherwise)")
        details = {"signatures": {SIGNATURE: {"inputs": [{"name": s.name, "dtype": _lite_dtype(s.dtype),
                                                         "shape": info["shapes"][s.name]} for s in ctx.model.inputs],
                                              "outputs": [s.name for s in ctx.model.outputs]}},
                   "metadata": {"embedded": METADATA_NAME, **meta},
                   "shapes": {"static": True, "why": "LiteRT signatures are converted with fixed shapes (batch 1, "
                                                     "the profile's sequence length); pad inputs to it"},
                   "layer_norms": info.get("layer_norms")}
        return ExportOutput(path=out, runtime=runtime, quantization=quant, details=details, warnings=warnings)

    # ---- recipes: make(exporter, ctx, fp32 flatbuffer, base info) -> (bytes, quantization entries) ----------
    def _fp16(self, ctx: ExportContext, buf: bytes, info: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
        with ctx.stage(Stage.QUANTIZE):
            data = quantize(buf, _fp16_config)
        return data, {"weights": "float16", "activations": "float32 (fp16 on GPU delegates)"}

    def _dynamic(self, ctx: ExportContext, buf: bytes, info: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
        with ctx.stage(Stage.QUANTIZE):
            data = quantize(buf, _dynamic_config)
        return data, {"weights": "int8 symmetric per-channel (FULLY_CONNECTED, CONV) and embedding tables",
                      "activations": "int8 dynamic (per inference)", "quantizer": "ai-edge-quantizer dynamic_wi8_afp32"}

    # ---- recipes that keep their most sensitive layers in higher precision ---------------------------
    def _static(self, ctx: ExportContext, buf: bytes, info: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
        from ai_edge_quantizer import quantizer

        calib = {SIGNATURE: [{k: _int32(v) for k, v in f.items()} for f in ctx.calibration]}
        with ctx.stage(Stage.CALIBRATE):
            q = quantizer.Quantizer(buf)
            _static_config(q, [])
            ranges = q.calibrate(calib)

        def build(keep: Sequence[str]) -> bytes:
            return quantize(buf, lambda q: _static_config(q, keep), ranges)

        data, extra = self._searched(ctx, info, build, higher="int8 dynamic activations")
        extra.update(weights="int8 symmetric per-channel", activations="int8 per-tensor, MinMax calibrated "
                     "(the kept layers: int8 per inference)",
                     ops="FULLY_CONNECTED (int8 in/out); embedding tables int8 (dynamic)",
                     calibration=ctx.calibration_source, calibration_samples=len(ctx.calibration),
                     quantizer="ai-edge-quantizer static (FULLY_CONNECTED only)")
        return data, extra

    def _int4(self, ctx: ExportContext, buf: bytes, info: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
        block = ctx.target.int4_group_size
        if block not in BLOCKS:
            raise UnsupportedRecipeError(f"tflite/int4-weight: block size {block} (target {ctx.target.name}) is not one "
                                         f"ai-edge-quantizer offers ({', '.join(map(str, BLOCKS))}); use a profile "
                                         "with int4_group_size 32, or the int8-dynamic recipe")
        data, extra = self._searched(ctx, info, lambda keep: quantize(buf, lambda q: _int4_config(q, block, keep)))
        extra.update(weights=f"int4 symmetric, block {block} (FULLY_CONNECTED)",
                     activations="int8 dynamic", embeddings="int8 per-channel")
        return data, extra

    def _searched(self, ctx: ExportContext, info: dict[str, Any], build: Callable[[Sequence[str]], bytes],
                  higher: str = "float") -> tuple[bytes, dict[str, Any]]:
        """Quantize every linear layer except the fewest most-sensitive ones needed to meet the floor (those
        stay in ``higher`` precision)."""
        from edgeship.exporters.sensitivity import KeepSearch, keep_search

        scope_of: dict[str, str] = info["layers"]  # torch module name -> FULLY_CONNECTED output tensor name
        if not scope_of:
            raise ExportError(f"tflite/{ctx.recipe}: no FULLY_CONNECTED op could be matched to a linear layer of "
                              f"{ctx.model.name}; use int8-dynamic")

        def write(kept: Sequence[str], _fallback: bool, path: Path) -> None:
            path.write_bytes(build([scope_of[n] for n in kept]))

        res = keep_search(ctx, KeepSearch([n for n in ctx.model.linear_layers() if n in scope_of], write, self.suffix,
                                          "litert", higher=higher))
        return res.artifact.read_bytes(), {**res.record, "kept_tflite_tensors": [scope_of[n] for n in res.kept]}

    support: ClassVar[tuple[RecipeSupport, ...]] = (
        TfliteRecipe(Recipe.FP32, "litert-torch convert, static shapes, named serving_default signature"),
        TfliteRecipe(Recipe.FP16, "float16 weights (float casting), float32 compute on CPU", make=_fp16),
        TfliteRecipe(Recipe.INT8_DYNAMIC, "ai-edge-quantizer dynamic_wi8_afp32: int8 per-channel weights + embeddings",
                     make=_dynamic),
        TfliteRecipe(Recipe.INT8_STATIC, "int8 FULLY_CONNECTED calibrated on your data, sensitive layers int8 dynamic", True,
                     make=_static),
        TfliteRecipe(Recipe.INT4_WEIGHT, "block-wise 4-bit FULLY_CONNECTED weights, dynamic int8 act., sensitive float",
                     make=_int4, folded_norms=True),
    )


# ---- conversion ------------------------------------------------------------------------------------
def _norms_record(folded: bool, rewritten: int, module: nn.Module) -> dict[str, Any]:
    """How the artifact's LayerNorms reach the linears that read them (exporters/norms.py)."""
    if not folded and rewritten:
        return {"form": "written out", "rewritten": rewritten,
                "why": "litert-torch's own lowering lets the converter fold each norm's scale and shift into the "
                       "weights of the linears that read it, which int8 per-channel weights quantize worse"}
    if not last_dim_norms(module):
        return {"form": "no last-dim LayerNorm in the model", "rewritten": 0}
    return {"form": "litert-torch's own", "rewritten": 0,
            "why": "the converter folds each norm's scale and shift into the linears reading it; block-wise int4 "
                   "weights track PyTorch better so (MiniLM: mean cosine 0.9675 vs 0.9604 with nothing kept)"}


def _signature_module(lm: LoadedModel, module: nn.Module | None = None) -> nn.Module:
    """``forward(**named int32/float inputs) -> {output name: tensor}``: the names become the signature's.
    ``module``: what to run instead of the model's own (a copy with its norms written out)."""
    import torch

    class LiteRtSignature(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = lm.module if module is None else module

        def forward(self, **feeds: torch.Tensor) -> dict[str, torch.Tensor]:
            # the model was written for int64 ids; LiteRT feeds int32 (the converter drops 64-bit types anyway)
            args = [feeds[s.name].long() if s.dtype == "int64" else feeds[s.name] for s in lm.inputs]
            res = self.inner(*args)
            outs = (res,) if isinstance(res, torch.Tensor) else tuple(res)
            return {s.name: o for s, o in zip(lm.outputs, outs, strict=True)}

    return LiteRtSignature().eval()


@contextlib.contextmanager
def litert_progress_off() -> Iterator[None]:
    """litert-torch prints its task tree to *stdout* (rich console), which breaks piping our output;
    our own stage lines already go to the log. LITERT_TORCH_SHOW_PROGRESS=y set by the user wins."""
    import logging

    key = "LITERT_TORCH_SHOW_PROGRESS"
    before = os.environ.get(key)
    if before is None:
        os.environ[key] = "n"
    logging.getLogger("litert_torch").setLevel(logging.WARNING)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)


def _convert(module: nn.Module, sample: dict[str, Any]) -> Any:
    import logging

    import litert_torch

    logging.getLogger("litert_torch").setLevel(logging.WARNING)
    return litert_torch.convert(module, sample_kwargs=sample)


def explain_unlowered(exc: BaseException, module: nn.Module, sample: dict[str, Any]) -> str | None:
    """One line naming the op litert-torch has no lowering for, the module it came from, and what to do."""
    text = "\n".join(str(e) for e in exception_chain(exc))
    m = _NOT_LOWERED.search(text)
    if not m:
        return None
    op = m.group(1)
    base = op.split(".")[1] if op.count(".") >= 2 else op
    where = _module_of(module, sample, base.lstrip("_"))
    frames = _ORIGIN.findall(text[text.find("Original traceback"):]) if "Original traceback" in text else []
    src = f" at {Path(frames[-1][0]).name}:{frames[-1][1]} `{frames[-1][3].strip()}`" if frames else ""
    return (f"litert-torch has no LiteRT lowering for {op} (in module {where or '?'}{src}); rewrite that code with "
            "ops LiteRT supports (matmul, elementwise, reductions, conv), or export this model with --format onnx "
            "or --format pte")


def _module_of(module: nn.Module, sample: dict[str, Any], op_base: str) -> str | None:
    """The innermost module (qualified name and class) whose graph holds an aten op named ``op_base``."""
    import torch

    try:
        ep = torch.export.export(module, (), sample, strict=False)
        graphs = [ep.graph, ep.run_decompositions().graph]
    except Exception:
        return None
    for g in graphs:
        for node in g.nodes:
            if node.op != "call_function":
                continue
            name = str(getattr(node.target, "__name__", node.target)).split(".")[0].lstrip("_")
            if name != op_base:
                continue
            where = module_of(node)
            if where is None:
                return "the top-level forward()"
            return f"{where[0].replace('inner.', '', 1)} ({where[1]})"
    return None


def fc_layers(path: Path, root: nn.Module, layers: Sequence[str]) -> dict[str, str]:
    """Map torch layer names to the output tensor name of their FULLY_CONNECTED op in ``path``.

    litert-torch names each tensor after the module stack it came from:
    ``pkg.Class_attr/…/torch.nn.modules.linear.Linear_dense`` (ModuleList/ModuleDict are indexed,
    never called, so they are absent). ai-edge-quantizer selects ops by these names.
    """
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    tensors = {int(t["index"]): t for t in it.get_tensor_details()}
    fcs = [o for o in it._get_ops_details() if o["op_name"] == "FULLY_CONNECTED"]
    fc_out = [str(tensors[int(o["outputs"][0])]["name"]) for o in fcs]
    fc_shape = {n: tuple(int(d) for d in tensors[int(o["inputs"][1])]["shape"]) for n, o in zip(fc_out, fcs, strict=True)}
    scopes = {layer: sc for layer in layers if (sc := _scope(root, layer))}
    # a fused op's name lists every source location it absorbed (q/k/v projections share the
    # query's location): peel off names that match exactly one still-unassigned layer
    cands = {n: {layer for layer, sc in scopes.items() if any(p.endswith(sc) for p in _pieces(n))} for n in fc_out}
    out: dict[str, str] = {}
    changed = True
    while changed:
        changed = False
        for n, left in cands.items():
            left -= set(out)
            if len(left) == 1 and n not in out.values():
                out[left.pop()] = n
                changed = True
    # an op that produces a graph output is named after the signature output ("serving_default_logits_output"):
    # match what is left by weight shape, when that is unambiguous
    named = dict(root.named_modules())
    free = [n for n in fc_out if n not in out.values()]
    for layer in layers:
        w = getattr(named.get(layer), "weight", None)
        if layer in out or w is None or w.dim() != 2:
            continue
        same = [n for n in free if fc_shape[n] == tuple(w.shape)]
        if len(same) == 1 and sum(1 for x in layers if x not in out and _shape_of(named, x) == tuple(w.shape)) == 1:
            out[layer] = same[0]
            free.remove(same[0])
    return out


def _shape_of(named: dict[str, nn.Module], layer: str) -> tuple[int, ...]:
    w = getattr(named.get(layer), "weight", None)
    return tuple(w.shape) if w is not None else ()


def _pieces(name: str) -> list[str]:
    return [p for p in name.split(";") if p and not p.isdigit()]


def _scope(root: nn.Module, layer: str) -> str | None:
    from torch import nn

    segs = []
    mod: nn.Module | None = root
    for part in layer.split("."):
        mod = mod._modules.get(part) if mod is not None else None
        if mod is None:
            return None
        if isinstance(mod, (nn.ModuleList, nn.ModuleDict)):
            continue
        segs.append(f"{type(mod).__module__}.{type(mod).__qualname__}_{part}")
    return "/".join(segs)


# ---- quantization configs (ai-edge-quantizer) ----------------------------------------------------------
def quantize(buf: bytes, configure: Callable[[Any], None], calibration: Any = None) -> bytes:
    import logging

    from ai_edge_quantizer import quantizer

    logging.getLogger("absl").setLevel(logging.ERROR)
    q = quantizer.Quantizer(buf)
    configure(q)
    res = q.quantize(calibration, enable_progress_bar=False, enable_progress_report=False)
    return positive_scales(res.quantized_model)


def positive_scales(buf: bytes | bytearray) -> bytes:
    """``buf`` with every zero scale of an int8 / int4 weight (per channel or per block) set to 1 and the integers it
    scales to their zero point, in place (same layout): exact, since they dequantize to 0 either way.

    ai-edge-quantizer writes a scale of 0 for an all-zero channel or block, and XNNPACK then refuses the whole file
    ("unsupported scale value (0.000000) in channel 0"): its OCTAV clip (under the Hadamard recipes,
    ``dynamic_wi8c_hr_afp32``) applies the 1e-9 range floor before clipping to the channel's guessed range, 0; and a
    block-wise int4 scale of that floor (1e-9 / 7) underflows to 0 in the file's float16. All-zero rows are common:
    ``nn.Embedding``'s ``padding_idx`` row gets no gradient, so it stays zero through training (and a tied LM head
    is that table), and structured pruning zeroes whole neurons."""
    from ai_edge_litert import schema_py_generated as fb

    data = bytearray(buf)
    model = fb.Model.GetRootAs(data, 0)

    def view(tensor: Any) -> np.ndarray | None:  # a constant's bytes, writable (they are ``data``'s)
        b = model.Buffers(tensor.Buffer())
        return (b.DataAsNumpy() if b.DataLength() else
                np.frombuffer(data, np.uint8, count=b.Size(), offset=b.Offset()) if b.Offset() > 1 else None)

    for g in (model.Subgraphs(i) for i in range(model.SubgraphsLength())):
        for tensor in (g.Tensors(i) for i in range(g.TensorsLength())):
            q = tensor.Quantization()
            if q is None or tensor.Type() not in (fb.TensorType.INT8, fb.TensorType.INT4):
                continue
            raw = view(tensor)
            if raw is None:  # not a constant: no integers to match
                continue
            if q.DetailsType() == fb.QuantizationDetails.BlockwiseQuantization:
                bq = fb.BlockwiseQuantization()
                bq.Init(q.Details().Bytes, q.Details().Pos)
                held = view(g.Tensors(bq.Scales()))
                if held is None or bq.ZeroPoints() >= 0 or tensor.Type() != fb.TensorType.INT4:
                    continue
                scales, size, zp = held.view(np.float16), int(bq.BlockSize()), None
            elif q.ScaleLength() > 1 and q.QuantizedDimension() == 0:
                scales, size = q.ScaleAsNumpy(), int(np.prod(tensor.ShapeAsNumpy()[1:]))
                zp = q.ZeroPointAsNumpy() if q.ZeroPointLength() else None
            else:
                continue
            zero = np.flatnonzero(scales == 0)
            for i in map(int, zero):  # the i-th run of ``size`` integers in row-major order
                z = int(zp[i]) if zp is not None else 0
                if tensor.Type() == fb.TensorType.INT8:
                    raw[i * size:(i + 1) * size] = z & 0xFF
                else:
                    fill_int4(raw, i * size, (i + 1) * size, z)
            scales[zero] = 1
    return bytes(data)


def fill_int4(raw: np.ndarray, start: int, stop: int, value: int) -> None:
    """Set int4 elements ``start:stop`` of packed bytes (two per byte, the low nibble first) to ``value``, in place;
    a run of odd length or start shares its end bytes with the neighbouring channel, whose nibbles stay."""
    nib = value & 0xF
    if start < stop and start % 2:  # the high nibble of the first byte
        raw[start // 2] = (int(raw[start // 2]) & 0x0F) | (nib << 4)
        start += 1
    if start < stop and stop % 2:  # the low nibble of the last byte
        raw[stop // 2] = (int(raw[stop // 2]) & 0xF0) | nib
        stop -= 1
    raw[start // 2:stop // 2] = nib * 0x11


def _ops() -> Any:
    from ai_edge_quantizer import qtyping

    return qtyping.TFLOperationName


def _fp16_config(q: Any) -> None:
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    q.add_weight_only_config(".*", _ops().ALL_SUPPORTED, 16, algorithm_key=AlgorithmName.FLOAT_CASTING)


def _dynamic_config(q: Any) -> None:
    from ai_edge_quantizer import recipe

    q.load_quantization_recipe(recipe.dynamic_wi8_afp32())


def _exact(name: str) -> str:
    return "^" + re.escape(name) + ";$"  # an op's scope is its output names joined by ';' plus a trailing ';'


def _static_config(q: Any, keep: Sequence[str]) -> None:
    ops = _ops()
    q.add_dynamic_config(".*", ops.EMBEDDING_LOOKUP, 8)
    q.add_static_config(".*", ops.FULLY_CONNECTED, 8, 8)
    for name in keep:  # a later regex wins: these take per-inference activation ranges, same int8 kernels
        q.add_dynamic_config(_exact(name), ops.FULLY_CONNECTED, 8)


def _int4_config(q: Any, block: int, keep: Sequence[str]) -> None:
    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    ops = _ops()
    # the other weight ops as in int8-dynamic; ALL_SUPPORTED is not used so only these ops change
    q.add_dynamic_config(".*", ops.EMBEDDING_LOOKUP, 8)
    q.add_dynamic_config(".*", ops.CONV_2D, 8)
    q.add_dynamic_config(".*", ops.FULLY_CONNECTED, 4, getattr(qtyping.QuantGranularity, f"BLOCKWISE_{block}"))
    for name in keep:
        q.update_quantization_recipe(_exact(name), ops.FULLY_CONNECTED, algorithm_key=AlgorithmName.NO_QUANTIZE)


# ---- metadata ------------------------------------------------------------------------------------------
def _metadata(lm: LoadedModel) -> dict[str, Any]:
    return {"task": lm.task, "model": lm.name, "labels": list(lm.labels) if lm.labels else None,
            "preprocessing": lm.preprocessing,
            "inputs": [{**s.to_dict(), "dtype": _lite_dtype(s.dtype)} for s in lm.inputs],
            "outputs": [s.to_dict() for s in lm.outputs]}


def embed_metadata(data: bytes, meta: dict[str, Any]) -> bytes:
    """Add (or replace) the flatbuffer metadata entry ``edgeship`` holding ``meta`` as JSON."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as fb

    model = fb.ModelT.InitFromPackedBuf(bytearray(data), 0)
    for b in model.buffers or []:
        # ai-edge-quantizer stores constants after the flatbuffer (offset/size from the file start);
        # re-packing moves the end of the flatbuffer, so pull them back inline
        if b.offset and b.offset > 1:
            b.data = np.frombuffer(data, dtype=np.uint8, count=b.size, offset=b.offset)
            b.offset, b.size = 0, 0
    buf = fb.BufferT()
    buf.data = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    model.buffers.append(buf)
    entry = fb.MetadataT()
    entry.name = METADATA_NAME
    entry.buffer = len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if _name(m.name) != METADATA_NAME] + [entry]
    builder = flatbuffers.Builder(len(data) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def read_metadata(data: bytes) -> dict[str, Any] | None:
    """The ``edgeship`` metadata of a ``.tflite`` file's bytes, or None."""
    from ai_edge_litert import schema_py_generated as fb

    model = fb.Model.GetRootAs(bytearray(data), 0)
    for i in range(model.MetadataLength()):
        m = model.Metadata(i)
        if m is not None and _name(m.Name()) == METADATA_NAME:
            raw = model.Buffers(m.Buffer())
            if raw is None:
                return None
            doc = json.loads(raw.DataAsNumpy().tobytes().decode())
            return doc if isinstance(doc, dict) else None
    return None


def _name(n: Any) -> str:
    return n.decode() if isinstance(n, bytes) else str(n or "")


def _lite_dtype(dtype: str) -> str:
    return "int32" if dtype == "int64" else dtype


def _int32(a: np.ndarray) -> np.ndarray:
    if a.dtype != np.int64:
        return a
    info = np.iinfo(np.int32)
    if a.size and (int(a.min()) < info.min or int(a.max()) > info.max):
        raise ExportError(f"an example input holds values outside int32 ({int(a.min())}..{int(a.max())}); LiteRT takes "
                          "int32 integer inputs")
    return a.astype(np.int32)


__all__ = ["TfliteExporter", "embed_metadata", "explain_unlowered", "fc_layers", "read_metadata"]
