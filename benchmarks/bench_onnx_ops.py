"""ONNX Runtime kernel time by op type for every ONNX artifact of a MiniLM bundle, at 128 dense tokens.

    python benchmarks/bench_onnx_ops.py B [--runs 24] [--threads 2]

Each artifact runs with its own manifest options (graph_optimization "all", the disabled fusions, flush
denormals to zero), the way the runner loads it, under ORT's profiler (``SessionOptions.enable_profiling``).
Prints each op type's kernel milliseconds per inference and node count, most expensive first; this is how
int8-static's 9.4 ms against int8-dynamic's 4.9 ms was taken apart (README, Benchmarks). Artifacts run one after
the other, not interleaved: on a shared machine compare op shares within one artifact, not totals across them.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def op_times(path: Path, options: dict[str, Any], feeds: list[dict[str, np.ndarray]], runs: int,
             threads: int, workdir: Path) -> tuple[dict[str, float], dict[str, int]]:
    """Kernel ms per inference and nodes per inference, by op type."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[options.get("graph_optimization", "all")]
    if options.get("denormal_as_zero"):
        so.add_session_config_entry("session.set_denormal_as_zero", "1")
    so.enable_profiling = True
    so.profile_file_prefix = str(workdir / path.stem)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(options.get("disabled_optimizers", [])) or None)
    for i in range(runs):
        sess.run(None, feeds[i % len(feeds)])
    events = json.loads(Path(sess.end_profiling()).read_text())
    ms: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.defaultdict(int)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            ms[e["args"]["op_name"]] += e["dur"] / 1000 / runs
            count[e["args"]["op_name"]] += 1
    return dict(ms), {k: v // runs for k, v in count.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--runs", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=10)
    a = ap.parse_args(argv)

    import bench_minilm  # the sibling script: python benchmarks/bench_onnx_ops.py puts benchmarks/ on sys.path

    from edgeship.export_steps import builtin_corpus
    from edgeship.manifest import load_bundle
    from edgeship.models import default_model_dir, load_hf_dir

    bundle = load_bundle(Path(a.bundle))
    feeds = bench_minilm._regimes(load_hf_dir(default_model_dir()), builtin_corpus(), 8)["dense-128"]
    with tempfile.TemporaryDirectory(prefix="edgeship-ops-") as tmp:
        for art in bundle.manifest.artifacts:
            if art.format != "onnx":
                continue
            ms, count = op_times(bundle.path_of(art), dict(art.runtime.get("options", {})), feeds, a.runs, a.threads,
                                 Path(tmp))
            print(f"\n{art.key}: {sum(ms.values()):.2f} ms kernel time per inference (128 dense tokens, "
                  f"{a.threads} threads, {a.runs} runs)")
            for op, t in sorted(ms.items(), key=lambda kv: -kv[1])[:a.top]:
                print(f"  {op:28s} {t:7.3f} ms  x{count[op]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
