"""ONNX Runtime: contrib SkipLayerNormalization vs Add + LayerNormalization on a BERT-sized activation.

    python benchmarks/bench_ort_skiplayernorm.py [--hidden 384] [--tokens 128] [--threads 1]

Why edgeship's fused ONNX graphs keep Add + LayerNormalization (exporters/onnx.py, FUSED_RUNTIME).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper


def _model(nodes: list[onnx.NodeProto], hidden: int, tokens: int) -> bytes:
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, tokens, hidden]) for n in ("x", "skip")]
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, tokens, hidden])]
    init = [helper.make_tensor("g", TensorProto.FLOAT, [hidden], np.ones(hidden, np.float32)),
            helper.make_tensor("b", TensorProto.FLOAT, [hidden], np.zeros(hidden, np.float32))]
    g = helper.make_graph(nodes, "g", io, out, init)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return m.SerializeToString()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=2000)
    a = ap.parse_args()
    variants = {
        "SkipLayerNormalization": [helper.make_node("SkipLayerNormalization", ["x", "skip", "g", "b"], ["y"],
                                                    domain="com.microsoft", epsilon=1e-12)],
        "Add + LayerNormalization": [helper.make_node("Add", ["x", "skip"], ["s"]),
                                     helper.make_node("LayerNormalization", ["s", "g", "b"], ["y"], epsilon=1e-12)],
    }
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((1, a.tokens, a.hidden)).astype(np.float32) for n in ("x", "skip")}
    print(f"onnxruntime {ort.__version__}, [1, {a.tokens}, {a.hidden}], {a.threads} thread(s)")
    for name, nodes in variants.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = a.threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        s = ort.InferenceSession(_model(nodes, a.hidden, a.tokens), so)
        for _ in range(100):
            s.run(None, feeds)
        t = time.perf_counter()
        for _ in range(a.iters):
            s.run(None, feeds)
        print(f"{name:26s} {(time.perf_counter() - t) / a.iters * 1e6:8.1f} us per call")


if __name__ == "__main__":
    main()
