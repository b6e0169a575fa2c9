"""4-bit block-wise weights with an exact per-block offset: an ONNX graph pass over constant-weight MatMuls.

Why: most small LLMs people ship are already 4-bit (GGUF ``Q4_0``/``Q4_1``, GPTQ, AWQ). Dequantized, every block of
32 weights along the input dimension sits on a 16-level affine grid ``w = d * q + m``. Re-quantizing that with
onnxruntime's ``MatMulNBits`` loses it: the kernel computes ``(q - zp) * scale`` with an *integer* zero point, so
a block's offset ``m`` is rounded to a multiple of its step (a uniform shift of up to half a step over the whole
block), and symmetric int4 moves every weight to another grid. On SmolLM2-135M (a ``Q4_1`` GGUF) the builder's
int4 kept only 0.648 teacher-forced top-1 agreement with the fp32 model it came from. A float zero point would be
exact, but onnxruntime's CPU kernel then dequantizes the whole matrix on every call (~75x slower measured here).

The pass keeps the fast kernel and makes it exact: with ``zp = round(-m / d)`` (an integer in [0, 15]) the residual
``r = m + zp * d`` is one constant per (output, block). So

    x @ W.T = MatMulNBits(x; q, d, zp) + (x @ S) @ R.T

where ``S`` [K, K/32] sums each block of ``x`` and ``R`` [N, K/32] holds the residuals: two small matmuls (about
4% of the main one's multiply-adds) restore the offsets exactly. Weights that are not on such a grid (an ordinary
fp32 checkpoint) get the best affine 4-bit fit per block (min/max), and the same correction makes its offset
exact too. ``accuracy_level`` 4 lets the CPU kernel quantize activations to int8 at run time, as llama.cpp does
with its Q8 activations.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BITS = 4
LM_HEAD = "/lm_head/MatMul"  # the GenAI builder's name for the LM head's MatMul


@dataclass(frozen=True)
class Affine4:
    """One weight [K, N] (x @ W layout) as MatMulNBits tensors plus the offset residuals."""

    bits: int
    packed: np.ndarray  # uint8 [N, K/bs, bs * bits / 8]; 4-bit: two values per byte, low nibble first
    scales: np.ndarray  # float32 [N * K/bs]
    zero_points: np.ndarray  # uint8; 4-bit: [N * ceil((K/bs)/2)] packed like the weights, 8-bit: [N * K/bs]
    residual: np.ndarray  # float32 [K/bs, N]: added as (x @ S) @ residual
    grid_error: float  # max |dequantized - original| / max |original|: ~1e-7 when the weights were on the grid


def affine_blocks(w_nk: np.ndarray, block: int, bits: int = BITS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The min/max affine fit of a weight ``w_nk`` [N, K] in blocks of ``block`` along K: ``w ~ q * step + lo``.
    Returns ``q`` uint8 [N, K/block, block] in 0 .. 2**bits - 1, ``step`` and ``lo`` float32 [N, K/block]. On a
    ``Q4_1`` grid this is the grid itself (llama.cpp's fit puts each block's min and max on its ends)."""
    levels = 2**bits - 1
    n, k = w_nk.shape
    if k % block:
        raise ValueError(f"K={k} is not a multiple of the block size {block}")
    blocks = np.ascontiguousarray(w_nk, dtype=np.float32).reshape(n, k // block, block)
    lo, hi = blocks.min(-1), blocks.max(-1)
    step = (hi - lo) / levels
    step = np.where(step > 0, step, np.float32(1.0)).astype(np.float32)  # a constant block: q = 0, all in lo
    q = np.clip(np.rint((blocks - lo[..., None]) / step[..., None]), 0, levels).astype(np.uint8)
    return q, step, lo


def symmetric_grid(w_nk: np.ndarray, block: int, *, fp16_steps: bool = False) -> tuple[np.ndarray, np.ndarray,
                                                                                      np.ndarray]:
    """The min/max 4-bit fit of :func:`affine_blocks` split for kernels whose blocks are symmetric (XNNPACK,
    ai-edge-quantizer): ``w ~ d * q + o`` with ``q`` in -8 .. 7, so ``d * q`` goes to the 4-bit kernel and the
    offset ``o`` is added back through the block sums of the input. Both kernels store ``d`` as bf16 (LiteRT
    inside an fp16 field: ``fp16_steps``), so ``d`` is rounded so here (to nearest even, as torch and ml_dtypes
    do) and ``o`` is the least-squares offset for the rounded steps. Returns ``q`` float32 [N, K/block, block],
    ``d`` and ``o`` float32 [N, K/block]."""
    n, k = w_nk.shape
    q_u, step, _ = affine_blocks(w_nk, block, bits=4)
    bits = step.view(np.uint32)
    step = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) & np.uint32(0xFFFF0000)).view(np.float32)
    if fp16_steps:
        step = step.astype(np.float16).astype(np.float32)
    q = q_u.astype(np.float32) - 8
    blocks = np.asarray(w_nk, dtype=np.float32).reshape(n, k // block, block)
    # a constant block (all zero: a pruned neuron, a padding row) is all offset: q = -8 there would put 8 * step into
    # the offset row, whose 8-bit per-row scale then rounds every other block's small offset away, and make the
    # 4-bit path carry -8 * (sum of x) that the offset cancels through int8 activations
    q[blocks.min(-1) == blocks.max(-1)] = 0
    offset = (blocks - q * step[..., None]).mean(-1)
    return q, step, offset.astype(np.float32)


def quantize(w_kn: np.ndarray, block: int, bits: int = BITS) -> Affine4:
    """Block-wise affine fit (4 or 8 bits) of a MatMul weight ``w_kn`` [K, N], blocks of ``block`` along K."""
    levels = 2**bits - 1
    k, n = w_kn.shape
    nb = k // block
    q, step, lo = affine_blocks(w_kn.T, block, bits)
    blocks = np.ascontiguousarray(w_kn.T, dtype=np.float32).reshape(n, nb, block)
    zp = np.clip(np.rint(-lo / step), 0, levels).astype(np.uint8)
    residual = (lo + zp.astype(np.float32) * step).astype(np.float32)
    deq = (q.astype(np.float32) - zp[..., None]) * step[..., None] + residual[..., None]
    err = float(np.abs(deq - blocks).max() / max(float(np.abs(blocks).max()), 1e-30))
    if bits == 8:
        return Affine4(8, q, step.reshape(-1), zp.reshape(-1), np.ascontiguousarray(residual.T), err)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    zpad = np.zeros((n, nb + (nb % 2)), dtype=np.uint8)
    zpad[:, :nb] = zp
    zpacked = (zpad[:, 0::2] | (zpad[:, 1::2] << 4)).astype(np.uint8)
    return Affine4(4, packed, step.reshape(-1), zpacked.reshape(-1), np.ascontiguousarray(residual.T), err)


def block_sum_matrix(k: int, block: int) -> np.ndarray:
    """S [K, K/block]: x @ S sums each block of x."""
    s = np.zeros((k, k // block), dtype=np.float32)
    s[np.arange(k), np.arange(k) // block] = 1.0
    return s


@dataclass
class PassReport:
    converted: int = 0
    eight_bit: list[str] = field(default_factory=list)
    skipped: int = 0
    params: int = 0
    max_grid_error: float = 0.0
    on_grid: int = 0  # weights reproduced exactly (every block already on the grid: a 4-bit source)
    tied_embedding: bool = False  # the embedding table reads the LM head's quantized blocks (no fp32 copy left)

    def to_dict(self) -> dict[str, Any]:
        return {"matmuls_converted": self.converted, "matmuls_8bit": self.eight_bit,
                "matmuls_kept_fp32": self.skipped, "params": self.params,
                "max_relative_grid_error": self.max_grid_error, "matmuls_exact": self.on_grid, "tied_embedding_quantized": self.tied_embedding}


ON_GRID = 1e-5  # relative error below which a weight counts as already 4-bit (fp16 scales round at ~5e-4 * step)

#: (initializer name, block, bits) -> its blocks: what several conversions of one source graph share (a search's
#: candidates differ only in which matmuls keep fp32 activations, not in the blocks)
BlockCache = dict[tuple[str, int, int], Affine4]


class _Pass:
    """State of one conversion: the graph's initializers, how often each is read, and what replaces what."""

    def __init__(self, model: Any, block: int, accuracy_level: int, cache: BlockCache | None = None) -> None:
        self.g, self.block, self.accuracy_level = model.graph, block, accuracy_level
        self.cache: BlockCache = {} if cache is None else cache
        self.inits = {t.name: t for t in self.g.initializer}
        self.uses: dict[str, int] = {}
        for node in self.g.node:
            for i in node.input:
                self.uses[i] = self.uses.get(i, 0) + 1
        self.sums: dict[tuple[str, int], str] = {}  # (activation, K) -> its block sums, shared by q/k/v, gate/up
        self.quantized: dict[str, Affine4] = {}  # fp32 initializer -> its blocks (for a tied embedding)
        self.report = PassReport()

    def add_init(self, arr: np.ndarray, name: str) -> str:
        from onnx import numpy_helper

        if name not in self.inits:
            self.inits[name] = numpy_helper.from_array(arr, name)
            self.g.initializer.append(self.inits[name])
        return name

    def release(self, name: str) -> None:
        self.uses[name] -= 1

    def matmul(self, node: Any, w: Any, bits: int, accuracy_level: int) -> list[Any]:
        from onnx import helper, numpy_helper

        k, n = w.dims
        key = (w.name, self.block, bits)
        if key not in self.cache:  # the affine fit is 90% of a conversion (SmolLM2: 5.1 of 5.7 s)
            self.cache[key] = quantize(numpy_helper.to_array(w), self.block, bits)
        a = self.quantized[w.name] = self.cache[key]
        base = node.name.replace("/", "_").strip("_") or f"matmul{self.report.converted}"
        q, sc, zp, res = (self.add_init(v, f"{base}.{x}") for x, v in (
            ("q", a.packed), ("scales", a.scales), ("zp", a.zero_points), ("residual", a.residual)))
        x = node.input[0]
        out: list[Any] = []
        if (x, k) not in self.sums:
            self.sums[(x, k)] = f"{base}.block_sums"
            s_name = self.add_init(block_sum_matrix(k, self.block), f"block_sum_{k}_{self.block}")
            out.append(helper.make_node("MatMul", [x, s_name], [self.sums[(x, k)]], name=f"{base}/BlockSums"))
        main, corr = f"{base}.nbits_out", f"{base}.offset_out"
        out += [
            helper.make_node("MatMulNBits", [x, q, sc, zp], [main], name=f"{base}/MatMulNBits", domain="com.microsoft",
                             K=k, N=n, bits=a.bits, block_size=self.block, accuracy_level=accuracy_level),
            helper.make_node("MatMul", [self.sums[(x, k)], res], [corr], name=f"{base}/BlockOffsets"),
            helper.make_node("Add", [main, corr], list(node.output), name=f"{base}/AddOffsets"),
        ]
        self.release(w.name)
        r = self.report
        r.converted, r.params = r.converted + 1, r.params + k * n
        r.max_grid_error = max(r.max_grid_error, a.grid_error)
        r.on_grid += a.grid_error < ON_GRID
        return out

    def tied_gather(self, transpose: Any, gathers: list[Any]) -> list[Any]:
        """Transpose(W) -> Gather(ids), the builder's tied embedding, read from W's quantized blocks instead."""
        from onnx import TensorProto, helper

        w = transpose.input[0]
        a = self.quantized[w]
        k, n = self.inits[w].dims
        nb = k // self.block
        base = f"{w}.embedding"
        if a.bits == 8:
            data, zp = self.add_init(a.packed.reshape(n, k), f"{base}.q"), self.add_init(
                a.zero_points.reshape(n, nb), f"{base}.zp")
        else:  # UINT4 tensors pack two values per byte over the flattened tensor
            zps = np.zeros(n * nb + (n * nb) % 2, dtype=np.uint8)
            zps[: n * nb] = unpack_zero_points(a.zero_points, n, nb)
            for name, dims, raw in ((f"{base}.q", [n, k], a.packed.tobytes()),
                                    (f"{base}.zp", [n, nb], (zps[0::2] | (zps[1::2] << 4)).tobytes())):
                self.inits[name] = helper.make_tensor(name, TensorProto.UINT4, dims, raw, raw=True)
                self.g.initializer.append(self.inits[name])
            data, zp = f"{base}.q", f"{base}.zp"
        sc = self.add_init(a.scales.reshape(n, nb), f"{base}.scales")
        res = self.add_init(np.ascontiguousarray(a.residual.T), f"{base}.residual")
        spread = self.add_init(np.ascontiguousarray(block_sum_matrix(k, self.block).T), f"block_spread_{k}_{self.block}")
        out: list[Any] = []
        for i, gth in enumerate(gathers):
            ids, tag = gth.input[1], f"{base}{i}"
            out += [
                helper.make_node("GatherBlockQuantized", [data, ids, sc, zp], [f"{tag}.deq"], name=f"{tag}/Gather",
                                 domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=self.block,
                                 bits=a.bits),
                helper.make_node("Gather", [res, ids], [f"{tag}.res"], name=f"{tag}/GatherOffsets", axis=0),
                helper.make_node("MatMul", [f"{tag}.res", spread], [f"{tag}.offsets"], name=f"{tag}/SpreadOffsets"),
                helper.make_node("Add", [f"{tag}.deq", f"{tag}.offsets"], list(gth.output), name=f"{tag}/AddOffsets"),
            ]
        self.release(w)
        self.report.tied_embedding = True
        return out


def unpack_zero_points(packed: np.ndarray, n: int, nb: int) -> np.ndarray:
    rows = packed.reshape(n, -1)
    both = np.stack([rows & 0x0F, rows >> 4], axis=-1).reshape(n, -1)
    return np.ascontiguousarray(both[:, :nb]).reshape(-1)


def convert(model: Any, block: int = 32, accuracy_level: int = 4, skip: Iterable[str] = (),
            eight_bit: Iterable[str] = (LM_HEAD,), bits: int = BITS,
            node_accuracy: Mapping[str, int] | None = None, cache: BlockCache | None = None) -> PassReport:
    """Rewrite every MatMul whose second input is a 2-D float32 initializer with K % block == 0, in place; a
    tied embedding (``Transpose(W) -> Gather``, as the GenAI builder writes it) reads W's quantized blocks.

    Nodes named in ``eight_bit`` get 8-bit blocks: by default the LM head, as llama.cpp's Q4_K_M keeps its
    output matrix in 6 bits (it scores every token; on SmolLM2 a 4-bit head alone cost 0.84 -> see README).
    ``bits=8`` puts every weight in 8-bit blocks: a 4-bit grid is exactly on the 8-bit one (step / 17), so a 4-bit
    source stays exact there too. ``cache`` keeps each weight's blocks for the next conversion of the same source.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    from onnx import helper

    st = _Pass(model, block, accuracy_level, cache)
    skip, wide = set(skip), set(eight_bit)
    new_nodes: list[Any] = []
    for node in st.g.node:
        w = st.inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w is None or node.name in skip or len(w.dims) != 2 or w.dims[0] % block or w.data_type != 1:
            st.report.skipped += node.op_type == "MatMul"
            new_nodes.append(node)
            continue
        level = (node_accuracy or {}).get(node.name, accuracy_level)
        new_nodes += st.matmul(node, w, 8 if node.name in wide else bits, level)
        if node.name in wide and bits == 4:
            st.report.eight_bit.append(node.name)
    final: list[Any] = []
    replaced: set[int] = set()
    for node in new_nodes:
        if id(node) in replaced:
            continue
        gathers = [n for n in new_nodes if n.op_type == "Gather" and n.input[0] == node.output[0]
                   and all(a.i == 0 for a in n.attribute if a.name == "axis")] if node.op_type == "Transpose" else []
        readers = sum(node.output[0] in n.input for n in new_nodes) if gathers else 0
        perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
        if gathers and node.input[0] in st.quantized and readers == len(gathers) and perm == [[1, 0]]:
            final += st.tied_gather(node, gathers)
            replaced |= {id(g) for g in gathers}
            continue
        final.append(node)
    del st.g.node[:]
    st.g.node.extend(final)
    keep = [t for t in st.g.initializer if st.uses.get(t.name, 1) > 0 or t.name not in st.quantized]
    del st.g.initializer[:]
    st.g.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return st.report


def convert_file(src: Path, dst: Path, data_name: str, block: int = 32, accuracy_level: int = 4,
                 bits: int = BITS, node_accuracy: Mapping[str, int] | None = None,
                 skip: Iterable[str] = (), cache: BlockCache | None = None) -> PassReport:
    """Load ``src`` (with its external data), convert, save to ``dst`` with the weights in ``data_name`` beside it."""
    import onnx

    model = onnx.load(str(src), load_external_data=True)
    report = convert(model, block=block, accuracy_level=accuracy_level, bits=bits, node_accuracy=node_accuracy,
                     skip=skip, cache=cache)
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name,
                    size_threshold=1024)
    return report
