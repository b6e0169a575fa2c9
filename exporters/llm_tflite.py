"""LiteRT exporter for decoder LLMs: litert-torch's generative layers -> multi-signature ``.tflite``.

The Hugging Face config is mapped onto litert-torch's re-authored decoder (``litert_torch.generative``: attention
with a KV cache kept as tensors, RoPE, RMSNorm, gated MLP), the safetensors are loaded into it by name, and one
``.tflite`` is written with these signatures (weights are shared between them):

* ``prefill_<L>`` for a few chunk lengths L: ``tokens`` int32 [1, L], ``input_pos`` int32 [L], ``last`` int32 [1]
  (index in the chunk of the last real token) and the KV cache -> ``logits`` float32 [1, vocab] of that token and
  the K/V entries of the L new positions. A shorter prompt is padded: the padded positions produce entries past
  the real ones, which no real query attends to (causal mask) and which the next tokens overwrite.
* ``prefill_<L>_<C>``: the same chunks over a short cache (:func:`short_prefill`: the shortest decode cache of at
  least 256 positions below ``max_context``), for prompts that start a conversation. The runtime hands every cache
  input to XNNPACK as a flat vector that it copies into a 4-D view in the signature's arena on each call, so a
  prefill over the full cache held a full-length copy (94 MB for SmolLM2 at 2048) for a 64-token prompt.
* ``decode`` (the cache at ``max_context``) and ``decode_<C>`` for shorter caches C (:func:`decode_contexts`:
  max_context / 8, / 4, / 2): ``tokens`` [1, 1], ``input_pos`` [1] and the KV cache -> ``logits`` [1, vocab] and
  the new entries. Attention reads every cache position it is given, used or not (masked), so at context 2048 a
  token early in the reply paid for 2048 positions; the runtime decodes with the shortest cache that holds the
  position, as llama.cpp attends over its used cells only.

The KV cache inputs are ``kv_cache_k_<i>`` and ``kv_cache_v_<i>`` per layer, each a flat float32 vector that the
graph views as K [1, kv_heads, C, head_dim] and V [1, kv_heads, head_dim, C] (litert-torch's transposed layout,
:data:`TIME_AXES`: both attention matmuls then read the cache as XNNPACK packs it, and the query groups share one
matmul per KV head instead of a broadcast of the cache to every query head; SmolLM2 int8 at context 2048 decoded
27.6 -> 30.8 tok/s). Flat, because LiteRT's Python ``TensorBuffer`` binds host memory zero-copy only as a vector:
the runtime keeps one set of cache arrays for the prefill and full decode signatures instead of one copy per
signature. The outputs ``kv_slice_k_<i>`` / ``kv_slice_v_<i>`` hold only the new positions, which the device
runtime (:mod:`edgeship.profiling.llm.tflite`) writes into the cache arrays in place.

Recipes (:data:`RECIPES` is the support matrix and the dispatch):

* ``fp32``: the converted float graph.
* ``int8-dynamic``: ai-edge-quantizer ``dynamic_wi8c_hr_afp32``: Hadamard-rotated int8 per-channel weights for every
  FULLY_CONNECTED op and the embedding table, activations quantized per inference by the kernels.
* ``int4-weight``: block-wise symmetric int4 weights (block = ``group_size``) for FULLY_CONNECTED with dynamic int8
  activations; the embedding table stays int8 per-channel (ai-edge-quantizer's EMBEDDING_LOOKUP has no block-wise
  int4). Channel-wise int4 is not offered (see llm-edge.md: it passes smoke tests and fails real tasks).

Architectures: :data:`ARCHITECTURES` (Llama incl. SmolLM2/TinyLlama, Qwen2/2.5, Qwen3). Others raise one line
naming these.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeship.errors import ExportError, UnsupportedRecipeError
from edgeship.exporters.base import Stage
from edgeship.exporters.llm_base import (
    LLM_EXPORTERS,
    LLMExportRequest,
    LLMExportResult,
    kv_cache_bytes_per_token,
)
from edgeship.exporters.tflite import litert_progress_off, quantize

if TYPE_CHECKING:
    import torch
    from torch import nn

FILE = "model.tflite"
PREFILL_LENGTHS = (32, 128)  # chunk lengths of the prefill signatures (capped by max_context)
SHORT_PREFILL_MIN = 256  # prefill signatures over a cache this long or longer too (short_prefill)
DECODE_FRACTIONS = (8, 4, 2)  # decode_<max_context // f>: shorter caches for the early tokens of a reply
BLOCKS = (32, 64, 128, 256)  # block sizes ai-edge-quantizer offers for int4 weights
# litert-torch's composites (SDPA, RMSNorm) rather than plain ops: with plain ops a SmolLM2 decode step took 1.8 s
# instead of 0.13 s (the GQA key/value repeat becomes BROADCAST_TO over the whole cache in every layer)
HLFB = True
KV_NAMES = ("kv_cache_k_{}", "kv_cache_v_{}")  # cache inputs per layer, in litert-torch's transposed layout:
KV_LAYOUT = ("flat float32 vectors viewed as K [1, kv_heads, C, head_dim], V [1, kv_heads, head_dim, C], C the "
             "signature's cache length")
TIME_AXES = (2, 3)  # the position axis of K and of V
SLICE_NAMES = ("kv_slice_k_{}", "kv_slice_v_{}")  # outputs: the entries of the new positions (n along TIME_AXES)
log = logging.getLogger("edgeship.llm.tflite")


@dataclass(frozen=True)
class Family:
    """How one HF ``model_type`` maps onto litert-torch's decoder config."""

    qkv_bias: bool  # Qwen2 has biases on q/k/v (not on o)
    qk_norm: bool  # Qwen3 normalises q and k per head


ARCHITECTURES: dict[str, Family] = {
    "llama": Family(qkv_bias=False, qk_norm=False),
    "qwen2": Family(qkv_bias=True, qk_norm=False),
    "qwen3": Family(qkv_bias=False, qk_norm=True),
}
ACTIVATIONS = {"silu": "SILU", "gelu": "GELU", "gelu_pytorch_tanh": "GELU_TANH"}


# ---- the recipe table: name -> (what it does, ai-edge-quantizer configuration or None) ----------------------------
def _int8_dynamic(q: Any, block: int) -> dict[str, Any]:
    from ai_edge_quantizer import recipe

    # Hadamard-rotated weights (the rotation is applied to the activations at run time) spread outliers before the
    # per-tensor dynamic activation quantization: on SmolLM2-135M top-1 agreement with PyTorch over 300 tokens went
    # from 0.927 (KL 0.022, plain dynamic_wi8_afp32) to 0.967 (KL 0.005) at the same size
    q.load_quantization_recipe(recipe.dynamic_wi8c_hr_afp32())
    return {"weights": "int8 symmetric per-channel, Hadamard-rotated (FULLY_CONNECTED)",
            "embeddings": "int8 per-channel", "activations": "int8 dynamic (per inference), float32 elsewhere",
            "quantizer": "ai-edge-quantizer dynamic_wi8c_hr_afp32 (decomposed Hadamard rotation)"}


def _int4_weight(q: Any, block: int) -> dict[str, Any]:
    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    ops = qtyping.TFLOperationName
    q.add_dynamic_config(".*", ops.EMBEDDING_LOOKUP, 8)
    # the 4-bit linears hold weights already on their grid (offset_int4): the recovery algorithm reads each block's
    # step back from the values instead of refitting a symmetric max/7 scale, so the grid survives bit-exactly
    q.add_dynamic_config(".*", ops.FULLY_CONNECTED, 4, getattr(qtyping.QuantGranularity, f"BLOCKWISE_{block}"),
                         algorithm_key=AlgorithmName.DEQUANTIZED_WEIGHT_RECOVERY)
    q.add_dynamic_config(OFFSET_SCOPE, ops.FULLY_CONNECTED, 8)  # the block offsets: per-channel int8
    q.add_dynamic_config(HEAD_SCOPE, ops.FULLY_CONNECTED, 8)  # the LM head: per-channel int8
    return {"weights": f"int4 block-wise, block {block}, with an exact per-block offset (every linear of the "
                       "decoder blocks)", "head": "int8 per-channel (the most sensitive layer; GGUF files keep it "
                                                  "8-bit too)",
            "group_size": block, "embeddings": "int8 per-channel (no block-wise int4 for EMBEDDING_LOOKUP)",
            "activations": "int8 dynamic (per inference), float32 elsewhere",
            "quantizer": "ai-edge-quantizer dynamic int4 block-wise (dequantized_weight_recovery) + int8 per-channel"}


OFFSET_SCOPE = "Linear_edgeship_offset"  # FC output names carry the module path: the offset linears' attribute name
HEAD_SCOPE = "logits"  # the LM head's output is the signature's logits


def offset_int4(decoder: nn.Module, block: int) -> dict[str, Any]:
    """Put every linear of the decoder blocks on a 4-bit grid whose offsets are exact, in place (the LM head and
    the embedding are left to the quantizer's 8-bit configs).

    ai-edge-quantizer's 4-bit blocks are symmetric (``w = scale * q``, q in -8..7, scale = max|w| / 7): most 4-bit
    checkpoints people ship (GGUF ``Q4_1``, GPTQ, AWQ) sit on an affine grid ``w = d * q + m``, and requantizing
    them symmetrically moves every weight (SmolLM2, a ``Q4_1`` GGUF: top-1 0.670). As for ``.pte``
    (:func:`edgeship.exporters.llm_pte.offset_int4`) each block gets its min/max affine fit (exactly the ``Q4_1``
    grid when the weights were on one); the linear keeps ``d * (q - 8)`` and the offset ``o`` [out, blocks] comes
    back as ``o @ (block sums of x)``, a small linear (:data:`OFFSET_SCOPE`, int8 per channel). The quantizer's
    ``dequantized_weight_recovery`` algorithm then reads each block's step back as the smallest gap between its
    sorted ``|values|`` and 0: the fit puts every block's min on level 0 and its max on 15, so ``|q - 8|`` holds
    both 8 and 7 and that gap is one step (a constant block recovers a coarser step that is exact too). The step
    is stored as bf16 in an fp16, so ``d`` is rounded so here first and the offsets are least-squares fitted to
    the rounded steps. The quantizer checks the recovered weights against these within 1e-4 and fails the export
    if they differ."""
    import torch
    from torch import nn

    from edgeship.exporters.onnx_affine4 import symmetric_grid

    done = 0
    blocks_of = getattr(decoder, "transformer_blocks", decoder)
    for parent in list(blocks_of.modules()):
        for child, lin in list(parent.named_children()):
            if type(lin) is not nn.Linear or lin.in_features % block:
                continue
            q, step, offset = symmetric_grid(lin.weight.detach().float().numpy(), block, fp16_steps=True)
            sym = torch.from_numpy(q * step[..., None]).reshape(lin.weight.shape)
            setattr(parent, child, _offset_linear()(lin, sym, torch.from_numpy(offset), block))
            done += 1
    return {"int4_layers": done,
            "offsets": f"per block of {block}: exact affine offset through a small int8 linear (4-bit grid kept)"}


@functools.cache
def _offset_linear() -> type:
    from torch import nn

    class OffsetLinear(nn.Module):
        """``linear(x) + edgeship_offset(block sums of x)``: 4-bit grid weights and their exact block offsets."""

        def __init__(self, linear: nn.Linear, grid: torch.Tensor, offset: torch.Tensor, block: int) -> None:
            super().__init__()
            self.linear = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
            self.linear.weight = nn.Parameter(grid, requires_grad=False)
            if linear.bias is not None:
                self.linear.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
            self.edgeship_offset = nn.Linear(offset.shape[1], offset.shape[0], bias=False)
            self.edgeship_offset.weight = nn.Parameter(offset, requires_grad=False)
            self.block = block

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            sums = x.unflatten(-1, (-1, self.block)).sum(-1)
            return self.linear(x) + self.edgeship_offset(sums)  # type: ignore[no-any-return]

    return OffsetLinear


@dataclass(frozen=True)
class Recipe:
    description: str
    configure: Callable[[Any, int], dict[str, Any]] | None  # ai-edge-quantizer set-up; None keeps the float graph
    blockwise: bool = False  # takes the request's group_size as its block size
    # rewrites the float decoder before conversion (given the block size; returns what it did for the manifest)
    transform: Callable[[nn.Module, int], dict[str, Any]] | None = None
    # rotate the hidden states first (llm_rotate's R1 and R2; the quantizer's Hadamard covers every linear's input)
    rotate: bool = False


RECIPES: dict[str, Recipe] = {
    "fp32": Recipe("float32 weights and activations", None),
    # rotated: SmolLM2's greedy answer to the France question is a near-tie in fp32 ("The" 25.33 vs "L'" 25.24);
    # plain int8 said "L'Étoile" (top-1 0.973), rotated it says Paris, its first token ahead by 0.37 (top-1 0.957)
    "int8-dynamic": Recipe("int8 per-channel weights + int8 embedding, dynamic int8 activations, hidden states "
                           "rotated", _int8_dynamic, rotate=True),
    "int4-weight": Recipe("int4 block-wise weights (group_size) with exact offsets, int8 head and embedding, "
                          "dynamic int8 activations", _int4_weight, blockwise=True, transform=offset_int4),
}


@LLM_EXPORTERS.register("tflite")
def export_tflite(req: LLMExportRequest) -> LLMExportResult:
    recipe = RECIPES.get(req.recipe)
    if recipe is None:
        raise UnsupportedRecipeError(f"tflite: no LLM recipe '{req.recipe}' (it offers: {', '.join(RECIPES)})")
    if recipe.blockwise and req.group_size not in BLOCKS:
        raise UnsupportedRecipeError(f"tflite/{req.recipe}: group size {req.group_size} is not a block size "
                                     f"ai-edge-quantizer offers ({', '.join(map(str, BLOCKS))})")
    hf = req.model.config
    warnings: list[str] = []
    mcfg = model_config(hf, req.max_context, warnings)
    lengths = prefill_lengths(req.max_context)
    quant: dict[str, Any] = {"recipe": req.recipe}
    with req.stage(Stage.LOWER):  # converted once per process and graph (float_graph), then reused
        data = float_graph(req, mcfg, lengths, recipe, quant, "tflite").read_bytes()
    configure = recipe.configure
    if configure is not None:
        with req.stage(Stage.QUANTIZE):
            data = quantize_recipe(data, configure, req.group_size, quant, "tflite")
    else:
        quant.update(weights="float32", activations="float32", embeddings="float32")
    req.out.mkdir(parents=True, exist_ok=True)
    with req.stage(Stage.SERIALIZE):
        (req.out / FILE).write_bytes(data)  # the core stages the whole folder and renames it into the bundle
    warnings.append("plain .tflite for edgeship's own decode loop on the LiteRT interpreter (KV slices, last-token "
                    "logits); LiteRT-LM's engine needs litert-torch's stock signatures instead: export "
                    "--format litertlm for a .litertlm run by litert-lm-api")
    layers = int(hf.num_hidden_layers)
    heads, dim = mcfg.block_config(0).attn_config.num_query_groups, mcfg.block_config(0).attn_config.head_dim
    shapes = ([1, heads, req.max_context, dim], [1, heads, dim, req.max_context])
    runtime = {
        "kind": "tflite-signatures", "file": FILE, "max_context": req.max_context, "vocab_size": int(hf.vocab_size),
        "prefill_signatures": {str(n): f"prefill_{n}" for n in lengths}, "decode_signature": "decode",
        "prefill_signatures_short": {str(c): {str(n): k for n, k in sigs.items()}
                                     for c, sigs in short_prefill(req.max_context, lengths).items()},
        "decode_signatures": {str(c): decode_signature(c, req.max_context) for c in decode_contexts(req.max_context)},
        "inputs": {"tokens": "int32 [1, n]", "input_pos": "int32 [n]", "last": "int32 [1] (prefill only)"},
        "logits": "logits", "kv_cache": {"names": [k.format(i) for i in range(layers) for k in KV_NAMES],
                                         "slices": [k.format(i) for i in range(layers) for k in SLICE_NAMES],
                                         "shapes": [list(shapes[j]) for _ in range(layers) for j in (0, 1)],
                                         "time_axes": [TIME_AXES[j] for _ in range(layers) for j in (0, 1)],
                                         "layout": KV_LAYOUT, "flat": True, "dtype": "float32"},
        "runtimes": ["ai-edge-litert", "tflite-runtime"], "litertlm": False,
    }
    return LLMExportResult(files=[Path(FILE)], runtime=runtime, quantization=quant,
                           kv_cache_bytes_per_token=kv_cache_bytes_per_token(hf), tool=_tools(), warnings=warnings)


def quantize_recipe(data: bytes, configure: Callable[[Any, int], dict[str, Any]], block: int, quant: dict[str, Any],
                    fmt: str) -> bytes:
    """ai-edge-quantizer with a recipe's configuration; what it applied goes into ``quant``."""
    try:
        return quantize(data, lambda q: quant.update(configure(q, block)))
    except (RuntimeError, ValueError) as e:  # the quantizer wraps its recovery check's RuntimeError in a ValueError
        if "Failed to recover" not in str(e):
            raise
        # a 4-bit linear that offset_int4 did not put on its grid: the FC name scopes no longer match this
        # litert-torch's tensor names
        raise ExportError(f"{fmt}/{quant.get('recipe')}: a 4-bit layer is not on the grid edgeship wrote (the head or "
                          f"an offset linear was not matched by '{HEAD_SCOPE}' / '{OFFSET_SCOPE}' in this "
                          f"litert-torch's op names): {str(e).splitlines()[0][:200]}") from e


#: (model dir, weights fingerprint, max_context, prefill lengths, format, transform) -> converted float graph. The
#: core exports several recipes of one model in one process and most differ only after conversion (SmolLM2-135M
#: converts in several minutes), so each float graph is converted once and kept in a per-process directory removed
#: at exit.
_GRAPHS: dict[tuple[str, ...], tuple[Path, dict[str, Any]]] = {}


def float_graph(req: LLMExportRequest, mcfg: Any, lengths: list[int], recipe: Recipe, quant: dict[str, Any],
                fmt: str, convert: Callable[[nn.Module, Any, Path], Path] | None = None) -> Path:
    """The converted float decoder for ``recipe`` (its :attr:`Recipe.transform` applied first; what the transform
    did goes into ``quant``): this module's signatures, or ``convert(decoder, decoder config, workdir)``'s (``--format
    litertlm``'s stock ones, with litert-torch's own mask cache)."""
    import torch

    transform = recipe.transform
    tag = f"{transform.__name__}-{req.group_size}" if transform is not None else "float"
    wanted = req.options.get("rotate", True)  # as for .pte: API users may turn it off
    if not isinstance(wanted, bool):
        raise ExportError(f"{fmt}: option rotate must be true or false (got {wanted!r})")
    rotate = recipe.rotate and wanted
    tag += "-rotated" if rotate else ""
    signatures = ",".join(map(str, lengths)) + (f" {short_prefill(req.max_context, lengths)}" if convert is None else "")
    key = (str(req.hf_dir.resolve()), fingerprint(req.hf_dir), str(req.max_context), signatures, fmt, tag)
    if recipe.rotate and not wanted:  # the graph is the unrotated one, which may be cached
        quant["rotation"] = {"applied": False, "why": "turned off (option rotate=False)"}
    hit = _GRAPHS.get(key)
    if hit is not None and hit[0].is_file():
        quant.update(hit[1])
        return hit[0]
    work = graph_dir() / f"{fmt}-{tag}-{len(_GRAPHS)}"
    work.mkdir()
    with litert_progress_off(), torch.no_grad():
        t0 = time.perf_counter()
        hf_dir, done = req.hf_dir, {}
        if rotate:
            hf_dir, mcfg, done["rotation"] = _rotated_weights(req, work)
        decoder = load_decoder(mcfg, hf_dir, mask_cache_size=req.max_context if convert else 0, fmt=fmt)
        done.update(transform(decoder, req.group_size) if transform is not None else {})
        if convert is None:
            path = work / FILE
            _convert(decoder, mcfg, req.max_context, lengths, path)
        else:
            path = convert(decoder, mcfg, work)
        log.info("%s: converted the float decoder (%s) in %.1f s", fmt, tag, time.perf_counter() - t0)
    _GRAPHS[key] = path, done
    quant.update(done)
    return path


def _rotated_weights(req: LLMExportRequest, work: Path) -> tuple[Path, Any, dict[str, Any]]:
    """The request's model with its hidden states rotated (:func:`llm_rotate.rotated`, without R3), saved where
    :func:`load_decoder` reads it, with the decoder config for it (the rotation unties the LM head); the original
    when the family does not fold, with the reason in the record."""
    from edgeship.exporters.llm_rotate import rotated

    model, record = rotated(req.model, down=False)
    if model is None:
        return req.hf_dir, model_config(req.model.config, req.max_context, []), record
    out = work / "rotated"
    model.save_pretrained(out)
    return out, model_config(model.config, req.max_context, []), record


def fingerprint(hf_dir: Path) -> str:
    files = sorted([*hf_dir.glob("*.safetensors"), hf_dir / "config.json"])
    return ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.is_file())


@functools.cache
def graph_dir() -> Path:
    import atexit
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="edgeship-llm-tflite-"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


def prefill_lengths(max_context: int) -> list[int]:
    out = [n for n in PREFILL_LENGTHS if n <= max_context]
    return out or [max_context]


def decode_contexts(max_context: int) -> list[int]:
    """Cache lengths of the decode signatures, ascending, ending at ``max_context``."""
    return sorted({max_context // f for f in DECODE_FRACTIONS if max_context // f >= 8} | {max_context})


def short_prefill(max_context: int, lengths: Sequence[int]) -> dict[int, dict[int, str]]:
    """Cache length -> {chunk length: signature} of the prefill signatures over a short cache: the shortest decode
    cache of at least :data:`SHORT_PREFILL_MIN` positions below ``max_context``, for the chunks that fit it."""
    short = [c for c in decode_contexts(max_context) if SHORT_PREFILL_MIN <= c < max_context]
    if not short:
        return {}
    c = short[0]
    return {c: {n: f"prefill_{n}_{c}" for n in lengths if n <= c}}


def decode_signature(context: int, max_context: int) -> str:
    return "decode" if context == max_context else f"decode_{context}"


# ---- HF config -> litert-torch ModelConfig ---------------------------------------------------------------------------
def model_config(hf: Any, max_context: int, warnings: list[str]) -> Any:
    import litert_torch.generative.layers.model_config as cfg

    kind = str(getattr(hf, "model_type", "?"))
    fam = ARCHITECTURES.get(kind)
    if fam is None:
        raise ExportError(f"tflite: architecture '{kind}' is not mapped onto litert-torch's decoder; supported: "
                          f"{', '.join(sorted(ARCHITECTURES))} (export it with --format onnx or --format pte)")
    act = ACTIVATIONS.get(str(getattr(hf, "hidden_act", "silu")))
    if act is None:
        raise ExportError(f"tflite: activation '{hf.hidden_act}' is not supported ({', '.join(ACTIVATIONS)})")
    heads = int(hf.num_attention_heads)
    head_dim = int(getattr(hf, "head_dim", None) or hf.hidden_size // heads)
    eps = float(getattr(hf, "rms_norm_eps", 1e-6))
    norm = cfg.NormalizationConfig(type=cfg.NormalizationType.RMS_NORM, epsilon=eps, enable_hlfb=HLFB)
    attn_bias = bool(getattr(hf, "attention_bias", False))
    attn = cfg.AttentionConfig(
        num_heads=heads, head_dim=head_dim, num_query_groups=int(getattr(hf, "num_key_value_heads", None) or heads),
        rotary_base=_rope_theta(hf), rotary_percentage=1.0, qkv_use_bias=fam.qkv_bias or attn_bias,
        output_proj_use_bias=attn_bias,
        **({"query_norm_config": norm, "key_norm_config": norm, "qkv_transpose_before_split": True,
            "qkv_fused_interleaved": False} if fam.qk_norm else {}))
    ff = cfg.FeedForwardConfig(type=cfg.FeedForwardType.GATED, activation=cfg.ActivationConfig(
        getattr(cfg.ActivationType, act)), intermediate_size=int(hf.intermediate_size),
        use_bias=bool(getattr(hf, "mlp_bias", False)))
    block = cfg.TransformerBlockConfig(attn_config=attn, ff_config=ff, pre_attention_norm_config=norm,
                                       post_attention_norm_config=norm)
    trained = int(getattr(hf, "max_position_embeddings", max_context) or max_context)
    if max_context > trained:
        warnings.append(f"max_context {max_context} exceeds the model's max_position_embeddings {trained}: "
                        "positions past it were never trained")
    mcfg = cfg.ModelConfig(vocab_size=int(hf.vocab_size), num_layers=int(hf.num_hidden_layers),
                           max_seq_len=max(trained, max_context), embedding_dim=int(hf.hidden_size),
                           block_configs=block, final_norm_config=norm,
                           lm_head_share_weight_with_embedding=bool(getattr(hf, "tie_word_embeddings", False)),
                           enable_hlfb=HLFB)
    rope = _rope_builder(hf)
    if rope is not None:
        mcfg.build_rope = rope
    return mcfg


def _rope_params(hf: Any) -> dict[str, Any]:
    for key in ("rope_parameters", "rope_scaling"):
        val = getattr(hf, key, None)
        if isinstance(val, dict):
            return val
    return {}


def _rope_theta(hf: Any) -> float:
    return float(_rope_params(hf).get("rope_theta") or getattr(hf, "rope_theta", None) or 10000.0)


def _rope_builder(hf: Any) -> Callable[..., Any] | None:
    """None for plain RoPE; Llama 3's frequency scaling through litert-torch's own builder; refuse the rest."""
    p = _rope_params(hf)
    kind = str(p.get("rope_type") or p.get("type") or "default")
    if kind == "default":
        return None
    if kind == "llama3":
        import torch
        from litert_torch.generative.examples.llama import llama

        return functools.partial(llama._build_llama3_rope_cache, condense_ratio=1, dtype=torch.float32,
                                 device=torch.device("cpu"), factor=float(p["factor"]),
                                 low_freq_factor=float(p["low_freq_factor"]),
                                 high_freq_factor=float(p["high_freq_factor"]),
                                 max_seq_len=int(p["original_max_position_embeddings"]))
    raise ExportError(f"tflite: RoPE scaling '{kind}' is not supported (plain RoPE and 'llama3' are); export this "
                      "model with --format onnx or --format pte")


# ---- weights and signatures ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _tf_schema_alias() -> Iterator[None]:
    """litert-torch 0.10's ``generative/layers/lora.py`` imports the TFLite flatbuffer schema from TensorFlow, which
    litert-torch does not depend on (and which we do not install: ~600 MB). ai-edge-litert ships the same generated
    schema module; alias it under TensorFlow's names only while litert-torch's generative layers are imported, so
    that nothing else in the process sees a fake ``tensorflow``. A real TensorFlow, when installed, is used as is."""
    import importlib.util
    import sys
    import types

    if "litert_torch.generative.layers.lora" in sys.modules or importlib.util.find_spec("tensorflow") is not None:
        yield
        return
    from ai_edge_litert import schema_py_generated

    names = ("tensorflow", "tensorflow.lite", "tensorflow.lite.python")
    for n in names:
        sys.modules[n] = types.ModuleType(n)
    sys.modules["tensorflow.lite.python.schema_py_generated"] = schema_py_generated
    try:
        yield
    finally:
        for n in (*names, "tensorflow.lite.python.schema_py_generated"):
            sys.modules.pop(n, None)


def load_decoder(mcfg: Any, hf_dir: Path, mask_cache_size: int = 0, fmt: str = "tflite") -> nn.Module:
    """The decoder with the HF weights; ``mask_cache_size`` > 0 keeps litert-torch's own causal-mask cache (its stock
    forward, as ``--format litertlm`` converts it); 0 for this module's forward, which builds the mask itself."""
    with _tf_schema_alias():
        from litert_torch.generative.utilities import loader as loading
        from litert_torch.generative.utilities import model_builder

    names = loading.ModelLoader.TensorNames(**{**vars(model_builder.TENSOR_NAMES)})
    if not mcfg.lm_head_share_weight_with_embedding:
        names.lm_head = "lm_head"
    if mcfg.block_config(0).attn_config.query_norm_config.type.name != "NONE":
        names.attn_query_norm = "model.layers.{}.self_attn.q_norm"
        names.attn_key_norm = "model.layers.{}.self_attn.k_norm"
    model = model_builder.DecoderOnlyModel(mcfg, mask_cache_size=mask_cache_size)
    try:
        loading.ModelLoader(str(hf_dir), names).load(model, strict=not mcfg.lm_head_share_weight_with_embedding)
    except (ValueError, KeyError, RuntimeError) as e:
        raise ExportError(f"{fmt}: the weights in {hf_dir} do not fit the mapped decoder ({str(e).splitlines()[0]})"
                          "; is the config.json the one the safetensors were saved with?") from None
    return model.eval()


def _signature_module(decoder: nn.Module) -> nn.Module:
    import torch

    class Signature(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.decoder = decoder

        def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, kv_cache: Any,
                    last: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
            return _forward(self.decoder, tokens, input_pos, kv_cache, last)

    return Signature().eval()


def _forward(m: Any, tokens: torch.Tensor, input_pos: torch.Tensor, kv_cache: Any,
             last: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """DecoderOnlyModel.forward, changed where the device pays for it:

    * attention reads the cache without updating it and masks it from ``input_pos`` (:func:`_attention`; no
      max_context^2 mask constant in the file);
    * the LM head runs on one position (the last real token of the chunk), not on every padded one;
    * the outputs are the K/V entries of the new positions only, not the whole updated cache: the runtime writes
      them into the cache input buffers in place, so a decode step moves kilobytes through Python instead of two
      copies of the full cache (measured on SmolLM2-135M, max_context 1024: 4 tok/s with the full cache as
      outputs).
    """
    import torch
    from litert_torch.generative.layers import kv_cache as kv_utils

    attn = m.config.block_config(0).attn_config
    groups, dim = attn.num_query_groups, attn.head_dim
    ctx, t = kv_cache.caches[0].k_cache.numel() // (groups * dim), tokens.shape[1]
    caches = [kv_utils.KVCacheEntry(c.k_cache.reshape(1, groups, ctx, dim), c.v_cache.reshape(1, groups, dim, ctx),
                                    c.kv_layout) for c in kv_cache.caches]
    x = m.tok_embedding(tokens)
    rope = m.config.build_rope(input_pos, int(attn.rotary_percentage * attn.head_dim), attn.rotary_base)
    # what each of the t new positions may see, for every layer's _attention: [t, cache + t], the cache before the
    # chunk's first position, then the chunk's own entries causally
    inf = torch.tensor(float("-inf"))
    before = torch.where(torch.arange(ctx, dtype=torch.int32)[None, :] < input_pos[:1, None], 0.0, inf)
    rows = torch.arange(t, dtype=torch.int32)
    mask = torch.cat([before.expand(t, ctx), torch.where(rows[None, :] <= rows[:, None], 0.0, inf)], -1)
    out: dict[str, torch.Tensor] = {}
    for i, block in enumerate(m.transformer_blocks):
        x, kv = block(x, rope, mask, input_pos, caches[i])  # kv: the new entries (_attention)
        out[SLICE_NAMES[0].format(i)], out[SLICE_NAMES[1].format(i)] = kv.k_cache, kv.v_cache
    if last is not None:
        x = torch.index_select(x, 1, last)
    out["logits"] = m.lm_head(m.final_norm(x)).reshape(1, -1)
    return out


def _attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv: Any, input_pos: torch.Tensor,
               mask: torch.Tensor, config: Any, enable_hlfb: bool, alibi_bias: torch.Tensor | None = None) -> Any:
    """litert-torch's ``sdpa_with_kv_update`` for the transposed layout, without writing the cache.

    Its version updates the cache with a DYNAMIC_UPDATE_SLICE and attends over the result. The cache is a
    signature input, so LiteRT copies the whole buffer first, single-threaded, for every layer and token (perf on
    SmolLM2 int8 at context 2048: 17% of decode time in that memcpy). The device runtime writes the new entries
    itself, so here the queries attend to the cache as it is and to the chunk's own entries, one softmax over
    both, masked by ``mask`` [n, cache + n] (built once per step in :func:`_forward`); the returned entry holds only
    the new K [1, kv_heads, n, head_dim] and V [1, kv_heads, head_dim, n]."""
    import torch
    from litert_torch.generative.custom_ops.bmm_4d import bmm_4d
    from litert_torch.generative.layers import kv_cache as kv_utils

    b, t, heads, dim = query.shape
    groups = config.num_query_groups
    q = (query * (1.0 / math.sqrt(config.head_dim))).permute(0, 2, 1, 3).reshape(1, groups, heads // groups * t, dim)
    k = key.permute(0, 2, 1, 3).reshape(1, groups, t, dim)
    v = value.permute(0, 2, 3, 1).reshape(1, groups, dim, t)
    ctx = kv.k_cache.shape[2]
    scores = torch.cat([bmm_4d(q, kv.k_cache).reshape(groups, -1, t, ctx), bmm_4d(q, k).reshape(groups, -1, t, t)], -1)
    p = torch.softmax(scores + mask, -1).reshape(1, groups, -1, ctx + t)
    o = bmm_4d(p[..., :ctx], kv.v_cache) + bmm_4d(p[..., ctx:], v)
    return o.reshape(b, -1, t, dim).permute(0, 2, 1, 3).reshape(b, t, -1), kv_utils.KVCacheEntry(k, v, kv.kv_layout)


@contextlib.contextmanager
def _cache_read_only(mcfg: Any) -> Iterator[None]:
    from litert_torch.generative.layers import attention

    attn = mcfg.block_config(0).attn_config
    if attn.logit_softcap is not None or attn.use_alibi:  # _attention has neither (no mapped family uses them)
        raise ExportError("tflite: logit softcapping and ALiBi attention are not supported by this exporter's "
                          "decode graph; use --format onnx or pte")
    module = attention.sdpa_with_kv_update
    original = module.sdpa_with_kv_update
    module.sdpa_with_kv_update = _attention
    try:
        yield
    finally:
        module.sdpa_with_kv_update = original


def _convert(decoder: nn.Module, mcfg: Any, max_context: int, lengths: list[int], out: Path) -> None:
    import torch
    from litert_torch._convert import interface

    torch._dynamo.config.cache_size_limit = 64
    conv = interface.Converter()
    step = _signature_module(decoder)
    prefills = [(f"prefill_{n}", n, max_context) for n in lengths]
    prefills += [(key, n, c) for c, sigs in short_prefill(max_context, lengths).items() for n, key in sigs.items()]
    for key, n, c in prefills:
        conv.add_signature(key, step, sample_kwargs={
            "tokens": torch.zeros((1, n), dtype=torch.int32), "input_pos": torch.arange(n, dtype=torch.int32),
            "kv_cache": _flat_cache(mcfg, c), "last": torch.tensor([n - 1], dtype=torch.int32)})
    for c in decode_contexts(max_context):
        conv.add_signature(decode_signature(c, max_context), step, sample_kwargs={
            "tokens": torch.zeros((1, 1), dtype=torch.int32), "input_pos": torch.tensor([0], dtype=torch.int32),
            "kv_cache": _flat_cache(mcfg, c)})
    with _cache_read_only(mcfg):
        try:
            edge = conv.convert()
        except Exception as e:  # litert-torch raises plain exceptions from deep inside lowering
            raise ExportError(f"tflite: litert-torch could not convert the decoder ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''})") from e
    edge.export(str(out))


def _flat_cache(mcfg: Any, context: int) -> Any:
    """litert-torch's KV cache pytree (its input names) holding flat vectors, one K and one V per layer."""
    import torch
    from litert_torch.generative.layers import kv_cache as kv_utils

    attn = mcfg.block_config(0).attn_config
    size = attn.num_query_groups * attn.head_dim * context
    return kv_utils.KVCache(tuple(kv_utils.KVCacheEntry(torch.zeros(size), torch.zeros(size),
                                                        kv_utils.KV_LAYOUT_TRANSPOSED) for _ in range(mcfg.num_layers)))


def _tools() -> dict[str, str]:
    out = {}
    for dist in ("litert-torch", "ai-edge-quantizer", "ai-edge-litert", "torch"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


__all__ = ["ARCHITECTURES", "RECIPES", "export_tflite", "model_config", "prefill_lengths"]
