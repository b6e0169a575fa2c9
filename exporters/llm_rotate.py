"""Rotate a decoder LLM's hidden states before 8-bit dynamic activations (QuaRot / SpinQuant's R1 and R2).

XNNPACK's dynamic int8 linear quantizes each token's activation row with one scale, so a few outlier channels
of the residual stream set that scale and the other channels lose their bits. An orthogonal ``R`` mixes the
channels (a randomized Hadamard matrix spreads an outlier over all of them) and folds into the weights, so the
model computes the same function:

* the RMSNorm weights are folded into the linears that read the norm's output (q/k/v, gate/up, LM head) and set
  to 1: an RMSNorm without weights commutes with ``R`` (``rms(xR) == rms(x)``);
* R1 on the residual stream: embedding ``E R``; every linear that reads it ``W R``; every linear that writes to
  it (o_proj, down_proj) ``R^T W`` (and its bias);
* R2 per attention head, between v_proj and o_proj (attention mixes positions, not channels, so a per-head
  rotation of V passes through it): v_proj's rows and o_proj's columns of each head;
* R3 on down_proj's input, whose outliers (the gated MLP's product) nothing before it can fold: the one op this
  adds at run time, a Hadamard matrix over blocks of :data:`DOWN_BLOCK` channels (an fp32 ``[.., 64] x [64, 64]``
  matmul, 7% of down_proj's multiply-adds), with its transpose folded into down_proj.

SmolLM2-135M, int8 weights and per-token int8 activations, 256 teacher-forced tokens, mean KL from PyTorch fp32 /
top-1 agreement: the ``.pte`` 0.0230 / 0.910 plain, 0.0139 / 0.934 with R1 + R2, 0.0068 / 0.949 with R3 too, and
greedy "Paris" again where the plain one said "L'Étoile". R3's block, in PyTorch with torchao (which tracks the
``.pte`` within 5% here): 16 -> KL 0.0080, 64, 128 and 512 -> 0.0069. 4-bit weights are not rotated (llm_pte).

Only families whose decoder layer is exactly ``x + o_proj(attn(rmsnorm(x)))``, ``x + down(mlp(rmsnorm(x)))`` are
rotated (:data:`FAMILIES`); others are left as they are and the record says why. The rotated copy is checked
against the original in fp32 before it is used: a model where folding is not exact is left unrotated.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import torch
    from torch import nn

#: model_type values whose layers have the pre-norm residual form above, with a ``weight * x`` RMSNorm.
#: Gemma (``(1 + weight) * x`` and norms after the sublayers) and Phi-3 (fused qkv / gate_up) are not here.
FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
DOWN_BLOCK = 64  # R3's block: the largest power of two up to this that divides the MLP width
CHECK_TOKENS = 16
MAX_LOGIT_DIFF = 1e-2  # fp32 rounding after folding stays near 1e-4 on SmolLM2; a wrong fold is off by whole units


def _prime(p: int) -> bool:
    return p > 1 and all(p % k for k in range(2, math.isqrt(p) + 1))


def _paley(q: int) -> torch.Tensor:
    """Paley's construction I: a Hadamard matrix of order q + 1 for a prime q = 3 (mod 4)."""
    import torch

    square = {x * x % q for x in range(1, q)}
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0] = 1.0, -1.0
    for i in range(q):
        for j in range(q):
            if i != j:
                s[i + 1, j + 1] = 1.0 if (j - i) % q in square else -1.0
    return s + torch.eye(q + 1, dtype=torch.float64)


def hadamard(n: int) -> torch.Tensor | None:
    """A Hadamard matrix (entries +-1, ``H H^T = n I``) of order n = m * 2^k with m = 1 or m - 1 a prime = 3 (mod 4);
    None for other orders."""
    import torch

    for m in sorted((q + 1 for q in range(3, n) if q % 4 == 3 and n % (q + 1) == 0 and _prime(q)), reverse=True):
        if (n // m) & (n // m - 1) == 0:
            h = _paley(m - 1)
            break
    else:
        if n & (n - 1):
            return None
        h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def rotation(n: int, seed: int) -> tuple[torch.Tensor, str]:
    """An n x n orthogonal matrix (float64): a Hadamard matrix with random column signs, else a random orthogonal."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    h = hadamard(n)
    if h is None:
        q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r)), f"random orthogonal {n}"
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
    return h * signs / math.sqrt(n), f"randomized Hadamard {n}"


def rotated(model: nn.Module, seed: int = 0, down: bool = True) -> tuple[nn.Module | None, dict[str, Any]]:
    """A rotated copy of ``model`` (a HF causal LM) and the manifest's record of the rotation; ``(None, record)``
    with the reason for a family outside :data:`FAMILIES` or a copy whose fp32 logits moved (it is dropped).
    ``down=False`` leaves out R3 (a runtime whose quantizer rotates every linear's input already: LiteRT)."""
    import copy

    import torch

    config: Any = model.config
    kind = str(getattr(config, "model_type", "?"))
    if kind not in FAMILIES:
        return None, {"applied": False, "why": f"'{kind}' layers are not the pre-norm form this rotation folds "
                                               f"into (rotated: {', '.join(sorted(FAMILIES))})"}
    out: Any = copy.deepcopy(model).eval()
    probe = torch.arange(CHECK_TOKENS).unsqueeze(0) % int(config.vocab_size)
    with torch.no_grad():
        want = model(input_ids=probe).logits
        r1, how1 = rotation(int(config.hidden_size), seed)
        heads = int(config.num_attention_heads)
        r2, how2 = rotation(int(getattr(config, "head_dim", None) or config.hidden_size // heads), seed + 1)
        _fold_and_rotate(out, r1, r2)
        block = math.gcd(int(config.intermediate_size), DOWN_BLOCK) if down else 1  # 1: no R3 (odd width)
        for layer in out.model.layers if block > 1 else ():
            layer.mlp.down_proj = block_rotated(layer.mlp.down_proj, block)
        diff = float((out(input_ids=probe).logits - want).abs().max())
    if not diff <= MAX_LOGIT_DIFF:
        return None, {"applied": False, "why": f"the rotated copy's fp32 logits moved by {diff:.3g} (more than "
                                               f"{MAX_LOGIT_DIFF}): this model's layers do not fold"}
    return out, {"applied": True, "residual": how1, "per_head_value": how2, "seed": seed,
                 "down_proj_input": f"Hadamard over blocks of {block} at run time (fp32)" if block > 1 else
                 "left to the quantizer" if not down else f"not rotated (MLP width {config.intermediate_size} is odd)",
                 "folded": "RMSNorm weights into the linears after them", "fp32_max_logit_diff": float(f"{diff:.3g}")}


@functools.cache
def _block_rotated() -> type:
    import torch
    from torch import nn

    class BlockRotated(nn.Module):
        """``linear(x)`` computed as ``linear'(x B)``: B block-diagonal, a normalised Hadamard matrix per block of
        ``block`` channels, and ``linear'`` the same layer with weight ``W B`` (B is orthogonal and symmetric)."""

        def __init__(self, linear: nn.Linear, block: int) -> None:
            super().__init__()
            h = cast(torch.Tensor, hadamard(block)) / math.sqrt(block)
            self.block = block
            self.register_buffer("hadamard", h.float(), persistent=False)
            self.linear = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
            with torch.no_grad():
                w = linear.weight.double().reshape(linear.out_features, -1, block) @ h
                self.linear.weight.copy_(w.reshape(linear.weight.shape).to(linear.weight.dtype))
                if linear.bias is not None:
                    self.linear.bias.copy_(linear.bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shape = x.shape
            mixed = x.reshape(*shape[:-1], shape[-1] // self.block, self.block) @ cast(torch.Tensor, self.hadamard)
            return self.linear(mixed.reshape(shape))  # type: ignore[no-any-return]

    return BlockRotated


def block_rotated(linear: nn.Linear, block: int) -> nn.Module:
    """``linear`` with R3 before it (the class is built on first use: this module imports without torch)."""
    return _block_rotated()(linear, block)  # type: ignore[no-any-return]


def untie_output_embedding(model: Any) -> None:
    """Give the output projection its own weight where it shares the input embedding's: the two are changed apart
    (here the final norm folds into the head only; in llm_pte the table becomes int8 and the head a quantized
    linear, and a shared Parameter would hand the second quantize_ call the first one's tensor subclass)."""
    from torch import nn

    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is not None and inp is not None and out.weight is inp.weight:
        out.weight = nn.Parameter(inp.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False


def _fold_and_rotate(model: Any, r1: torch.Tensor, r2: torch.Tensor) -> None:
    untie_output_embedding(model)
    body, head = model.model, model.get_output_embeddings()
    layers = list(body.layers)
    for layer in layers:
        att, mlp = layer.self_attn, layer.mlp
        _fold(layer.input_layernorm, (att.q_proj, att.k_proj, att.v_proj))
        _fold(layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))
    _fold(body.norm, (head,))
    emb = body.embed_tokens.weight
    emb.copy_((emb.double() @ r1).to(emb.dtype))
    for lin in (head, *(m for layer in layers for m in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                          layer.self_attn.v_proj, layer.mlp.gate_proj,
                                                          layer.mlp.up_proj))):
        lin.weight.copy_((lin.weight.double() @ r1).to(lin.weight.dtype))
    for lin in (m for layer in layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)):
        lin.weight.copy_((r1.T @ lin.weight.double()).to(lin.weight.dtype))
        if lin.bias is not None:
            lin.bias.copy_((r1.T @ lin.bias.double()).to(lin.bias.dtype))
    hd = r2.shape[0]
    for layer in layers:
        v, o = layer.self_attn.v_proj, layer.self_attn.o_proj
        w = v.weight.double().reshape(-1, hd, v.weight.shape[1])  # [kv_heads, head_dim, hidden]
        v.weight.copy_((r2.T @ w).reshape(v.weight.shape).to(v.weight.dtype))
        if v.bias is not None:
            v.bias.copy_((v.bias.double().reshape(-1, hd) @ r2).reshape(-1).to(v.bias.dtype))
        wo = o.weight.double().reshape(o.weight.shape[0], -1, hd)  # [hidden, heads, head_dim]
        o.weight.copy_((wo @ r2).reshape(o.weight.shape).to(o.weight.dtype))


def _fold(norm: Any, linears: tuple[Any, ...]) -> None:
    g = norm.weight.double()
    for lin in linears:
        lin.weight.copy_((lin.weight.double() * g).to(lin.weight.dtype))
    norm.weight.fill_(1.0)


__all__ = ["FAMILIES", "block_rotated", "hadamard", "rotated", "rotation", "untie_output_embedding"]
