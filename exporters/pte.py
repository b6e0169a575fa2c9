"""ExecuTorch exporter: ``torch.export`` -> ``to_edge_transform_and_lower`` (XNNPACK) -> ``.pte``.

Recipes (the support matrix below is the one source of truth):

* ``fp32``: float graph, XNNPACK-delegated where the partitioner takes it.
* ``int8-dynamic``: PT2E ``XNNPACKQuantizer``, per-channel int8 weights, int8 activations
  quantized at run time; int8 embedding tables (those of at least 1% of the parameters: a small table's
  lookups on the portable int8 kernel cost more time than its file share is worth, :data:`INT8_EMBEDDING_MIN_SHARE`).
* ``int8-static``: PT2E, linear/conv layers int8 with activations calibrated on the user's
  data; the most sensitive layers (sensitivity search) take int8 activations quantized per
  inference instead. Kept in float, as before, they made MiniLM's int8-static 1.7x slower than
  int8-dynamic; now it runs as fast at 26% of fp32's size.
* ``int4-weight``: torchao 8-bit dynamic activations + 4-bit grouped weights ("8da4w", group
  size from the profile); the layers whose 4-bit weights break the floor keep 8-bit weights.

Every artifact gets a delegation report (``details["delegation"]``, see
:mod:`edgeship.exporters.pte_delegation`) and the input/output names, dtypes and dynamic
dimensions embedded as the constant method ``edgeship_io`` so a bare ``.pte`` is
self-describing. Sequence length is dynamic (bounded ``Dim``) when the model allows it;
batch is fixed at 1 because ExecuTorch's memory planner reserves buffers for the upper
bound of every dynamic dimension (a batch of 64 would reserve 64x the activations).

The search over kept layers is scored on the quantized PyTorch graph first (a forward pass,
seconds) and then confirmed, and if needed grown, on real lowered artifacts run by the
ExecuTorch runtime (~30 s each on MiniLM); both kinds of attempt are in the manifest.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from edgeship.errors import UnsupportedRecipeError
from edgeship.exporters.base import (
    ExportContext,
    Exporter,
    ExportOutput,
    RecipeSupport,
    Stage,
    module_of,
    padding_advice,
    register,
)
from edgeship.exporters.norms import rewrite_layer_norms
from edgeship.manifest import Fidelity
from edgeship.vocab import FORMATS, PTE_IO_METHOD, Recipe

if TYPE_CHECKING:
    import torch
    from torch import nn

IO_METHOD = PTE_IO_METHOD
DELEGATE = "XnnpackBackend"
MAX_REAL_BUILDS = 4  # lowering MiniLM takes ~30 s on 2 cores: real builds after the proxy search are capped


def _qnn_missing() -> str:
    root = os.environ.get("QNN_SDK_ROOT")
    if not root:
        return "the Qualcomm AI Engine Direct (QNN) SDK is not installed here (QNN_SDK_ROOT is unset)"
    if not any(Path(root).rglob("libQnnHtp.so")):
        return f"QNN_SDK_ROOT={root} has no libQnnHtp.so"
    return "edgeship does not lower to QNN yet"


# Why a preferred ExecuTorch backend from a target profile cannot be used here, by backend name.
_UNAVAILABLE: dict[str, Callable[[], str]] = {
    "qnn": _qnn_missing,
    "coreml": lambda: "Core ML lowering needs coremltools on macOS; this build machine is Linux",
    "mps": lambda: "the MPS backend needs macOS with Metal",
    "vulkan": lambda: "edgeship does not lower to the ExecuTorch Vulkan backend yet",
}


@dataclass(frozen=True)
class PteRecipe(RecipeSupport):
    higher: str = "float"  # what the layers the search keeps stay in


@register("pte")
class PteExporter(Exporter):
    format: ClassVar[str] = "pte"
    relative_cost: ClassVar[int] = 10
    suffix: ClassVar[str] = FORMATS["pte"].suffix
    requires: ClassVar[tuple[str, ...]] = ("torch", "executorch", "torchao")

    def export(self, ctx: ExportContext, recipe: str, out: Path) -> ExportOutput:
        import torch

        spec = self.spec(recipe)
        assert isinstance(spec, PteRecipe)
        lm = ctx.model
        args = lm.torch_args(ctx.heldout[0])
        module, swapped, ep, shapes_info = _captured(ctx, args)
        dyn = _dynamic_shapes(lm, shapes_info)
        io = _io_description(lm, shapes_info)
        quant: dict[str, Any] = {"recipe": recipe}
        warnings: list[str] = []
        fallbacks = self._fallbacks(ctx)
        for f in fallbacks:
            ctx.log(f"[pte/{recipe}] {f['wanted']} -> XNNPACK: {f['reason']}")
            warnings.append(f"preferred backend {f['wanted']} not used ({f['reason']}); lowered to XNNPACK + portable CPU")

        def lower(module: nn.Module, path: Path) -> dict[str, Any]:
            with ctx.stage(Stage.LOWER), torch.no_grad():
                prog = torch.export.export(module, args, dynamic_shapes=dyn, strict=False)
                return _lower(prog, path, io, {k: list(v.shape) for k, v in zip(io["input_names"], args, strict=True)})

        if spec.make is None:
            with ctx.stage(Stage.LOWER), torch.no_grad():
                # a copy: the capture is shared with this export's other recipes, and lowering may rewrite it
                report = _lower(copy.deepcopy(ep), out, io, {k: list(v.shape) for k, v in zip(io["input_names"], args, strict=True)})
        else:
            # int8 embeddings shrink the file; the search turns them off if they cost the accuracy
            tables = _int8_tables(lm.module)
            has_emb = bool(tables)
            if has_emb:
                quant["embeddings"] = _embeddings_record(lm.module, tables)
            least = min(tables.values(), default=0)  # int8 for the tables at least this large
            make, candidates = spec.make(self, ctx, ep, args, quant, dyn, module)
            report, extra = _searched(ctx, _last_one(lambda kept, emb: make(kept, least if emb else 0)), lower, out,
                                      has_emb, candidates, spec.higher)
            quant.update(extra)
        details = {"delegation": report, "shapes": shapes_info, "fallbacks": fallbacks,
                   "layer_norms": {"rewritten_for_xnnpack": swapped, "why": "XNNPACK has no native_layer_norm "
                                   "config; the linear/rsqrt form keeps them in the delegate" if swapped else
                                   "no last-dim LayerNorm in the model"}}
        runtime: dict[str, Any] = {"name": "executorch", "version": _version(), "delegates": [DELEGATE],
                                   "options": {}, "io_method": IO_METHOD}
        seq = shapes_info.get("sequence") or {}
        advice = padding_advice(lm, static_length=None if seq.get("dynamic") or not seq else seq.get("length"))
        if advice:
            runtime["input_padding"] = advice
        if fallbacks:
            runtime["preferred_backends"] = [f["wanted"] for f in fallbacks]
        return ExportOutput(path=out, runtime=runtime, quantization=quant, details=details, warnings=warnings)

    # ---- recipes -----------------------------------------------------------------------------
    # make(exporter, ctx, captured program, example args, quantization entries to fill, dynamic shapes, module)
    #   -> ((layers kept in higher precision, smallest int8 embedding table in values, 0: none) -> quantized torch
    #       module, the layers it may keep)
    def _pt2e_quantizer(self, ctx: ExportContext, ep: Any, args: tuple[torch.Tensor, ...], quant: dict[str, Any],
                        dyn: Any, module: nn.Module) -> tuple[Callable[[Sequence[str], int], nn.Module], list[str]]:
        lm = ctx.model
        static = self.spec(ctx.recipe).needs_calibration
        quant.update(weights="int8 symmetric per-channel",
                     activations="int8 per-tensor, calibrated" if static else "int8 per-tensor, dynamic",
                     quantizer="PT2E XNNPACKQuantizer")
        if static:
            quant.update(calibration=ctx.calibration_source, calibration_samples=len(ctx.calibration))
            calib = [lm.torch_args(f) for f in ctx.calibration]
        else:
            calib = [args]
        return (lambda kept, emb: _pt2e(ep, lm.linear_layers(), kept, static, emb, calib)), lm.linear_layers()

    def _int4_quantizer(self, ctx: ExportContext, ep: Any, args: tuple[torch.Tensor, ...], quant: dict[str, Any],
                        dyn: Any, module: nn.Module) -> tuple[Callable[[Sequence[str], int], nn.Module], list[str]]:
        lm = ctx.model
        group = ctx.target.int4_group_size
        layers = _linear_layers(lm.module)
        fits = [n for n, m in layers.items() if m.in_features % group == 0]
        if not fits:
            raise UnsupportedRecipeError(
                f"pte/int4-weight: none of the {len(layers)} linear layers of {lm.name} has in_features divisible by "
                f"the group size {group} (target {ctx.target.name}); use int8-dynamic, or a profile with a smaller "
                "int4_group_size")
        quant.update(weights=f"int4 symmetric, group {group}", activations="int8 asymmetric per-token, dynamic",
                     quantizer="torchao Int8DynamicActivationIntxWeightConfig (8da4w)")
        by_shape = sorted(set(layers) - set(fits))
        if by_shape:
            quant["int8_weights_by_shape"] = by_shape
        return (lambda kept, emb: _8da4w(module, fits, kept, group, emb, args, dyn)), list(layers)

    support: ClassVar[tuple[RecipeSupport, ...]] = (
        PteRecipe(Recipe.FP32, "torch.export + XNNPACK delegate, dynamic sequence (batch 1)"),
        PteRecipe(Recipe.INT8_DYNAMIC, "PT2E XNNPACKQuantizer per-channel int8, dynamic activations, int8 embeddings",
                  make=_pt2e_quantizer),
        PteRecipe(Recipe.INT8_STATIC, "PT2E int8 linear/conv calibrated on your data, sensitive layers int8 dynamic",
                  True, make=_pt2e_quantizer, higher="int8 dynamic activations"),
        PteRecipe(Recipe.INT4_WEIGHT, "torchao 8da4w (int8 dyn. act., 4-bit grouped weights), sensitive layers 8-bit",
                  make=_int4_quantizer, higher="int8 weights"),
    )

    def _fallbacks(self, ctx: ExportContext) -> list[dict[str, Any]]:
        out = []
        for r in ctx.target.preferred_backends("pte"):
            probe = _UNAVAILABLE.get(r.backend.lower())
            reason = probe() if probe else f"edgeship lowers .pte to XNNPACK only; no lowering for '{r.backend}'"
            out.append({"wanted": r.backend, "used": "xnnpack", "reason": reason, "route_note": r.note,
                        "installable_here": r.installable_here})
        return out


# ---- capture -------------------------------------------------------------------------------------
BMM_ATTENTION = "edgeship_xnnpack_bmm"  # name registered in transformers' AttentionInterface


def _bmm_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                   **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """Eager attention written on 3-D ``bmm`` with batch and heads merged (batch 1, as the ``.pte`` is exported).

    transformers' eager attention multiplies 4-D tensors; ``to_edge`` turns each ``matmul`` into view -> bmm ->
    view, and the view of the [1, heads, seq, seq] scores has two symbolic sizes, which XNNPACK cannot reshape:
    every layer's softmax became its own delegate blob between two portable views. Here the scores stay
    [heads, seq, seq] from the first bmm to the second, and every view has one symbolic size. Anything this
    plain form does not cover (grouped key/value heads, a sliding window, soft-capping or any other extra argument
    a model family passes) runs the family's own eager function instead.
    """
    import torch

    b, h, s, d = query.shape
    if key.shape[1] != h or value.shape[1] != h or any(v is not None for v in kwargs.values()):
        return _family_eager(module)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                     **kwargs)
    scale = float(scaling if scaling is not None else d ** -0.5)
    q, k, v = (t.reshape(b * h, -1, d) for t in (query, key, value))
    w = torch.bmm(q, k.transpose(1, 2)) * scale
    if attention_mask is not None:  # [b, 1 or h, 1 or seq, seq]
        w = w + attention_mask.view(attention_mask.shape[1:]) if b == 1 else \
            (w.view(b, h, s, -1) + attention_mask).view(b * h, s, -1)
    w = torch.nn.functional.softmax(w, dim=-1)
    if dropout and module.training:
        w = torch.nn.functional.dropout(w, p=dropout)
    return torch.bmm(w, v).view(b, h, s, d).transpose(1, 2).contiguous(), None


def _family_eager(module: nn.Module) -> Any:
    """The ``eager_attention_forward`` of the module's own modeling file (BERT's when it has none)."""
    import sys

    from transformers.models.bert.modeling_bert import eager_attention_forward

    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", eager_attention_forward)


def xnnpack_attention(module: nn.Module) -> int:
    """Switch the (copied) model's transformers eager attention to :func:`_bmm_attention`; how many configs."""
    from transformers import PretrainedConfig
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(BMM_ATTENTION, _bmm_attention)
    configs = {id(c): c for m in module.modules() if isinstance(c := getattr(m, "config", None), PretrainedConfig)}
    n = 0
    for c in configs.values():
        if getattr(c, "_attn_implementation", None) == "eager":
            c._attn_implementation = BMM_ATTENTION
            n += 1
    return n


def _captured(ctx: ExportContext, args: tuple[torch.Tensor, ...]) -> tuple[nn.Module, int, Any, dict[str, Any]]:
    """(module with XNNPACK-friendly norms, norms rewritten, torch.export program, shapes info), captured once per
    export and shared by its recipes: the capture does not depend on the recipe (2-3 s of MiniLM's each time)."""
    import torch

    key = ("pte", "capture")
    if key not in ctx.shared:
        module, swapped = rewrite_layer_norms(ctx.model.module, mean="linear")
        if module is ctx.model.module:
            module = copy.deepcopy(module)  # the attention switch below edits the model's config
        attention = xnnpack_attention(module)
        with ctx.stage(Stage.CAPTURE), torch.no_grad():
            ep, shapes_info = _capture(module, args, ctx.model)
        shapes_info["attention"] = (f"{BMM_ATTENTION}: 3-D bmm with heads merged ({attention} model config(s)), so "
                                    "XNNPACK keeps each layer's softmax in the delegate") if attention else "as loaded"
        ctx.shared[key] = (module, swapped, ep, shapes_info)
    else:
        ctx.log(f"[pte/{ctx.recipe}] capture: reusing this export's torch.export program")
    return ctx.shared[key]  # type: ignore[no-any-return]


def _capture(module: nn.Module, args: tuple[torch.Tensor, ...], lm: Any) -> tuple[Any, dict[str, Any]]:
    """torch.export with a bounded dynamic sequence if the model allows it, else static; says which and why."""
    import torch

    seq = lm.dims.get("sequence")
    info: dict[str, Any] = {"batch": 1, "batch_note": "static: ExecuTorch plans memory for the upper bound of "
                                                      "every dynamic dim; mobile inference is batch 1"}
    if seq is not None:
        lo, hi = max(2, int(seq.get("min", 2))), int(seq.get("max", 512))
        try:
            ep = torch.export.export(module, args, dynamic_shapes=_dynamic_shapes(lm, {"sequence": [lo, hi]}),
                                     strict=False)
            info["sequence"] = {"dynamic": True, "min": lo, "max": hi}
            return ep, info
        except Exception as e:  # constraint violations: the model specialises the length; static still works
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            info["sequence"] = {"dynamic": False, "length": int(args[0].shape[1]),
                                "why_static": f"torch.export could not keep it dynamic: {first}"}
    ep = torch.export.export(module, args, strict=False)
    info.setdefault("static_shapes", {s.name: list(a.shape) for s, a in zip(lm.inputs, args, strict=True)})
    return ep, info


def _dynamic_shapes(lm: Any, info: dict[str, Any]) -> tuple[dict[int, Any], ...] | None:
    import torch

    s = info.get("sequence")
    if isinstance(s, dict):
        if not s.get("dynamic"):
            return None
        s = [s["min"], s["max"]]
    if not s:
        return None
    dim = torch.export.Dim("sequence", min=int(s[0]), max=int(s[1]))
    return tuple({i: dim for i, d in enumerate(spec.shape) if d == "sequence"} for spec in lm.inputs)


def _io_description(lm: Any, info: dict[str, Any]) -> dict[str, Any]:
    seq = info.get("sequence") or {}

    def shape(spec: Any) -> list[int | str]:
        out: list[int | str] = []
        for d in spec.shape:
            if d == "sequence" and seq.get("dynamic"):
                out.append("sequence")
            elif d == "sequence":
                out.append(int(seq.get("length", 1)))
            elif isinstance(d, str):
                out.append(1)  # batch and other named dims are fixed at their example value (1)
            else:
                out.append(int(d))
        return out

    return {"input_names": [s.name for s in lm.inputs], "input_dtypes": [s.dtype for s in lm.inputs],
            "input_shapes": [shape(s) for s in lm.inputs], "output_names": [s.name for s in lm.outputs],
            "dims": {"sequence": [seq["min"], seq["max"]]} if seq.get("dynamic") else {}}


# ---- lowering ------------------------------------------------------------------------------------
def _lower(ep: Any, out: Path, io: dict[str, Any], example_shapes: dict[str, list[int]]) -> dict[str, Any]:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

    from edgeship.exporters import pte_delegation

    part = XnnpackPartitioner()
    with pte_delegation.capture_rejections() as why:
        edge = to_edge_transform_and_lower(ep, transform_passes=[_drop_noop_expands, _infer_symbolic_views], partitioner=[part],
                                           constant_methods={IO_METHOD: json.dumps(io)})
    # quant fusion turns dequantize + embedding into the int8 embedding_byte kernel
    prog = edge.to_executorch(ExecutorchBackendConfig(do_quant_fusion_and_const_prop=True))
    rep = pte_delegation.report(prog, pte_delegation.supported_targets(part), why.reasons, DELEGATE, example_shapes)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:  # a search attempt, or the bundle's staging directory (published atomically)
        prog.write_to_file(f)
    return {"summary": rep.summary(), **rep.to_dict()}  # summary first: `edgeship inspect` truncates long reports


def _drop_noop_expands(gm: torch.fx.GraphModule) -> Any:
    """Remove ``expand_copy`` nodes whose output shape equals their input shape.

    ``torch.matmul`` on 4-D attention tensors decomposes into expand + view + bmm; the
    expand is a no-op copy there, XNNPACK has no partition for it, and each one splits the
    graph and copies the tensor on a portable kernel (24 per MiniLM inference).
    """
    from torch.fx.passes.infra.pass_base import PassResult

    from edgeship.exporters.pte_delegation import op_name

    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not op_name(node).startswith("expand_copy"):
            continue
        src = node.args[0]
        a, b = src.meta.get("val"), node.meta.get("val")
        if a is None or b is None or a.dtype != b.dtype or [str(d) for d in a.shape] != [str(d) for d in b.shape]:
            continue
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.recompile()
    return PassResult(gm, changed)


def _infer_symbolic_views(gm: torch.fx.GraphModule) -> Any:
    """Write a view's one symbolic size as ``-1`` (inferred), so that XNNPACK takes the reshape.

    With a dynamic sequence dim every ``view_copy`` of attention (heads split and merged) carries the
    sequence length as a SymInt node; XNNPACK's partitioner refuses symbolic reshape sizes but accepts one
    inferred dim, so each such view cut the graph into another delegate blob (39 for MiniLM), and the lowering ran
    XNNPACK's passes once per blob. A view with exactly one non-constant size has the same result with that size
    inferred from the element count.
    """
    import torch
    from torch.fx.passes.infra.pass_base import PassResult

    from edgeship.exporters.pte_delegation import op_name

    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function" or op_name(node) != "view_copy.default" or "val" not in node.meta:
            continue
        shape = node.meta["val"].shape
        symbolic = [i for i, d in enumerate(shape) if not isinstance(d, int)]
        if len(symbolic) != 1 or all(isinstance(d, int) for d in node.args[1]):
            continue
        old = [a for a in node.args[1] if isinstance(a, torch.fx.Node)]
        node.args = (node.args[0], [-1 if i == symbolic[0] else int(d) for i, d in enumerate(shape)], *node.args[2:])
        for a in old:  # the sym_size nodes only this view read; nothing else is touched
            if not a.users and "sym_size" in str(a.target):
                gm.graph.erase_node(a)
        changed = True
    if changed:
        gm.recompile()
    return PassResult(gm, changed)


def _version() -> str:
    from executorch.version import __version__

    return str(__version__)


def _linear_layers(module: nn.Module) -> dict[str, nn.Linear]:
    from torch import nn

    return {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear)}


#: an embedding table under this share of the model's parameters stays float: each lookup on ExecuTorch's portable
#: int8 kernel (``embedding_byte``, dequantizing row by row) costs as much as the big table's, and quantizing it saves
#: under 1% of the file. MiniLM: position and token-type tables float, 2.82 -> 2.69 ms at 128 tokens, +0.6 MB.
INT8_EMBEDDING_MIN_SHARE = 0.01


def _int8_tables(module: nn.Module) -> dict[str, int]:
    """The embedding tables worth int8 (name -> number of values), largest first."""
    from torch import nn

    total = sum(p.numel() for p in module.parameters())
    tables = {n: m.weight.numel() for n, m in module.named_modules() if isinstance(m, nn.Embedding)}
    return dict(sorted(((n, k) for n, k in tables.items() if k >= INT8_EMBEDDING_MIN_SHARE * total),
                       key=lambda t: -t[1]))


def _embedding_quantizer(min_values: int) -> Any:
    """torchao's EmbeddingQuantizer (int8 per row) for tables of at least ``min_values`` values only."""
    import torch
    from torchao.quantization.pt2e.quantizer.embedding_quantizer import EmbeddingQuantizer
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    class _Large(EmbeddingQuantizer):
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            super().annotate(model)
            for node in model.graph.nodes:
                w = node.args[0].meta.get("val") if node.target == torch.ops.aten.embedding.default else None
                if w is not None and w.numel() < min_values:
                    node.meta.pop(Q_ANNOTATION_KEY, None)
            return model

    return _Large()


def _embeddings_record(module: nn.Module, tables: dict[str, int]) -> str:
    from torch import nn

    small = [n for n, m in module.named_modules() if isinstance(m, nn.Embedding) and n not in tables]
    return ("int8 per-row (quantized_decomposed::embedding_byte, portable kernel): " + ", ".join(tables)
            + (f"; float: {', '.join(small)} (under {INT8_EMBEDDING_MIN_SHARE:.0%} of the parameters each: a lookup "
               "on the portable int8 kernel costs as much as the big table's and saves little)" if small else ""))


def _module_path(node: Any) -> str:
    where = module_of(node)
    return where[0] if where else ""


def _pt2e(ep: Any, layers: Sequence[str], kept: Sequence[str], static: bool, emb: int,
          calib: Sequence[tuple[torch.Tensor, ...]]) -> nn.Module:
    """PT2E int8 on a fresh copy of the captured graph. ``kept`` layers take int8 activations quantized per
    inference (dynamic) in a static recipe, and stay float in a dynamic one. ``emb``: int8 embedding tables of at
    least this many values (0: none)."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import ComposableQuantizer

    def linears(names: set[str], dynamic: bool) -> XNNPACKQuantizer:
        q = XNNPACKQuantizer()
        q.set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic))
        # only the weight layers are quantized: int8 adds/muls/softmax inputs ruin transformer accuracy
        q.set_filter_function(lambda n: _module_path(n) in names)
        return q

    parts: list[Any] = [_embedding_quantizer(emb)] if emb else []
    parts.append(linears(set(layers) - set(kept), dynamic=not static))
    if static and kept:
        parts.append(linears(set(kept) & set(layers), dynamic=True))
    with torch.no_grad():
        prepared = prepare_pt2e(integer_scalars_as_scalar_ops(copy.deepcopy(ep).module()), ComposableQuantizer(parts))
        for a in calib:
            prepared(*a)
        converted = convert_pt2e(prepared)
    return converted  # type: ignore[no-any-return]


def integer_scalars_as_scalar_ops(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Turn ``add.Tensor(int_tensor, 2)`` / ``mul.Tensor(int_tensor, 2)`` into their ``.Scalar`` overloads.

    XNNPACKQuantizer's ``transform_for_annotation`` replaces every Python-number argument of
    ``add.Tensor``/``mul.Tensor`` with a float32 tensor constant, whatever the other operand's
    dtype, and it does so before (and regardless of) the quantizer's filter. Integer arithmetic
    then turns float: RoBERTa's position ids (``cumsum(mask) + past_len``, ``.long() + padding_idx``)
    reach the position embedding as floats and the first calibration run fails with "Tensor dtype
    mismatch! Expected: Int, Got: float" (BERT/DistilBERT/ViT have no integer scalar arithmetic).
    The ``.Scalar`` overloads are the same computation, outside that transform's reach.
    """
    import torch

    swap = {torch.ops.aten.add.Tensor: torch.ops.aten.add.Scalar, torch.ops.aten.mul.Tensor: torch.ops.aten.mul.Scalar}
    changed = False
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op != "call_function" or node.target not in swap or val is None or val.dtype.is_floating_point:
            continue
        if len(node.args) == 2 and isinstance(node.args[0], torch.fx.Node) and isinstance(node.args[1], (int, bool)):
            node.target = swap[node.target]
            changed = True
    if changed:
        gm.recompile()
    return gm


def _8da4w(module: nn.Module, fits: Sequence[str], kept: Sequence[str], group: int, emb: int,
           args: tuple[torch.Tensor, ...], dyn: Any) -> nn.Module:
    """torchao 8da4w on a copy of ``module``; ``kept`` and odd-shaped layers get 8-bit weights (8da8w)."""
    import torch
    from torch import nn
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    four = set(fits) - set(kept)
    m = copy.deepcopy(module)
    with torch.no_grad():
        int4 = torch.int4  # type: ignore[attr-defined]  # torch's stubs lack the sub-byte dtypes
        quantize_(m, Int8DynamicActivationIntxWeightConfig(weight_dtype=int4, weight_granularity=PerGroup(group)),
                  filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear) and fqn in four)
        quantize_(m, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)),
                  filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear) and fqn not in four)
        if not emb:
            return m
        # int8 embeddings through PT2E on the exported graph (torchao's subclass weights are unwrapped by export)
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        gm = torch.export.export(m, args, dynamic_shapes=dyn, strict=False).module()
        prepared = prepare_pt2e(gm, _embedding_quantizer(emb))
        prepared(*args)
        return convert_pt2e(prepared)  # type: ignore[no-any-return]


def _last_one(make: Callable[[Sequence[str], bool], nn.Module]) -> Callable[[Sequence[str], bool], nn.Module]:
    """``make`` remembering its last result: the search scores a choice on the quantized PyTorch graph and then
    builds the artifact from the same choice (int8-dynamic on MiniLM: the same PT2E prepare/calibrate/convert ran
    twice). Only the last one is kept: each quantized copy holds the model's weights."""
    last: list[tuple[tuple[tuple[str, ...], bool], nn.Module]] = []

    def cached(kept: Sequence[str], emb: bool) -> nn.Module:
        key = (tuple(kept), bool(emb))
        if not last or last[0][0] != key:
            last[:] = [(key, make(kept, emb))]
        return last[0][1]

    return cached


# ---- search over layers kept in higher precision ------------------------------------------------------
def _searched(ctx: ExportContext, make: Callable[[Sequence[str], bool], nn.Module],
              lower: Callable[[nn.Module, Path], dict[str, Any]], out: Path, has_emb: bool,
              candidates: Sequence[str], higher: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Quantize every layer except the fewest most-sensitive ones needed to meet the floor.

    Scored first on the quantized PyTorch graph (a forward pass, cheap), then confirmed on real
    lowered artifacts. Int8 embeddings are the optional extra: dropped when they cost the accuracy.
    """
    from edgeship.exporters.sensitivity import KeepSearch, keep_search
    from edgeship.fidelity import compare

    lm = ctx.model
    out_name = lm.outputs[0].name
    refs = [r[out_name] for r in ctx.reference]

    def proxy(kept: Sequence[str], fallback: bool) -> Fidelity:
        import torch

        module = make(kept, has_emb and not fallback)
        got = []
        with torch.no_grad():
            for f in ctx.heldout:
                res = module(*lm.torch_args(f))
                got.append((res[0] if isinstance(res, (tuple, list)) else res).detach().float().numpy())
        return compare(refs, got, out_name, ctx.floor(ctx.recipe), classifier=lm.classifier)

    res = keep_search(ctx, KeepSearch(
        candidates, lambda kept, fallback, path: lower(make(kept, has_emb and not fallback), path),
        PteExporter.suffix, "executorch", proxy=proxy, fallback="embeddings" if has_emb else None,
        fallback_what="int8 embeddings", max_builds=MAX_REAL_BUILDS, rank_first=False, higher=higher))
    res.artifact.replace(out)
    return res.built, res.record


__all__ = ["IO_METHOD", "PteExporter"]
