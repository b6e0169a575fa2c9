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

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BITS = 4


@dataclass(frozen=True)
class Affine4:
    """One weight [K, N] (x @ W layout) as MatMulNBits tensors plus the offset residuals."""

    bits: int
    packed: np.ndarray  # uint8 [N, K/bs, bs * bits / 8]; 4-bit: two values per byte, low nibble first
    scales: np.ndarray  # float32 [N * K/bs]
    zero_points: np.ndarray  # uint8; 4-bit: [N * ceil((K/bs)/2)] packed like the weights, 8-bit: [N * K/bs]
    residual: np.ndarray  # float32 [K/bs, N]: added as (x @ S) @ residual
    grid_error: float  # max |dequantized - original| / max |original|: ~1e-7 when the weights were on the grid


def quantize(w_kn: np.ndarray, block: int, bits: int = BITS) -> Affine4:
    """Block-wise affine fit (4 or 8 bits) of a MatMul weight ``w_kn`` [K, N], blocks of ``block`` along K."""
    levels = 2**bits - 1
    k, n = w_kn.shape
    if k % block:
        raise ValueError(f"K={k} is not a multiple of the block size {block}")
    nb = k // block
    blocks = np.ascontiguousarray(w_kn.T, dtype=np.float32).reshape(n, nb, block)
    lo, hi = blocks.min(-1), blocks.max(-1)
    step = (hi - lo) / levels
    step = np.where(step > 0, step, np.float32(1.0)).astype(np.float32)  # a constant block: q = 0, all in lo
    q = np.clip(np.rint((blocks - lo[..., None]) / step[..., None]), 0, levels).astype(np.uint8)
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

    def to_dict(self) -> dict[str, Any]:
        return {"matmuls_converted": self.converted, "matmuls_8bit": self.eight_bit,
                "matmuls_kept_fp32": self.skipped, "params": self.params,
                "max_relative_grid_error": self.max_grid_error, "matmuls_exact": self.on_grid}


ON_GRID = 1e-5  # relative error below which a weight counts as already 4-bit (fp16 scales round at ~5e-4 * step)


def convert(model: Any, block: int = 32, accuracy_level: int = 4, skip: Iterable[str] = (),
            eight_bit: Iterable[str] = ("/lm_head/MatMul",), bits: int = BITS) -> PassReport:
    """Rewrite every MatMul whose second input is a 2-D float32 initializer with K % block == 0, in place.

    Nodes named in ``eight_bit`` get 8-bit blocks: by default the LM head, as llama.cpp's Q4_K_M keeps its
    output matrix in 6 bits (it scores every token; on SmolLM2 a 4-bit head alone cost 0.84 -> see README).
    ``bits=8`` puts every weight in 8-bit blocks: a 4-bit grid is exactly on the 8-bit one (step / 17), so a 4-bit
    source stays exact there too."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    uses: dict[str, int] = {}
    for node in g.node:
        for i in node.input:
            uses[i] = uses.get(i, 0) + 1
    skip, wide = set(skip), set(eight_bit)
    report = PassReport()
    new_nodes: list[Any] = []
    sums: dict[tuple[str, int], str] = {}  # (activation, K) -> its block sums, shared by q/k/v and gate/up
    drop: set[str] = set()
    for node in g.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w is None or node.name in skip or len(w.dims) != 2 or w.dims[0] % block or w.data_type != 1:
            if node.op_type == "MatMul":
                report.skipped += 1
            new_nodes.append(node)
            continue
        arr = numpy_helper.to_array(w)
        k, n = arr.shape
        a = quantize(arr, block, 8 if node.name in wide else bits)
        if a.bits == 8 and bits == 4:
            report.eight_bit.append(node.name)
        base = node.name.replace("/", "_").strip("_") or f"matmul{report.converted}"
        names = {x: f"{base}.{x}" for x in ("q4", "scales", "zp", "residual")}
        g.initializer.extend([
            numpy_helper.from_array(a.packed, names["q4"]), numpy_helper.from_array(a.scales, names["scales"]),
            numpy_helper.from_array(a.zero_points, names["zp"]), numpy_helper.from_array(a.residual, names["residual"])])
        x = node.input[0]
        key = (x, k)
        if key not in sums:
            s_name = f"block_sum_{k}_{block}"
            if s_name not in inits:
                inits[s_name] = numpy_helper.from_array(block_sum_matrix(k, block), s_name)
                g.initializer.append(inits[s_name])
            sums[key] = f"{base}.block_sums"
            new_nodes.append(helper.make_node("MatMul", [x, s_name], [sums[key]], name=f"{base}/BlockSums"))
        main, corr = f"{base}.nbits_out", f"{base}.offset_out"
        new_nodes += [
            helper.make_node("MatMulNBits", [x, names["q4"], names["scales"], names["zp"]], [main],
                             name=f"{base}/MatMulNBits", domain="com.microsoft", K=k, N=n, bits=a.bits,
                             block_size=block, accuracy_level=accuracy_level),
            helper.make_node("MatMul", [sums[key], names["residual"]], [corr], name=f"{base}/BlockOffsets"),
            helper.make_node("Add", [main, corr], list(node.output), name=f"{base}/AddOffsets"),
        ]
        uses[w.name] -= 1
        if uses[w.name] == 0:
            drop.add(w.name)
        report.converted += 1
        report.params += k * n
        report.max_grid_error = max(report.max_grid_error, a.grid_error)
        report.on_grid += a.grid_error < ON_GRID
    del g.node[:]
    g.node.extend(new_nodes)
    keep = [t for t in g.initializer if t.name not in drop]
    del g.initializer[:]
    g.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return report


def convert_file(src: Path, dst: Path, data_name: str, block: int = 32, accuracy_level: int = 4,
                 bits: int = BITS) -> PassReport:
    """Load ``src`` (with its external data), convert, save to ``dst`` with the weights in ``data_name`` beside it."""
    import onnx

    model = onnx.load(str(src), load_external_data=True)
    report = convert(model, block=block, accuracy_level=accuracy_level, bits=bits)
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name,
                    size_threshold=1024)
    return report
