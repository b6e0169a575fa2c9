"""PyTorch eager fp32 vs every artifact of a real all-MiniLM-L6-v2 bundle, same inputs, one process.

    python benchmarks/bench_minilm.py                          # export ONNX fp32/int8-dynamic/int8-static/int4, then time
    python benchmarks/bench_minilm.py --formats onnx tflite pte --recipes fp32 int8-dynamic
    python benchmarks/bench_minilm.py --bundle B               # time an existing bundle
    python benchmarks/bench_minilm.py --formats pte --target galaxy-s24 --recipes fp32 int8-dynamic int4-weight
                                                               # the ExecuTorch (.pte, XNNPACK) rows
    python benchmarks/bench_minilm.py --formats tflite --target raspberry-pi-5 \
        --recipes fp32 fp16 int8-dynamic int8-static int4-weight   # every LiteRT (.tflite) recipe

Timing is interleaved (round-robin over candidates, several rounds) so that background load
on a shared machine hits every candidate alike; each figure is the median over all rounds.
The speed-up is eager median / artifact median on the same padded batch-1, 128-token input.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _time(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t) / 1e6)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="existing bundle to time (default: export one into a temp dir)")
    ap.add_argument("--formats", nargs="+", default=["onnx"])
    ap.add_argument("--recipes", nargs="+", default=["fp32", "int8-dynamic", "int8-static", "int4-weight"])
    ap.add_argument("--target", default="x86-64-laptop")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--per-round", type=int, default=25)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)

    import torch

    from edgeship.manifest import load_bundle
    from edgeship.models import default_model_dir, load_hf_dir
    from edgeship.pipeline import export
    from edgeship.profiling import backends

    torch.set_num_threads(a.threads)
    tmp = None
    if a.bundle:
        bundle_dir = Path(a.bundle)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="edgeship-bench-")
        bundle_dir = Path(tmp.name) / "minilm"
        t0 = time.perf_counter()
        export(default_model_dir(), target=a.target, out=bundle_dir, formats=a.formats, recipes=a.recipes)
        print(f"exported in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    bundle = load_bundle(bundle_dir)
    with np.load(bundle_dir / bundle.manifest.samples["inputs"]) as z:
        feeds = {k: z[k][:1] for k in z.files}

    lm = load_hf_dir(default_model_dir())
    args = lm.torch_args(feeds)
    fp32_size = sum(p.numel() * p.element_size() for p in lm.module.parameters())

    def eager() -> object:
        with torch.inference_mode():
            return lm.module(*args)

    candidates: dict[str, tuple[Callable[[], object], dict[str, object]]] = {
        "pytorch-eager/fp32": (eager, {"size_mb": fp32_size / 2**20, "mean_cosine": 1.0, "min_cosine": 1.0}),
    }
    for art in bundle.manifest.artifacts:
        b = backends.load(bundle.path_of(art), art.format, threads=a.threads, options=art.runtime.get("options", {}))
        f = b.adapt_feeds(feeds)
        fid = art.fidelity
        candidates[art.key] = ((lambda b=b, f=f: b.run(f)), {
            "size_mb": art.size_bytes / 2**20, "mean_cosine": fid.mean_cosine if fid else None,
            "min_cosine": fid.min_cosine if fid else None,
            "kept_in_float": len(art.quantization.get("kept_in_float", []))})
    samples: dict[str, list[float]] = {k: [] for k in candidates}
    for fn, _ in candidates.values():
        _time(fn, 5)  # warm-up
    for _ in range(a.rounds):
        for k, (fn, _) in candidates.items():
            samples[k].extend(_time(fn, a.per_round))
    eager_ms = float(np.median(samples["pytorch-eager/fp32"]))
    rows = []
    for k, (_, meta) in candidates.items():
        ms = float(np.median(samples[k]))
        rows.append({"candidate": k, "median_ms": ms, "p90_ms": float(np.percentile(samples[k], 90)),
                     "speedup_vs_eager": eager_ms / ms, **meta})
    print(f"all-MiniLM-L6-v2, batch 1 x 128 tokens, {a.threads} threads, {a.rounds} x {a.per_round} runs each "
          f"(interleaved), {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{'candidate':24s} {'MB':>6s} {'median ms':>9s} {'p90 ms':>7s} {'speed-up':>8s} {'mean cos':>8s} {'min cos':>8s}")
    for r in rows:
        mc = "-" if r["mean_cosine"] is None else f"{r['mean_cosine']:.4f}"
        mn = "-" if r["min_cosine"] is None else f"{r['min_cosine']:.4f}"
        print(f"{r['candidate']:24s} {r['size_mb']:6.1f} {r['median_ms']:9.2f} {r['p90_ms']:7.2f} "
              f"{r['speedup_vs_eager']:7.2f}x {mc:>8s} {mn:>8s}")
    if a.json:
        Path(a.json).write_text(json.dumps({"threads": a.threads, "rows": rows}, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
