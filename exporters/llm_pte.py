"""Decoder LLMs to an ExecuTorch ``.pte``: one ``forward(tokens, input_pos)`` method with its KV cache inside.

Any Hugging Face ``*ForCausalLM`` whose attention goes through transformers' attention interface (Llama,
Qwen2/Qwen3, Gemma 3 text, Phi-3 ...) is exported as it is, without re-authoring the model:

* the KV cache is a static buffer per layer, ``[1, max_context, kv_heads, head_dim]``, owned by the program
  (mutable buffers), written by ExecuTorch's ``llama::update_cache`` kernel at ``input_pos``;
* attention is ExecuTorch's ``llama::custom_sdpa`` (causal from ``input_pos``; grouped-query heads handled
  inside the kernel), so a decode step attends only to the filled part of the cache instead of masking all of
  ``max_context`` as a plain static-cache export does;
* the token count of a call is dynamic (1 .. ``max_prefill``): the same method prefills a prompt in one call
  and decodes one token per call, and only the last position's logits are computed (``logits_to_keep=1``),
  which spares the vocab-sized projection on every prompt token.

That is the signature ExecuTorch's own LLM runner expects (``forward(tokens[1, T], input_pos[1]) -> logits``)
and the program carries the runner's metadata methods (``get_max_seq_len``, ``get_vocab_size``,
``use_kv_cache``, ``enable_dynamic_shape``, ...), so the file also runs in the C++ ``llama_main`` on a phone.

Recipes (the table :data:`PLANS` drives the dispatch):

* ``fp32``: float weights, XNNPACK fp32 kernels.
* ``int8-dynamic``: torchao ``Int8DynamicActivationIntxWeightConfig`` with int8 per-channel weights (8da8w).
* ``int4-weight``: 4-bit weights in blocks of ``group_size`` along the input (8da4w), each block's offset kept
  exact by two small extra linears (:func:`offset_int4`: SmolLM2 top-1 0.605 -> see the README); the output head
  and a layer whose input width is not a multiple of the group keep 8-bit weights (reported).

Before quantizing, each layer's q/k/v and gate/up projections, which read one tensor, are fused into one linear
per group (:func:`fuse_projections`: 4 linears per layer instead of 7, the same math).

``int8-dynamic`` first rotates the hidden states of Llama/Mistral/Qwen2/Qwen3 models (:mod:`llm_rotate`: SmolLM2
top-1 0.910 -> 0.949, KL 0.023 -> 0.0068, and its France answer back). Both quantized recipes store the token
embedding as int8 per row (torchao ``IntxWeightOnlyConfig``), which ExecuTorch
fuses into its ``embedding`` kernel for quantized tables. Tied input/output embeddings are untied first so that each
copy gets the scheme its op needs.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from edgeship.errors import ExportError, UnsupportedRecipeError
from edgeship.exporters.base import Stage
from edgeship.exporters.llm_base import (
    LLM_EXPORTERS,
    LLMExportRequest,
    LLMExportResult,
    kv_cache_bytes_per_token,
)
from edgeship.exporters.llm_rotate import rotated, untie_output_embedding
from edgeship.vocab import LLM_RECIPES

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

ENTRY = "model.pte"
METHOD = "forward"
META_METHOD = "edgeship_llm"  # constant method: the runtime dict as JSON, so a bare .pte describes itself
ATTENTION = "edgeship_executorch_sdpa"  # name registered in transformers' AttentionInterface
DEFAULT_MAX_PREFILL = 512  # tokens per call; ExecuTorch plans activation memory for this upper bound
CALIBRATION_TOKENS = 256  # random token ids that find them (input_ranges)


@dataclass(frozen=True)
class Plan:
    """What one recipe does to the model: linear weight bits (None = float), embedding bits, and a description."""

    linear_bits: int | None
    embedding_bits: int | None
    summary: str
    rotate: bool = False  # rotate the hidden states first (llm_rotate): int8 activations lose less to outliers


PLANS: dict[str, Plan] = {
    "fp32": Plan(None, None, "float32 weights and activations, XNNPACK fp32 kernels"),
    "int8-dynamic": Plan(8, 8, "8-bit dynamic per-token activations, int8 per-channel weights (8da8w), int8 embeddings",
                         rotate=True),
    # not rotated: on SmolLM2 (a 4-bit GGUF) rotating moved the weights off their 4-bit grid, top-1 0.605 -> 0.516
    "int4-weight": Plan(4, 8, "8-bit dynamic per-token activations, 4-bit block-wise weights with exact per-block "
                              "offsets (8da4w), int8 head and embeddings"),
}


@LLM_EXPORTERS.register("pte")
def export_pte(req: LLMExportRequest) -> LLMExportResult:
    plan = PLANS.get(req.recipe)
    if plan is None or req.recipe not in LLM_RECIPES:
        raise UnsupportedRecipeError(f"pte: no LLM recipe '{req.recipe}' (it offers: {', '.join(PLANS)})")
    config = req.model.config
    _check_shape(req, config)
    max_prefill = int(req.options.get("max_prefill", min(req.max_context, DEFAULT_MAX_PREFILL)))
    if not 1 <= max_prefill <= req.max_context:
        raise ExportError(f"pte: max_prefill {max_prefill} must be between 1 and max_context {req.max_context}")
    with req.stage(Stage.PREPARE):
        model, rotation = _prepared(req, plan)
        count = req.options.get("outliers", 0)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ExportError(f"pte: option outliers must be a whole number of channels >= 0 (got {count!r})")
        fused = fuse_projections(model)
        outliers = outlier_channels(model, count) if plan.linear_bits == 4 and count else None
        module = static_cache_lm(_without_padding_idx(model), req.max_context)
    with req.stage(Stage.QUANTIZE):
        quant = quantize(module.model, req.recipe, req.group_size, outliers)
    if rotation is not None:
        quant["rotation"] = rotation
    quant["fused_projections"] = fused
    runtime = _runtime_entry(req, config, max_prefill)
    with req.stage(Stage.CAPTURE):
        program = _capture(module, max_prefill)
    with req.stage(Stage.LOWER):
        lowered = _lower(program, _metadata_methods(req, config, runtime))
    req.out.mkdir(parents=True, exist_ok=True)
    with req.stage(Stage.SERIALIZE):
        _write(lowered, req.out / ENTRY)
    runtime["delegation"] = _delegation(lowered)
    warnings = []
    if quant.get("int8_weights_by_shape"):
        warnings.append(f"{len(quant['int8_weights_by_shape'])} linear layer(s) kept 8-bit weights: input width not "
                        f"a multiple of group size {req.group_size}")
    return LLMExportResult(files=[Path(ENTRY)], runtime=runtime, quantization=quant,
                           kv_cache_bytes_per_token=kv_cache_bytes_per_token(config, 4), tool=_tools(),
                           warnings=warnings)


def _prepared(req: LLMExportRequest, plan: Plan) -> tuple[Any, dict[str, Any] | None]:
    """Our own copy of the model (its config is changed later), rotated where the plan says so and the option
    ``rotate`` (default True) does not turn it off; and the record of the rotation (None: the plan has none)."""
    rotate = req.options.get("rotate", True)
    if not isinstance(rotate, bool):
        raise ExportError(f"pte: option rotate must be true or false (got {rotate!r})")
    if not plan.rotate:
        return copy.deepcopy(req.model).eval(), None
    if not rotate:
        return copy.deepcopy(req.model).eval(), {"applied": False, "why": "turned off (option rotate=False)"}
    model, record = rotated(req.model)
    if model is None:
        log.warning("pte/%s: not rotated: %s", req.recipe, record["why"])
        model = copy.deepcopy(req.model).eval()
    return model, record


def _check_shape(req: LLMExportRequest, config: Any) -> None:
    """Refuse models this export would get wrong, before minutes of work."""
    if req.max_context < 2:
        raise ExportError(f"pte: max_context must be at least 2 (got {req.max_context})")
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or []
    if window and "sliding_attention" in types and req.max_context > int(window):
        raise UnsupportedRecipeError(
            f"pte: {type(req.model).__name__} has sliding-window layers (window {window}) and the .pte cache attends "
            f"to the whole context; re-export with --max-context {window} or less")
    if getattr(config, "attn_logit_softcapping", None):
        raise UnsupportedRecipeError("pte: attention logit soft-capping (Gemma 2) is not supported by ExecuTorch's "
                                     "custom SDPA kernel; use --format onnx or tflite for this model")


def _without_padding_idx(model: Any) -> Any:
    """Drop ``padding_idx`` from the embeddings (it only masks gradients): ExecuTorch's quant fusion matches
    ``embedding(weight, ids)`` without it, and an unfused int8 table fails to lower (``Missing out variants:
    torchao::dequantize_affine``, seen on SmolLM2 whose pad id is 2)."""
    from torch import nn

    for m in model.modules():
        if isinstance(m, nn.Embedding):
            m.padding_idx = None
    return model


# ---- the exportable module ----------------------------------------------------------------------------------
class _Position:
    """The start position of the current call, shared by the cache layers and the attention function.

    Set once per forward from ``input_pos`` (one ``.item()`` -> one symbolic int in the exported graph).
    """

    value: Any = 0


def _layer_class() -> type:
    from transformers.cache_utils import StaticLayer

    class EtCacheLayer(StaticLayer):  # type: ignore[misc]
        """A static layer in ExecuTorch's ``[batch, seq, heads, dim]`` layout, written by ``llama::update_cache``."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, pos: _Position) -> None:
            super().__init__(int(keys.shape[1]))
            self.keys, self.values, self.pos = keys, values, pos  # StaticLayer's own methods read keys/values
            self.k_buf, self.v_buf = keys, values
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            import torch

            # HF hands [batch, heads, seq, dim]; the cache and custom_sdpa use [batch, seq, heads, dim]
            torch.ops.llama.update_cache(key_states.transpose(1, 2), self.k_buf, self.pos.value)
            torch.ops.llama.update_cache(value_states.transpose(1, 2), self.v_buf, self.pos.value)
            return self.k_buf, self.v_buf

    return EtCacheLayer


def _custom_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: Any, scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: ExecuTorch's causal SDPA over the cache filled up to ``start``.

    ``key``/``value`` are the whole cache as :class:`EtCacheLayer` returns it; the kernel reads only positions
    ``< start + seq``, so stale entries after a reset never leak in. Output is ``[batch, seq, heads, dim]``, the
    layout HF's attention modules expect back.
    """
    import torch

    start = cast(Any, module)._edgeship_pos.value
    out = torch.ops.llama.custom_sdpa(query.transpose(1, 2), key, value, start, None, 0.0, True, scaling)
    return out, None


def _register_attention() -> None:
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  # defines llama::update_cache & co.
    from transformers.modeling_utils import AttentionInterface

    # deliberately absent from the mask interface: transformers then builds no mask (the kernel is causal itself)
    AttentionInterface.register(ATTENTION, _custom_sdpa)


def _static_cache_lm() -> type:
    import torch
    from torch import nn

    class _StaticCacheLM(nn.Module):
        """``forward(tokens [1, T] int64, input_pos [1] int64) -> logits [1, vocab]`` of the last token."""

        def __init__(self, model: Any, max_context: int) -> None:
            super().__init__()
            _register_attention()
            from transformers.cache_utils import Cache

            self.model = model
            self.max_context = max_context
            # transformers 5 renamed past_key_values to cache (the old name warns until 5.40)
            self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
            config: Any = model.config
            heads = int(config.num_attention_heads)
            kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
            head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
            self.pos = _Position()
            layer_cls = _layer_class()
            layers = []
            for i in range(int(config.num_hidden_layers)):
                for kind in ("k", "v"):  # buffers on the module: torch.export keeps them as mutable state
                    self.register_buffer(f"{kind}_cache_{i}", torch.zeros(1, max_context, kv_heads, head_dim),
                                         persistent=False)
                layers.append(layer_cls(getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}"), self.pos))
            self.cache = Cache(layers=layers)
            config._attn_implementation = ATTENTION  # the model is our own deep copy
            for m in model.modules():
                if hasattr(m, "is_causal") and hasattr(m, "layer_idx"):  # the attention modules
                    cast(Any, m)._edgeship_pos = self.pos

        def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
            start = input_pos[0].item()
            torch._check(start >= 0)
            torch._check(start < self.max_context)
            self.pos.value = start
            positions = (torch.arange(tokens.shape[1]) + input_pos[0]).unsqueeze(0)
            out = self.model(input_ids=tokens, position_ids=positions, use_cache=True, logits_to_keep=1,
                             **{self.cache_arg: self.cache})
            return out.logits[:, -1, :]  # type: ignore[no-any-return]

    return _StaticCacheLM


# ---- fuse the projections that read one input ----------------------------------------------------------------
#: member attribute names in HF decoder layers -> the fused module's name (Phi-3's own names for its fused ones)
FUSED_GROUPS = {("q_proj", "k_proj", "v_proj"): "qkv_proj", ("gate_proj", "up_proj"): "gate_up_proj"}


def fuse_projections(model: nn.Module) -> dict[str, int]:
    """Fuse each decoder layer's q/k/v and gate/up projections into one linear per group, in place; return how
    many groups of each kind were fused.

    The members of a group read the same tensor, so one linear with their weights stacked computes all of them
    (and its outputs are the members' outputs side by side): per layer 4 linears run instead of 7, which on a
    small model's decode step, where each XNNPACK op costs a few microseconds whatever its size, is time saved
    (SmolLM2 decode: see the README). The math is unchanged: int8 and int4 weights are quantized per output row,
    activations per token row, so the fused linear quantizes exactly as its members did.

    Each member is replaced by a view of the group (:func:`_shared_linear`); the group runs its linear once per
    input tensor and hands each member its columns. A model that calls the members on different tensors still
    gets the right answer (the group recomputes). Groups whose members differ in input width or bias presence, or
    are not plain ``nn.Linear``, are left alone (Phi-3 ships its projections fused already)."""
    import torch
    from torch import nn

    fused = {"+".join(names): 0 for names in FUSED_GROUPS}
    for parent in list(model.modules()):
        for names, fused_name in FUSED_GROUPS.items():
            parts = [getattr(parent, n, None) for n in names]
            if not all(type(p) is nn.Linear for p in parts) or hasattr(parent, fused_name):
                continue
            linears = cast(list[nn.Linear], parts)
            if len({p.in_features for p in linears}) != 1 or len({p.bias is None for p in linears}) != 1:
                continue
            one = nn.Linear(linears[0].in_features, sum(p.out_features for p in linears),
                            bias=linears[0].bias is not None)
            one.weight = nn.Parameter(torch.cat([p.weight.detach() for p in linears]), requires_grad=False)
            if one.bias is not None:
                one.bias = nn.Parameter(torch.cat([cast(torch.Tensor, p.bias).detach() for p in linears]),
                                        requires_grad=False)
            group = _shared_linear()(one, len(linears))
            setattr(parent, fused_name, group)
            start = 0
            for name, p in zip(names, linears, strict=True):
                setattr(parent, name, _member()(group, start, start + p.out_features))
                start += p.out_features
            fused["+".join(names)] += 1
    return fused


@functools.cache
def _shared_linear() -> type:
    import weakref

    from torch import nn

    class SharedLinear(nn.Module):
        """One linear whose output several members read: computed once per input tensor, kept until each member
        has taken its columns (so neither a stale tensor nor a trace's fake tensor outlives the forward)."""

        def __init__(self, linear: nn.Linear, members: int) -> None:
            super().__init__()
            self.linear, self.members = linear, members
            self._clear()

        def _clear(self) -> None:
            self._input: Any = None  # a weak reference to the input of the cached output
            self._output: torch.Tensor | None = None
            self._taken = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self._output is None or self._input() is not x:
                self._clear()
                self._input, self._output = weakref.ref(x), self.linear(x)
            out = self._output
            self._taken += 1
            if self._taken >= self.members:
                self._clear()
            return out

    return SharedLinear


@functools.cache
def _member() -> type:
    from torch import nn

    class SharedMember(nn.Module):
        """Columns ``start:stop`` of a :func:`_shared_linear` group's output. The group is held outside the
        module tree, so it is quantized and exported once, under its own name."""

        def __init__(self, group: nn.Module, start: int, stop: int) -> None:
            super().__init__()
            self.start, self.stop = start, stop
            self.__dict__["group"] = group  # not a submodule: its parent owns it

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            group: nn.Module = self.__dict__["group"]
            return group(x)[..., self.start:self.stop]  # type: ignore[no-any-return]

        def extra_repr(self) -> str:
            return f"columns {self.start}:{self.stop} of a shared linear"

    return SharedMember


def static_cache_lm(model: nn.Module, max_context: int) -> Any:
    """Wrap a HF causal LM (our own copy: its config is changed) with a static ExecuTorch KV cache."""
    return _static_cache_lm()(model, max_context)


# ---- quantize -----------------------------------------------------------------------------------------------
def quantize(model: Any, recipe: str, group_size: int, outliers: dict[str, torch.Tensor] | None = None
             ) -> dict[str, Any]:
    """Apply the recipe's plan in place with torchao; return what was actually applied (per layer kind, counts).
    ``outliers`` (from :func:`outlier_channels`): per linear, the input channels that skip the int8 activations
    of a 4-bit linear (:func:`offset_int4`)."""
    plan = PLANS[recipe]
    if plan.linear_bits is None:
        return {"recipe": "fp32", "weights": "float32", "activations": "float32", "embeddings": "float32",
                "summary": PLANS["fp32"].summary}
    import torch
    from torch import nn
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis

    untie_output_embedding(model)  # each copy gets its own scheme: an int8 table and a quantized linear
    quant: dict[str, Any] = {"quantizer": "torchao quantize_", "activations": "int8 asymmetric per-token, dynamic"}
    if plan.embedding_bits:
        emb = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
        quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)),
                  filter_fn=lambda m, fqn: isinstance(m, nn.Embedding))
        quant["embeddings"] = f"int8 per-row ({len(emb)} table(s))"
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    rest = set(linears)
    if plan.linear_bits == 4:
        head = next((n for n, m in linears.items() if m is model.get_output_embeddings()), None)
        four = {n for n, m in linears.items() if m.in_features % group_size == 0 and n != head}
        for name in sorted(four):
            channels = (outliers or {}).get(name)
            offset_int4(model, name, group_size, channels)
            if channels is None:  # offsets only: the side path goes 8da8w too (measured: 194 tok/s, fp32 outliers 184)
                rest |= {f"{name}.select", f"{name}.side"}
        rest -= four
        quant.update(weights=f"int4 block-wise, group {group_size}, with an exact per-block offset", group_size=group_size,
                     int4_layers=len(four))
        if outliers:
            quant["outliers"] = (f"the {max(map(len, outliers.values()))} input channels of largest range per 4-bit "
                                 f"linear (calibrated on {CALIBRATION_TOKENS} random tokens) bypass the int8 "
                                 "activations in fp32")
        if head is not None:
            quant["head"] = "int8 per-channel (the most sensitive layer; GGUF files keep it 8-bit too)"
        if odd := sorted(set(linears) - four - {head}):
            quant["int8_weights_by_shape"] = odd
    else:
        quant["weights"] = "int8 symmetric per-channel"
    config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn in rest)
    quant["int8_layers"] = len(set(linears) & rest)
    quant["summary"] = plan.summary
    return quant


def input_ranges(model: Any, tokens: int = 0) -> dict[str, torch.Tensor]:
    """Each linear's largest |input| per channel over ``tokens`` random token ids (seed 0), in fp32: data-free, so
    no held-out text the fidelity check uses leaks in. The large channels of an LLM's hidden states are a property
    of the weights and show on random tokens too (SmolLM2: the outlier path calibrated on random tokens measured
    top-1 0.941 / KL 0.0090 in an eager simulation, on English text 0.953 / 0.0082)."""
    import torch
    from torch import nn

    tokens = tokens or min(CALIBRATION_TOKENS, int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30))
    ids = torch.randint(0, int(model.config.vocab_size), (1, tokens), generator=torch.Generator().manual_seed(0))
    ranges: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
            ranges[name] = torch.maximum(ranges[name], seen) if name in ranges else seen
        return record

    hooks = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return ranges


def outlier_channels(model: Any, count: int) -> dict[str, torch.Tensor]:
    """Each linear's ``count`` input channels of largest range (:func:`input_ranges`)."""
    return {name: r.topk(min(count, len(r))).indices for name, r in input_ranges(model).items()}


def offset_int4(model: Any, name: str, block: int, outliers: torch.Tensor | None = None) -> None:
    """Replace linear ``name`` by 4-bit blocks whose offsets are exact, and route its ``outliers`` input channels
    around the int8 activations.

    XNNPACK's 4-bit blocks are symmetric (``w = scale * q``, q in -8..7), so each block's midpoint is lost:
    most 4-bit checkpoints people ship (GGUF ``Q4_1``, GPTQ, AWQ) sit on an affine grid ``w = d * q + m``, and
    re-quantizing that symmetrically moves every weight (SmolLM2, a ``Q4_1`` GGUF: top-1 0.605). Here each block
    gets its min/max affine fit (exactly the ``Q4_1`` grid when the weights were on one); the grid part goes to
    the 4-bit kernel and the offset ``o`` [out, blocks] is added back as ``(S x) @ o.T``, ``S`` summing each block
    of the input. XNNPACK keeps block scales as bf16, so the offsets are fitted (least squares) to the rounded
    scales.

    The kernel quantizes each token's input row to int8 with one scale, which a few large channels take for
    themselves. With ``outliers`` (option ``outliers=N``) those channels are zeroed in the 4-bit path's input and
    their columns applied in fp32 instead, in the same side linear as the offsets: ``linear(x * mask) +
    side(select(x))`` where ``select`` stacks the block sums and the outlier channels. The side linears are 1/32
    (plus ``outliers``/in) of the main one's size; :func:`quantize` makes them 8da8w without outliers and keeps them
    fp32 with (int8 activations would quantize the outliers again). Measured on SmolLM2 (Pi 5 bundle, context 1024): without
    outliers top-1 0.922 / KL 0.019 at 194 tok/s (2 threads), 175 (1 thread); with 8, 0.949 / 0.0083 at 184 and
    142: the fp32 side matrices are 28 MB more to read per token, so the speed recipe keeps them off by default.
    """
    import torch
    from torch import nn
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
    )

    from edgeship.exporters.onnx_affine4 import block_sum_matrix, symmetric_grid

    lin = model.get_submodule(name)
    n, k = lin.weight.shape
    q, step, offset = (torch.from_numpy(a) for a in symmetric_grid(lin.weight.detach().float().numpy(), block))
    sym = (q * step[..., None]).view(n, k)
    lin.weight = nn.Parameter(IntxUnpackedToInt8Tensor.from_hp(
        sym, (1, block), torch.int4,  # type: ignore[attr-defined]
        activation_quantization="int8_asym_per_token", intx_choose_qparams_algorithm=None, custom_scale=step,
        custom_zero_point=torch.zeros_like(step, dtype=torch.int8)), requires_grad=False)
    idx = torch.zeros(0, dtype=torch.long) if outliers is None else outliers.sort().values
    rows = [torch.from_numpy(block_sum_matrix(k, block).T), (torch.arange(k) == idx[:, None]).float()]
    select = nn.Linear(k, k // block + len(idx), bias=False)
    select.weight = nn.Parameter(torch.cat(rows), requires_grad=False)
    side = nn.Linear(k // block + len(idx), n, bias=False)
    side.weight = nn.Parameter(torch.cat([offset, sym[:, idx]], 1), requires_grad=False)
    mask = torch.ones(k)
    mask[idx] = 0.0
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, _offset_linear()(lin, select, side, mask if len(idx) else None))


@functools.cache
def _offset_linear() -> type:
    from torch import nn

    class OffsetLinear(nn.Module):
        """``linear(x * mask) + side(select(x))``: a 4-bit linear, its block offsets and its outlier channels."""

        def __init__(self, linear: nn.Linear, select: nn.Linear, side: nn.Linear, mask: torch.Tensor | None) -> None:
            super().__init__()
            self.linear, self.select, self.side = linear, select, side
            self.register_buffer("mask", mask)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mask: torch.Tensor | None = self.mask  # type: ignore[assignment]  # a buffer
            main = self.linear(x if mask is None else x * mask)
            return main + self.side(self.select(x))  # type: ignore[no-any-return]

    return OffsetLinear


# ---- capture, lower, write ----------------------------------------------------------------------------------
def _capture(module: nn.Module, max_prefill: int) -> Any:
    """torch.export (strict: dynamo traces transformers' Python cleanly) with a dynamic token count 1..max_prefill."""
    import torch

    example = (torch.zeros((1, min(3, max_prefill)), dtype=torch.long), torch.tensor([0], dtype=torch.long))
    dims = None
    if max_prefill > 1:
        tokens = torch.export.Dim("tokens", min=1, max=max_prefill)
        dims = ({1: tokens}, None)
    else:
        example = (torch.zeros((1, 1), dtype=torch.long), example[1])
    with torch.no_grad():
        program = torch.export.export(module, example, dynamic_shapes=dims, strict=True)
    _check_custom_ops(program)
    return program


def _check_custom_ops(program: Any) -> None:
    """The export is only right if every attention went through the ExecuTorch kernels (a model whose attention
    bypasses transformers' attention interface would silently keep an uncached path)."""
    targets = [str(n.target) for n in program.graph_module.graph.nodes if n.op == "call_function"]
    sdpa = sum("custom_sdpa" in t for t in targets)
    updates = sum("update_cache" in t for t in targets)
    if sdpa == 0 or updates != 2 * sdpa:
        raise ExportError(f"pte: the model's attention did not route through ExecuTorch's custom SDPA ({sdpa} SDPA "
                          f"and {updates} cache-update ops); its architecture calls attention outside transformers' "
                          "attention interface, which this exporter needs")


def _lower(program: Any, constants: dict[str, Any]) -> Any:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    edge = to_edge_transform_and_lower(
        program, partitioner=[XnnpackPartitioner()], constant_methods=constants,
        # the custom ops are not core ATen; dim order is irrelevant for these contiguous tensors
        compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True))
    return edge.to_executorch(ExecutorchBackendConfig(
        extract_delegate_segments=True,
        do_quant_fusion_and_const_prop=True,  # fuses the int8 table + embedding into the quantized embedding kernel
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False)))  # inputs come from the caller


def _write(program: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        program.write_to_file(f)
    tmp.replace(path)


def _delegation(program: Any) -> dict[str, Any]:
    """Which ops XNNPACK took and which stayed on portable/custom kernels (counts by op), for the manifest."""
    from collections import Counter

    kept: Counter[str] = Counter()
    delegated = 0
    for node in program.exported_program().graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if name == "executorch_call_delegate":
            delegated += 1
        elif "." in name and not name.startswith(("getitem", "alloc", "view", "sym_size")):
            kept[name] += 1
    return {"xnnpack_blobs": delegated, "outside_delegate": dict(sorted(kept.items()))}


# ---- what travels with the file -----------------------------------------------------------------------------
def _runtime_entry(req: LLMExportRequest, config: Any, max_prefill: int) -> dict[str, Any]:
    return {
        "kind": "executorch-llm", "entry": ENTRY, "method": METHOD, "inputs": ["tokens", "input_pos"],
        "input_dtypes": ["int64", "int64"], "takes_input_pos": True, "logits": "last",
        "max_context": req.max_context, "max_prefill": max_prefill, "vocab_size": int(config.vocab_size),
        "kv_cache": {"kind": "static, in-program mutable buffers", "dtype": "float32",
                     "layout": "[1, max_context, kv_heads, head_dim] per layer, K and V",
                     "update": "llama::update_cache", "attention": "llama::custom_sdpa"},
        "delegates": ["XnnpackBackend"],
        "kernels": ["executorch.kernels.quantized", "executorch.extension.llm.custom_ops"],
        "recipe": req.recipe, "meta_method": META_METHOD,
    }


def _metadata_methods(req: LLMExportRequest, config: Any, runtime: dict[str, Any]) -> dict[str, Any]:
    """Constant methods: ExecuTorch's LLM runner keys (so ``llama_main`` can run the file) plus our own JSON."""
    gen = getattr(req.model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    bos = getattr(config, "bos_token_id", None)
    out: dict[str, Any] = {
        "get_max_seq_len": runtime["max_prefill"], "get_max_context_len": req.max_context,
        "get_vocab_size": int(config.vocab_size), "use_kv_cache": True, "use_sdpa_with_kv_cache": False,
        "enable_dynamic_shape": runtime["max_prefill"] > 1, "get_eos_ids": eos_ids,
        META_METHOD: json.dumps({k: v for k, v in runtime.items() if k != "meta_method"}),
    }
    if bos is not None:
        out["get_bos_id"] = int(bos)
    return out


def _tools() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("executorch", "torch", "torchao", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


__all__ = ["PLANS", "Plan", "export_pte", "fuse_projections", "quantize", "static_cache_lm"]
