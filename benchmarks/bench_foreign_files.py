"""The runner on model files edgeship did not export, against a bare runtime loop on the same file.

    python benchmarks/bench_foreign_files.py [--runs 300] [--threads 1] [--tolerance 0.05]

Files shaped like the ones in the wild, made here without TensorFlow, the tests' files at a size
where inference rather than the Python call is timed: a signature-less float ``.tflite`` (our
export of an MLP with its SignatureDef stripped), a signature-less uint8-I/O ``.tflite`` run at
batch 64 (its batch dim is dynamic), an ``.onnx`` whose dims are all ``?`` (given
``--shape x=1x3x224x224``), and a two-method ``.pte``. The [export] extra makes the float
``.tflite`` and the ``.pte``; without it those two are skipped.
For each, ``edgeship profile`` (a fresh worker process, as users run it) and a bare loop of
the runtime's own calls (``set_tensor``/``invoke``/``get_tensor``, ``session.run``,
``method.execute``) in another fresh process each time the same number of runs after the same
warm-up; the check is that the medians agree within ``--tolerance``. Runs alternate
(runner, bare, runner, bare...) and the closest pair of rounds is kept, so a neighbour's burst
on a shared machine hits both sides. Exit code 1 when a file disagrees.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests/profiling/tflite_data"

# a bare loop, run in its own process: the runtime's calls and nothing of edgeship's
_BARE = r'''
import json, sys, time
import numpy as np
kind, path, shape, runs, warmup, threads = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), *map(int, sys.argv[4:7])
rng = np.random.default_rng(0)
if kind == "tflite":
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path=path, num_threads=threads)
    ins, outs = it.get_input_details(), it.get_output_details()
    feeds = []
    for d in ins:
        dims = shape.get(d["name"], [int(x) for x in d["shape"]])
        if list(dims) != [int(x) for x in d["shape"]]:
            it.resize_tensor_input(d["index"], dims)
        dt = np.dtype(d["dtype"])
        feeds.append((d["index"], rng.integers(0, 100, dims).astype(dt) if dt.kind in "iu" else
                      rng.standard_normal(dims).astype(dt)))
    it.allocate_tensors()
    def once():
        for i, v in feeds:
            it.set_tensor(i, v)
        it.invoke()
        return [it.get_tensor(d["index"]) for d in outs]
elif kind == "onnx":
    import onnxruntime as ort
    so = ort.SessionOptions(); so.intra_op_num_threads = threads; so.inter_op_num_threads = 1
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feeds = {i.name: rng.standard_normal(shape[i.name]).astype(np.float32) for i in s.get_inputs()}
    once = lambda: s.run(None, feeds)
else:
    import torch
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime
    portable_lib._unsafe_reset_threadpool(threads)
    m = Runtime.get().load_program(path).load_method("forward")
    meta = m.metadata.input_tensor_meta(0)
    args = [torch.from_numpy(rng.standard_normal(list(meta.sizes())).astype(np.float32))]
    once = lambda: m.execute(args)
for _ in range(warmup):
    once()
t = []
for _ in range(runs):
    t0 = time.perf_counter_ns(); once(); t.append(time.perf_counter_ns() - t0)
print(json.dumps({"p50_ms": float(np.median(t)) / 1e6}))
'''


def _onnx_file(path: Path) -> Path:
    """x [?, 3, ?, ?] -> 3x3 conv to 16 channels -> global average pool -> [?, 16] @ W: every dim anonymous."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "k"),
             numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w")]
    nodes = [helper.make_node("Conv", ["x", "k"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["?", 3, "?", "?"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["?", 4])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    onnx.save(m, str(path))
    return path


def _pte_file(path: Path) -> Path | None:
    try:
        import torch
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError:
        return None
    torch.manual_seed(0)
    eps = {"forward": torch.export.export(_mlp(), (torch.randn(64, 256),)),
           "head": torch.export.export(torch.nn.Linear(8, 4).eval(), (torch.randn(1, 8),))}
    path.write_bytes(to_edge_transform_and_lower(eps, partitioner=[XnnpackPartitioner()]).to_executorch().buffer)
    return path


def _mlp() -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256)).eval()


def _make_nosig() -> Any:
    spec = importlib.util.spec_from_file_location("make_nosig", DATA / "make_nosig.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _stripped_export(tmp: Path) -> Path | None:
    """Our own .tflite export of an MLP (batch 64 x 256), its SignatureDef stripped: where inference, not the
    Python call, is what is timed (the committed tiny test file runs in ~2 us, all call overhead)."""
    try:
        from edgeship.pipeline import export
    except ImportError:
        return None
    x = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    r = export(_mlp(), example_inputs={"x": x}, target="raspberry-pi-5", out=tmp / "mlp", formats=["tflite"],
               recipes=["fp32"], log=lambda m: None)
    _make_nosig().strip_signatures(r.bundle / "tflite/fp32.tflite", tmp / "mlp_nosig.tflite")
    return tmp / "mlp_nosig.tflite"


def _uint8_file(tmp: Path) -> Path:
    """The uint8-I/O graph of the test file, with a 512 x 512 layer."""
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((512, 512)).astype(np.float32) * 0.05, rng.standard_normal(512).astype(np.float32)
    (tmp / "uint8_io.tflite").write_bytes(_make_nosig().uint8_model(w, b))
    return tmp / "uint8_io.tflite"


def _runner_p50(path: Path, shapes: dict[str, list[int]], runs: int, warmup: int, threads: int) -> float:
    from edgeship.profiling.runner import profile

    (r,) = profile(path, runs=runs, min_seconds=0.0, warmup=warmup, threads=threads, energy="off", progress=False,
                   shapes={k: tuple(v) for k, v in shapes.items()}).results
    if not r.ok or r.latency is None:
        raise SystemExit(f"{path.name}: the runner failed: {r.error}")
    return r.latency.p50_ms


def _bare_p50(kind: str, path: Path, shapes: dict[str, list[int]], runs: int, warmup: int, threads: int) -> float:
    out = subprocess.run([sys.executable, "-c", _BARE, kind, str(path), json.dumps(shapes), str(runs), str(warmup),
                          str(threads)], capture_output=True, text=True, check=True, timeout=600)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["p50_ms"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tolerance", type=float, default=0.05)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="edgeship-bench-foreign-"))
    cases: list[tuple[str, str, Path | None, dict[str, list[int]]]] = [
        ("signature-less float .tflite", "tflite", _stripped_export(tmp), {}),
        ("signature-less uint8 .tflite", "tflite", _uint8_file(tmp), {"pixels": [64, 512]}),
        ("anonymous-dim .onnx", "onnx", _onnx_file(tmp / "anon.onnx"), {"x": [1, 3, 224, 224]}),
        ("two-method .pte", "pte", _pte_file(tmp / "two.pte"), {}),
    ]
    print(f"{a.runs} runs after {a.warmup} warm-up, {a.threads} thread(s), best-agreeing of {a.rounds} rounds")
    bad = 0
    for label, kind, path, shapes in cases:
        if path is None:
            print(f"{label:30s} skipped: needs the [export] extra to make the file")
            continue
        pairs = [(_runner_p50(path, shapes, a.runs, a.warmup, a.threads),
                  _bare_p50(kind, path, shapes, a.runs, a.warmup, a.threads)) for _ in range(a.rounds)]
        runner, bare = min(pairs, key=lambda p: abs(p[0] / p[1] - 1))
        ok = abs(runner / bare - 1) <= a.tolerance
        bad += not ok
        print(f"{label:30s} runner p50 {runner:8.4f} ms   bare loop p50 {bare:8.4f} ms   "
              f"{(runner / bare - 1) * 100:+5.1f}%  {'ok' if ok else 'DISAGREE'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
