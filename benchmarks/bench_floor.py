"""The hardware floor of all-MiniLM-L6-v2 on this machine: what the fastest possible artifact would take.

    python benchmarks/bench_floor.py                 # machine peaks + the model's cost by op, dense 128 tokens
    python benchmarks/bench_floor.py --threads 2 --seq 128 --json floor.json

Measured, not looked up:

* **fp32 GEMM peak**: ``torch.mm`` on 1024^3 (and at MiniLM's own FFN shape, 128x384x1536).
* **int8 GEMM peak**: ONNX Runtime ``MatMulInteger`` (u8 x s8 -> s32, MLAS with VNNI where the CPU has it)
  on the same shapes: the kernels int8 artifacts run.
* **memory bandwidth**: a 256 MB ``numpy.copyto`` (bytes read + written per second; one thread).

The model's cost comes from PyTorch itself (``torch.utils.flop_counter`` on one dense input): FLOPs
per op kind, and the bytes each linear layer's weights take in fp32 and int8. The floor of an
artifact is, per op kind, the larger of its FLOPs at the matching peak (linears at the int8 peak
when the recipe quantizes them, attention matmuls always at fp32: every artifact here keeps them
float) and its weight bytes at the bandwidth; elementwise work (norms, GELU, softmax) is left out,
so the floor is a lower bound. ``bench_minilm.py`` prints each artifact's percent of it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

INT8_RECIPES = ("int8-dynamic", "int8-static", "int4-weight", "npu")  # their linears run int8 dot products


def _best_s(fn: Callable[[], object], min_s: float = 0.3, reps: int = 3) -> float:
    """Fastest of a few timed batches (the floor is what the machine can do, not what it did under load)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_s / reps:
                break
        best = min(best, dt / n)
    return best


@dataclass(frozen=True)
class Peaks:
    threads: int
    fp32_gflops: float  # 1024^3 torch.mm
    int8_gops: float  # 1024^3 MatMulInteger
    fp32_gflops_model_shape: float  # 128 x 384 x 1536
    int8_gops_model_shape: float
    copy_gbps: float  # bytes read + written per second
    int8_kernel: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fp32_gflops(m: int, k: int, n: int) -> float:
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    with torch.inference_mode():
        return 2 * m * k * n / _best_s(lambda: torch.mm(a, b)) / 1e9


def _int8_gops(m: int, k: int, n: int, threads: int) -> float:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), "w")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    return 2 * m * k * n / _best_s(lambda: sess.run(None, {"a": a})) / 1e9


def _copy_gbps() -> float:
    src = np.ones(64 * 2**20, np.float32)  # 256 MB: far past any cache
    dst = np.empty_like(src)
    return 2 * src.nbytes / _best_s(lambda: np.copyto(dst, src), min_s=0.6) / 1e9


def measure_peaks(threads: int) -> Peaks:
    import torch

    torch.set_num_threads(threads)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    kernel = "MLAS u8s8 " + ("AVX-512 VNNI" if "avx512_vnni" in flags else "AVX-VNNI" if "avx_vnni" in flags
                             else "without VNNI")
    return Peaks(threads, _fp32_gflops(1024, 1024, 1024), _int8_gops(1024, 1024, 1024, threads),
                 _fp32_gflops(128, 384, 1536), _int8_gops(128, 384, 1536, threads), _copy_gbps(), kernel)


@dataclass(frozen=True)
class ModelCost:
    seq: int
    gflop_by_op: dict[str, float]  # linear (weights), attention (QK^T and AV), other matmuls
    linear_gflop_by_layer: dict[str, float] = field(default_factory=dict)
    weight_mb_fp32: float = 0.0
    weight_mb_int8: float = 0.0

    @property
    def gflop(self) -> float:
        return sum(self.gflop_by_op.values())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gflop": self.gflop}


def model_cost(lm: Any, feeds: dict[str, np.ndarray]) -> ModelCost:
    """FLOPs of one inference by op kind, counted by PyTorch on the real module (batch 1)."""
    import torch
    from torch import nn
    from torch.utils.flop_counter import FlopCounterMode

    linears = {n: m for n, m in lm.module.named_modules() if isinstance(m, nn.Linear)}
    per_layer: dict[str, float] = {}
    hooks = []
    for name, lin in linears.items():
        def rec(m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor, name: str = name) -> None:
            tokens = args[0].numel() // args[0].shape[-1]
            per_layer[name] = 2 * tokens * m.in_features * m.out_features / 1e9
        hooks.append(lin.register_forward_hook(rec))
    counter = FlopCounterMode(display=False)
    try:
        with torch.inference_mode(), counter:
            lm.module(*lm.torch_args(feeds))
    finally:
        for h in hooks:
            h.remove()
    total = counter.get_total_flops() / 1e9
    by_op = {str(k): v / 1e9 for k, v in counter.get_flop_counts().get("Global", {}).items()}
    lin = sum(per_layer.values())
    attention = sum(v for k, v in by_op.items() if "bmm" in k or "baddbmm" in k)
    other = max(0.0, total - lin - attention)
    w32 = sum(m.weight.numel() * 4 for m in linears.values()) / 2**20
    return ModelCost(int(feeds["input_ids"].shape[1]) if "input_ids" in feeds else 0,
                     {"linear": lin, "attention": attention, "other matmuls": other}, per_layer, w32, w32 / 4)


def floor_ms(cost: ModelCost, peaks: Peaks, recipe: str, kept_in_float: Sequence[str] = ()) -> float:
    """Lower bound on one inference's latency for an artifact of ``recipe`` (kept layers run at the fp32 peak)."""
    int8 = recipe in INT8_RECIPES
    kept = sum(cost.linear_gflop_by_layer.get(k, 0.0) for k in kept_in_float) if int8 else 0.0
    lin_q = cost.gflop_by_op["linear"] - kept if int8 else 0.0
    lin_f = cost.gflop_by_op["linear"] - lin_q
    compute_s = (lin_q / peaks.int8_gops + (lin_f + cost.gflop_by_op["attention"]
                                            + cost.gflop_by_op["other matmuls"]) / peaks.fp32_gflops)
    weights_mb = cost.weight_mb_int8 if int8 else cost.weight_mb_fp32
    memory_s = weights_mb * 2**20 / (peaks.copy_gbps * 1e9 / 2)  # weights read once: half a copy's traffic
    return 1000 * max(compute_s, memory_s)


def describe(peaks: Peaks, cost: ModelCost) -> str:
    lines = [
        f"machine ({peaks.threads} threads; best of repeated batches, so a shared machine reads low, not high):",
        f"  fp32 GEMM  {peaks.fp32_gflops:7.1f} GFLOP/s at 1024^3, {peaks.fp32_gflops_model_shape:7.1f} at 128x384x1536"
        " (torch.mm)",
        f"  int8 GEMM  {peaks.int8_gops:7.1f} GOP/s   at 1024^3, {peaks.int8_gops_model_shape:7.1f} at 128x384x1536"
        f" (onnxruntime MatMulInteger, {peaks.int8_kernel})",
        f"  memory     {peaks.copy_gbps:7.1f} GB/s copy (read + write, one thread)",
        f"all-MiniLM-L6-v2, batch 1, {cost.seq} tokens: {cost.gflop:.2f} GFLOP = "
        + ", ".join(f"{k} {v:.2f}" for k, v in cost.gflop_by_op.items())
        + f"; linear weights {cost.weight_mb_fp32:.1f} MB fp32 / {cost.weight_mb_int8:.1f} MB int8",
        f"  floor: fp32 {floor_ms(cost, peaks, 'fp32'):.2f} ms, int8 linears {floor_ms(cost, peaks, 'int8-dynamic'):.2f}"
        " ms (FLOPs at the peaks; elementwise ops not counted, so a lower bound)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--seq", type=int, default=128, help="dense tokens per input")
    ap.add_argument("--json", help="write the numbers here")
    a = ap.parse_args(argv)

    from edgeship.export_steps import builtin_corpus
    from edgeship.models import default_model_dir, load_hf_dir

    lm = load_hf_dir(default_model_dir())
    corpus = builtin_corpus()
    enc = lm.tokenizer(" ".join(corpus), truncation=True, max_length=a.seq, return_tensors="np")
    feeds = {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
    cost = model_cost(lm, feeds)
    peaks = measure_peaks(a.threads)
    print(describe(peaks, cost))
    if a.json:
        Path(a.json).write_text(json.dumps({"peaks": peaks.to_dict(), "model": cost.to_dict()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
