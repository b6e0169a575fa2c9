"""Runner peak RSS against the artifact's size: the device-memory target (peak <= size + 60 MB).

    python benchmarks/bench_runner_rss.py BUNDLE                 # every artifact, each in a fresh runner process
    python benchmarks/bench_runner_rss.py BUNDLE --margin-mb 60 --json rss.json

Each artifact runs through ``edgeship profile``'s worker (a fresh process, torch blocked where the
format runs without it), so the peak RSS is what the runner on a device would take: Python, the
runtime, the model and its activations. RSS is a deterministic-enough quantity to read on a shared
machine; the latencies printed next to it are not. Exit status 1 when an artifact misses the target.
The "at end" columns split the resident memory at the end of the run, model still loaded: the worker's
own pages, clean pages mapped from the artifact's file, those of the libraries and of any other file
(``profiling/resident.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--margin-mb", type=float, default=60.0, help="allowed RSS above the artifact's size")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)

    from edgeship.profiling.results import RunConfig
    from edgeship.profiling.runner import profile

    res = profile(Path(a.bundle), config=RunConfig(runs=a.runs, min_seconds=0.0, warmup=2, progress=False,
                                                  energy="estimate"))
    rows, missed = [], 0
    print(f"{'artifact':22s} {'MB':>6s} {'peak RSS':>8s} {'before load':>11s} {'target':>7s}  "
          f"{'at end: own':>11s} {'file':>5s} {'libs':>5s} {'other':>5s}  torch-free  runtime path")
    for r in res.results:
        if not r.ok or r.memory is None:
            print(f"{r.artifact:22s} FAILED: {r.error}")
            missed += 1
            continue
        size = (r.size_bytes or 0) / 2**20
        target = size + a.margin_mb
        ok = r.memory.peak_rss_mb <= target
        missed += not ok
        path = str(r.runtime.get("runtime_path") or r.runtime.get("runtime", ""))
        split = r.memory.resident_at_end
        parts = (f"{split.anon_mb:11.1f} {split.artifact_mb:5.1f} {split.libraries_mb:5.1f} {split.other_files_mb:5.1f}"
                 if split else f"{'-':>29s}")
        print(f"{r.artifact:22s} {size:6.1f} {r.memory.peak_rss_mb:8.1f} {r.memory.rss_before_load_mb:11.1f} "
              f"{target:7.1f}  {parts}  {'yes' if r.torch_free else 'no':10s}  {path}{'' if ok else '   MISSED'}")
        rows.append({"artifact": r.artifact, "size_mb": size, "peak_rss_mb": r.memory.peak_rss_mb,
                     "rss_before_load_mb": r.memory.rss_before_load_mb, "target_mb": target, "met": ok,
                     "torch_free": r.torch_free, "runtime_path": path,
                     "resident_at_end": dataclasses.asdict(split) if split else None})
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
