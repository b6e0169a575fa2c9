"""PyTorch eager fp32 vs every artifact of a real all-MiniLM-L6-v2 bundle, same inputs, one process.

    python benchmarks/bench_minilm.py                          # export ONNX fp32/int8-dynamic/int8-static/int4, then time
    python benchmarks/bench_minilm.py --formats onnx tflite pte --recipes fp32 int8-dynamic
    python benchmarks/bench_minilm.py --bundle B               # time an existing bundle
    python benchmarks/bench_minilm.py --bundle B --anchors /tmp/anchors   # and the anchor pipelines (issue 12)
    python benchmarks/bench_minilm.py --formats pte --target galaxy-s24 --recipes fp32 int8-dynamic int4-weight
                                                               # the ExecuTorch (.pte, XNNPACK) rows
    python benchmarks/bench_minilm.py --formats tflite --target raspberry-pi-5 \
        --recipes fp32 fp16 int8-dynamic int8-static int4-weight   # every LiteRT (.tflite) recipe

Three input regimes, each timed on the same batch-1 inputs for every candidate:

* ``sentences``: real sentences from the built-in corpus at their own token length, as an app
  sends them to a dynamic-shape artifact (ONNX, .pte) and to PyTorch. LiteRT graphs are static,
  so they get the sentence right-padded to their length (a real cost of static shapes).
* ``padded-128``: the same sentences padded to 128 tokens, the bundle's default tokenizer
  settings. ONNX graphs slice trailing padding off themselves (exact); PyTorch runs all 128.
* ``dense-128``: 128 real tokens each, so nothing is padding: the compute-bound comparison.

The dense-128 table also gives each candidate's hardware floor and percent of it (``bench_floor.py``:
measured GEMM peaks and bandwidth of this machine, the model's FLOPs by op; ``--no-floor`` skips it).

Timing is interleaved (round-robin over candidates, several rounds) so that background load
on a shared machine hits every candidate alike; each figure is the median over all rounds of
one pass over the regime's texts, divided by the number of texts. Speed-up = eager / artifact.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def _time(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t) / 1e6)
    return out


REGIMES = {
    "sentences": "real sentences at their own length (dynamic-shape artifacts take them unpadded)",
    "padded-128": "the same sentences padded to 128 tokens (the bundle's default tokenizer settings)",
    "dense-128": "128 real tokens each (long text): no padding anywhere, the compute-bound case",
}


def _regimes(lm: Any, corpus: list[str], n: int) -> dict[str, list[dict[str, np.ndarray]]]:
    tok = lm.tokenizer
    texts = corpus[:n]
    long = [" ".join(corpus[i:] + corpus[:i]) for i in range(n)]

    def enc(items: list[str], padding: bool | str) -> list[dict[str, np.ndarray]]:
        out = []
        for t in items:
            e = tok(t, padding=padding, truncation=True, max_length=128, return_tensors="np")
            out.append({"input_ids": e["input_ids"].astype(np.int64), "attention_mask": e["attention_mask"].astype(np.int64)})
        return out
    dense = enc(long, False)
    assert all(f["attention_mask"].sum() == 128 for f in dense)
    return {"sentences": enc(texts, False), "padded-128": enc(texts, "max_length"), "dense-128": dense}


def _static_len(b: Any) -> int | None:
    dims = [s.shape[1] for s in b.inputs if len(s.shape) == 2]
    return dims[0] if dims and isinstance(dims[0], int) else None


def _fit(feeds: dict[str, np.ndarray], b: Any) -> dict[str, np.ndarray]:
    """Right-pad token inputs to a static-shape artifact's sequence length (LiteRT graphs are static)."""
    n = _static_len(b)
    if n is None:
        return feeds
    return {k: np.pad(v, ((0, 0), (0, n - v.shape[1]))) for k, v in feeds.items()}


def _add_anchors(lm: Any, cache: Path, threads: int, regimes: dict[str, list[dict[str, np.ndarray]]],
                 runners: dict[str, Callable[[str], Callable[[], object]]], meta: dict[str, dict[str, object]]) -> None:
    """The anchor pipelines as candidates, their fidelity measured on the bundle's own 64 held-out inputs."""
    import anchors_minilm  # the sibling script, like bench_floor

    from edgeship.export_steps import N_HELDOUT, heldout_pools

    held = lm.sample_inputs(N_HELDOUT, seed=1, seq_len=128, image_size=224, corpus=heldout_pools()[1])
    ref = np.concatenate([next(iter(lm.run_torch(f).values())) for f in held]).reshape(len(held), -1)
    for key, (path, run) in anchors_minilm.anchors(lm, cache, threads).items():
        got = np.concatenate([run(f) for f in held]).reshape(len(held), -1)
        cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
        meta[key] = {"size_mb": path.stat().st_size / 2**20, "mean_cosine": float(cos.mean()),
                     "min_cosine": float(cos.min()), "recipe": "int8-dynamic", "kept_layers": [],
                     "static_sequence": key.startswith("anchor-tflite")}

        def runner(regime: str, run: anchors_minilm.Runner = run) -> Callable[[], object]:
            feeds = regimes[regime]
            return lambda: [run(f) for f in feeds]
        runners[key] = runner


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="existing bundle to time (default: export one into a temp dir)")
    ap.add_argument("--formats", nargs="+", default=["onnx"])
    ap.add_argument("--recipes", nargs="+", default=["fp32", "int8-dynamic", "int8-static", "int4-weight"])
    ap.add_argument("--target", default="x86-64-laptop")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--per-round", type=int, default=5, help="passes over the texts per round")
    ap.add_argument("--texts", type=int, default=8, help="texts per input regime")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--no-floor", action="store_true", help="skip the hardware floor (bench_floor.py) column")
    ap.add_argument("--anchors", metavar="DIR", help="also time the anchor pipelines (anchors_minilm.py), built into "
                                                     "DIR once and reused")
    a = ap.parse_args(argv)

    import torch

    from edgeship.export_steps import builtin_corpus
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
    lm = load_hf_dir(default_model_dir())
    regimes = _regimes(lm, builtin_corpus(), a.texts)
    fp32_size = sum(p.numel() * p.element_size() for p in lm.module.parameters())

    def eager(regime: str) -> Callable[[], object]:
        args = [lm.torch_args(f) for f in regimes[regime]]

        def run() -> object:
            with torch.inference_mode():
                return [lm.module(*x) for x in args]
        return run

    runners: dict[str, Callable[[str], Callable[[], object]]] = {"pytorch-eager/fp32": eager}
    meta: dict[str, dict[str, object]] = {
        "pytorch-eager/fp32": {"size_mb": fp32_size / 2**20, "mean_cosine": 1.0, "min_cosine": 1.0}}
    for art in bundle.manifest.artifacts:
        b = backends.load(bundle.path_of(art), art.format, threads=a.threads, options=art.runtime.get("options", {}))

        def runner(regime: str, b: backends.Backend = b) -> Callable[[], object]:
            feeds = [b.adapt_feeds(_fit(f, b)) for f in regimes[regime]]
            return lambda: [b.run(f) for f in feeds]
        runners[art.key] = runner
        fid = art.fidelity
        meta[art.key] = {"size_mb": art.size_bytes / 2**20, "mean_cosine": fid.mean_cosine if fid else None,
                         "min_cosine": fid.min_cosine if fid else None,
                         "kept_in_float": len(art.quantization.get("kept_in_float", [])),
                         "kept_layers": list(art.quantization.get("kept_in_float", [])), "recipe": art.recipe,
                         "static_sequence": _static_len(b) is not None}
    if a.anchors:
        _add_anchors(lm, Path(a.anchors), a.threads, regimes, runners, meta)
    floor = None
    if not a.no_floor:
        import bench_floor  # the sibling script: python benchmarks/bench_minilm.py puts benchmarks/ on sys.path

        floor = (bench_floor.model_cost(lm, regimes["dense-128"][0]), bench_floor.measure_peaks(a.threads))
        print(bench_floor.describe(floor[1], floor[0]))
    rows = []
    stamp = time.strftime("%Y-%m-%d %H:%M")
    for regime, feeds in regimes.items():
        tokens = [int(f["attention_mask"].sum()) for f in feeds]
        fns = {k: r(regime) for k, r in runners.items()}
        samples: dict[str, list[float]] = {k: [] for k in fns}
        for fn in fns.values():
            _time(fn, 3)  # warm-up
        for _ in range(a.rounds):
            for k, fn in fns.items():
                samples[k].extend(t / len(feeds) for t in _time(fn, a.per_round))
        eager_ms = float(np.median(samples["pytorch-eager/fp32"]))
        print(f"\n[{regime}] {REGIMES[regime]}\nall-MiniLM-L6-v2, {len(feeds)} texts of {min(tokens)}-{max(tokens)} real "
              f"tokens (mean {np.mean(tokens):.0f}) in {feeds[0]['input_ids'].shape[1] if regime != 'sentences' else 'their own'}"
              f"-token inputs, batch 1, {a.threads} threads, {a.rounds} x {a.per_round} passes (interleaved), {stamp}")
        dense = regime == "dense-128" and floor is not None
        print(f"{'candidate':26s} {'MB':>6s} {'ms/text':>8s} {'p90':>7s} {'speed-up':>8s} {'mean cos':>8s} {'min cos':>8s}"
              + (f" {'floor ms':>8s} {'% floor':>7s}" if dense else ""))
        for k in fns:
            ms = float(np.median(samples[k]))
            r = {"regime": regime, "candidate": k, "median_ms": ms, "p90_ms": float(np.percentile(samples[k], 90)),
                 "speedup_vs_eager": eager_ms / ms, **meta[k]}
            rows.append(r)
            mc = "-" if r["mean_cosine"] is None else f"{r['mean_cosine']:.4f}"
            mn = "-" if r["min_cosine"] is None else f"{r['min_cosine']:.4f}"
            note = "  (static shape: padded to its length)" if regime == "sentences" and r.get("static_sequence") else ""
            fl = ""
            if dense and floor is not None:
                r["floor_ms"] = bench_floor.floor_ms(floor[0], floor[1], str(r.get("recipe", "fp32")),
                                                     r.get("kept_layers", []))  # type: ignore[arg-type]
                r["percent_of_floor"] = 100 * r["floor_ms"] / ms
                fl = f" {r['floor_ms']:8.2f} {r['percent_of_floor']:6.1f}%"
            print(f"{k:26s} {r['size_mb']:6.1f} {ms:8.2f} {r['p90_ms']:7.2f} {r['speedup_vs_eager']:7.2f}x {mc:>8s} {mn:>8s}"
                  f"{fl}{note}")
    if a.json:
        doc: dict[str, Any] = {"threads": a.threads, "regimes": REGIMES, "rows": rows}
        if floor is not None:
            doc["floor"] = {"model": floor[0].to_dict(), "peaks": floor[1].to_dict()}
        Path(a.json).write_text(json.dumps(doc, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
