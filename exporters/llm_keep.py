"""Which matmuls of a quantized decoder LLM need fp32 activations: ranked on a PyTorch proxy, confirmed on builds.

Why: with exact weights (a 4-bit GGUF on its own grid), what is left between an artifact and PyTorch fp32 is the
int8 activations the CPU kernel computes at run time (onnxruntime's ``MatMulNBits`` ``accuracy_level=4``, like
llama.cpp's Q8 activations). On SmolLM2 that is enough to flip a near-tie (0.08 nats) in the first greedy token of
"What is the capital of France?" ("L'Étoile ..." instead of "The capital of France is Paris."), while fp32
activations on the matmuls answer Paris. The search keeps fp32 activations only where a greedy answer needs them,
within a budget (:data:`MAX_FP32_SHARE` of the weights), so a model whose error sits in a few layers pays for those
only, and one whose error is spread over all of them (SmolLM2: README) does not turn into an fp32 model.

1. **Rank** (here, in PyTorch): every linear's input is fake-quantized as the kernel does it (symmetric int8, one
   scale per block of ``block`` input values); for each *activation* (the tensor q/k/v, or gate/up, read together)
   a first-order estimate of how much KL(fp32 || proxy) over the prompts' reference continuations drops when only
   that one stays fp32. One forward and backward in all.
2. **Confirm** (:func:`keep_fp32_activations`, called by the format's exporter): real artifacts with the ``k``
   best-ranked activations in fp32, scored by the core's device-runtime fidelity (``LLMExportRequest.score``),
   ``k`` grown geometrically within the budget, then bisected, by :func:`edgeship.exporters.sensitivity.search`
   until the greedy continuations that fp32 activations on every candidate reproduce are reproduced; if the budget
   cannot, the build that reproduces the most of them. A 4-bit matmul keeps its blocks and runs onnxruntime's fast
   fp32-activation kernel; an 8-bit one has none (it would dequantize its matrix on every call), so the format keeps
   it as a plain fp32 matmul.

Export side only: imports torch and onnx inside functions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgeship.exporters.llm_base import LLMExportRequest
    from edgeship.manifest import LLMFidelity


@dataclass(frozen=True)
class ActivationGroup:
    """One activation tensor, in the order the forward pass reads it, and the linears that read it."""

    index: int
    layers: tuple[str, ...]  # torch module names (q/k/v share one input, as do gate/up)
    in_features: int


@dataclass(frozen=True)
class ActivationSensitivity:
    group: int
    layers: tuple[str, ...]
    kl_all_int8: float  # mean KL over the continuation positions with every activation int8
    kl_this_fp32: float  # ... with only this one kept fp32

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fake_quant_blocks(x: Any, block: int) -> Any:
    """Symmetric int8 per block of ``block`` values along the last dim (the CPU kernel's activation quantization)."""
    import torch

    k = x.shape[-1]
    if k % block:
        return x
    xb = x.reshape(*x.shape[:-1], k // block, block)
    scale = xb.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30) / 127.0
    return (torch.clamp(torch.round(xb / scale), -127, 127) * scale).reshape(x.shape)


def _batch(prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]) -> tuple[Any, Any, list[Any]]:
    """Prompt + reference continuation, right-padded; and per row the positions that predict the continuation."""
    import torch

    seqs = [list(p) + list(c)[:-1] for p, c in zip(prompts, continuations, strict=True)]
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    rows = [torch.arange(len(p) - 1, len(p) - 1 + len(c)) for p, c in zip(prompts, continuations, strict=True)]
    return ids, mask, rows


def activation_groups(model: Any, sample_ids: Sequence[int]) -> list[ActivationGroup]:
    """The linears of ``model`` grouped by the activation they read, in forward order (one traced forward)."""
    import torch
    from torch import nn

    seen: list[tuple[Any, str]] = []  # the tensors stay referenced: a freed one's address could be reused
    hooks = [mod.register_forward_pre_hook(lambda _m, a, name=name: seen.append((a[0], name)))
             for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([list(sample_ids)], dtype=torch.long))
    finally:
        for h in hooks:
            h.remove()
    groups: list[ActivationGroup] = []
    for i, (x, name) in enumerate(seen):
        if i and x is seen[i - 1][0]:
            g = groups[-1]
            groups[-1] = ActivationGroup(g.index, (*g.layers, name), g.in_features)
        else:
            groups.append(ActivationGroup(len(groups), (name,), int(x.shape[-1])))
    return groups


def rank_activations(model: Any, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                     groups: Sequence[ActivationGroup], block: int) -> list[ActivationSensitivity]:
    """Most helpful to keep fp32 first, by a first-order estimate (one forward and backward with every activation
    int8): how much KL(fp32 || proxy) over the continuations would drop if this activation's int8 error were undone,
    ``-sum(dKL/dx * (x - q(x)))``. Leave-one-out forwards gave a similar order at ~100x the time (400 s here)."""
    import torch

    ids, mask, rows = _batch(prompts, continuations)
    named = dict(model.named_modules())
    leaves: dict[int, list[tuple[Any, Any]]] = {}  # group -> (zero probe added to its input, its int8 error)
    owner = {n: g.index for g in groups for n in g.layers}

    def quant(name: str) -> Any:
        def hook(_m: Any, a: tuple[Any, ...]) -> tuple[Any, ...]:
            x = a[0]
            err = (fake_quant_blocks(x.detach(), block) - x.detach())
            probe = torch.zeros_like(x, requires_grad=True)  # dKL/dx lands here; x keeps its graph upstream
            leaves.setdefault(owner[name], []).append((probe, err))
            return (x + err + probe, *a[1:])
        return hook

    def logprobs() -> Any:
        out = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        return torch.cat([out[i, r] for i, r in enumerate(rows)])

    with torch.inference_mode():
        ref = logprobs()
    hooks = [named[n].register_forward_pre_hook(quant(n)) for n in owner]
    try:
        with torch.enable_grad():
            q = logprobs()
            kl = (ref.exp() * (ref - q)).sum(-1).mean()
            kl.backward()
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)  # the parameters were not asked for grads, but be safe
    total = float(kl.detach())
    result = []
    for g in groups:
        gain = sum(float((leaf.grad * err).sum()) for leaf, err in leaves.get(g.index, ()) if leaf.grad is not None)
        result.append(ActivationSensitivity(g.index, g.layers, round(total, 6), round(total - gain, 6)))
    return sorted(result, key=lambda s: s.kl_this_fp32)


def onnx_activation_groups(matmuls: Iterable[Any],
                           dims: Mapping[str, tuple[int, int]]) -> list[tuple[str, list[str], int]]:
    """(activation, the ``matmuls`` reading it, K), in the given (graph) order; ``dims`` holds each weight's [K, N]."""
    order: dict[str, tuple[list[str], int]] = {}
    for node in matmuls:
        order.setdefault(node.input[0], ([], dims[node.input[1]][0]))[0].append(node.name)
    return [(x, nodes, k) for x, (nodes, k) in order.items()]


#: the most of the candidates' weights that may keep fp32 activations (see keep_fp32_activations)
MAX_FP32_SHARE = 0.125


@dataclass(frozen=True)
class KeepResult:
    artifact: Path  # the chosen build
    record: dict[str, Any]  # the manifest's entry: the matmuls kept with fp32 activations, and why


def _describe(f: LLMFidelity) -> dict[str, Any]:
    return {"top1_agreement": f.top1_agreement, "mean_kl": f.mean_kl, "greedy_identical": f.greedy_identical,
            "first_divergence": list(f.first_divergence)}


def _candidates(graph_path: Path, block: int,
                exclude: set[str]) -> tuple[list[tuple[str, list[str], int]], dict[str, int]]:
    """The graph's activation groups (as onnx_affine4 converts them) without the ``exclude``d matmuls, and each
    candidate matmul's weight count."""
    import onnx

    g = onnx.load(str(graph_path), load_external_data=False).graph
    dims = {t.name: (int(t.dims[0]), int(t.dims[1])) for t in g.initializer
            if len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT and t.dims[0] % block == 0}
    matmuls = [n for n in g.node if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in dims]
    groups = [(x, [n for n in nodes if n not in exclude], k) for x, nodes, k in onnx_activation_groups(matmuls, dims)]
    sizes = {n.name: dims[n.input[1]][0] * dims[n.input[1]][1] for n in matmuls}
    return groups, sizes


def within_budget(order: Sequence[tuple[str, ...]], sizes: Mapping[str, int], budget: int) -> list[tuple[str, ...]]:
    """The longest prefix of ``order`` whose matmuls hold at most ``budget`` weights."""
    total, out = 0, []
    for group in order:
        total += sum(sizes[n] for n in group)
        if total > budget:
            break
        out.append(group)
    return out


def _ranked(req: LLMExportRequest, groups: list[tuple[str, list[str], int]],
            block: int) -> tuple[list[tuple[str, ...]], list[dict[str, Any]]] | None:
    """The graph's groups, most helpful to keep fp32 first (the PyTorch proxy's order); None if the graph's
    activations do not line up with the model's linears (same count and input widths, in order)."""
    assert req.reference is not None
    ref = req.reference
    torch_groups = activation_groups(req.model, ref.prompt_ids[0])
    if [g.in_features for g in torch_groups] != [k for _, _, k in groups]:
        return None
    ranking = rank_activations(req.model, ref.prompt_ids, ref.continuations, torch_groups, block)
    ranked = [tuple(groups[s.group][1]) for s in ranking if groups[s.group][1]]
    return ranked, [{"layers": list(s.layers), "kl_estimate": s.kl_this_fp32} for s in ranking[:10]]


def keep_fp32_activations(req: LLMExportRequest, build: Callable[[Sequence[str]], Path], graph_path: Path,
                          runtime: dict[str, Any], block: int, exclude: set[str], max_builds: int = 10,
                          max_share: float = MAX_FP32_SHARE) -> KeepResult:
    """Every matmul with int8 activations unless that changes a greedy answer that fp32 activations keep.

    Target (measured, not assumed): the prompts whose greedy continuation the build with fp32 activations on every
    candidate reproduces exactly; some prompts diverge even then (ties the fp32 kernels order differently), so
    asking for all of them could not be met. Budget: the kept matmuls hold at most ``max_share`` of the candidates'
    weights, since every one costs speed (int4) or size (int8, kept as plain fp32 matmuls); within it the
    search keeps the build that reproduces the most target prompts (fewest kept on a tie), and says whether the
    target was met. Greedy agreement is not monotone in the kept set (near-ties flip both ways), so a budget
    is also what keeps the search from ending at "everything fp32".
    """
    from edgeship.exporters.sensitivity import search

    base = build(())
    groups, sizes = _candidates(graph_path, block, exclude)
    nodes = [n for _, ns, _ in groups for n in ns]
    if not nodes:
        return KeepResult(base, {"matmuls": [], "candidates": 0, "note": "no candidate matmul in the graph"})
    if req.score is None or req.reference is None:
        return KeepResult(base, {"matmuls": [], "candidates": len(nodes),
                                 "note": "not searched: greedy_search=False (--no-greedy-search)"})
    scores: dict[Path, LLMFidelity] = {}

    def score(p: Path) -> LLMFidelity:
        if p not in scores:
            assert req.score is not None
            scores[p] = req.score(p, runtime)
        return scores[p]

    f0 = score(base)
    rec: dict[str, Any] = {"matmuls": [], "candidates": len(nodes), "search": [{"kept": 0, **_describe(f0)}]}
    if f0.greedy_identical == f0.n_prompts:
        rec["note"] = "int8 activations already reproduce every greedy continuation"
        return KeepResult(base, rec)
    ceiling = build(nodes)
    fc = score(ceiling)
    rec["search"].append({"kept": len(nodes), **_describe(fc)})
    good = [i for i, d in enumerate(fc.first_divergence) if d is None]

    def value(f: LLMFidelity) -> float:
        return sum(f.first_divergence[i] is None for i in good) if f.passed else -1.0

    rec["target"] = f"greedy identical on prompts {good} (those fp32 activations on all {len(nodes)} reproduce)"
    if value(fc) <= value(f0):
        rec["note"] = "fp32 activations on every candidate reproduce no prompt that int8 activations miss"
        return KeepResult(base, rec)
    ranked = _ranked(req, groups, block)
    if ranked is None:
        rec["note"] = "the graph's activations do not line up with the model's linears: nothing to rank, none kept"
        return KeepResult(base, rec)
    full, rec["ranking"] = ranked
    budget = int(max_share * sum(sizes[n] for n in nodes))
    order = within_budget(full, sizes, budget)
    rec["budget"] = {"max_share": max_share, "weights": budget, "groups": f"{len(order)} of {len(full)}"}
    res = search(order, lambda gs: build([n for g in gs for n in g]), score, float(len(good)), max_builds=max_builds,
                 value=value, describe=_describe)
    rec["search"] += [{**a, "kept": sum(len(g) for g in order[: a["kept"]])} for a in res.attempts if a["kept"]]
    rec["matmuls"] = sorted(n for g in res.kept for n in g)
    rec["budget"]["kept_weights"] = sum(sizes[n] for n in rec["matmuls"])
    rec["met"] = value(res.fidelity) >= len(good)
    return KeepResult(res.artifact, rec)
