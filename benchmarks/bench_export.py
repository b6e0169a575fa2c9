"""How long the quickstart export phase takes, and what it spends it on.

    python benchmarks/bench_export.py                      # quickstart's plan: 3 formats x (fp32 + int8-dynamic)
    python benchmarks/bench_export.py --formats pte --recipes fp32 int8-dynamic int8-static
    python benchmarks/bench_export.py --json export.json
    python benchmarks/bench_export.py --jobs 1                # one process (the CLI default is auto)

Runs ``edgeship.export`` of the embedded all-MiniLM-L6-v2 for ``raspberry-pi-5`` (what
``edgeship quickstart`` exports) in this process and prints wall and CPU seconds (user + system,
this process and its children), the per-artifact stage times from the manifest, and how many
times each stage started (lowerings, validations, captures): counts are deterministic, seconds
are not on a shared machine, so compare counts and CPU seconds first.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

_STAGE = re.compile(r"^\[([a-z0-9]+/[a-z0-9-]+)\] ([a-z]+)\.\.\.$")


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", nargs="+", default=None, help="default: the target's formats (quickstart's)")
    ap.add_argument("--recipes", nargs="+", default=None, help="default: fp32 + the target's first quantized recipe")
    ap.add_argument("--target", default="raspberry-pi-5")
    ap.add_argument("--jobs", default="auto", help="processes making artifacts (N or auto, as `edgeship export`)")
    ap.add_argument("--json", help="write the numbers here")
    a = ap.parse_args(argv)

    wall0 = time.perf_counter()
    from edgeship.models import default_model_dir
    from edgeship.pipeline import export

    starts: Counter[tuple[str, str]] = Counter()

    def log(msg: str) -> None:
        m = _STAGE.match(msg.strip())
        if m:
            starts[(m.group(1), m.group(2))] += 1

    imported = time.perf_counter() - wall0
    with tempfile.TemporaryDirectory(prefix="edgeship-bench-export-") as tmp:
        t0, c0 = time.perf_counter(), _cpu()
        res = export(default_model_dir(), target=a.target, out=Path(tmp) / "b", formats=a.formats,
                     recipes=a.recipes, log=log, jobs=None if a.jobs == "auto" else int(a.jobs))
        wall, cpu = time.perf_counter() - t0, _cpu() - c0
    rows = []
    print(f"export of all-MiniLM-L6-v2 for {a.target}, --jobs {a.jobs}: {wall:.1f} s wall, {cpu:.1f} s CPU (this "
          f"process and its lanes; imports before it: {imported:.1f} s); {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the end")
    print(f"{'artifact':22s} {'s':>6s}  stages (s) and how many times each started")
    for art in res.manifest.artifacts:
        counts = {stage: n for (key, stage), n in starts.items() if key == art.key}
        stages = "  ".join(f"{k} {v:.1f}" + (f" x{counts[k]}" if counts.get(k, 1) > 1 else "")
                           for k, v in art.stages.items())
        print(f"{art.key:22s} {art.export_seconds:6.1f}  {stages}")
        rows.append({"artifact": art.key, "seconds": art.export_seconds, "stages": art.stages, "starts": counts})
    totals = Counter[str]()
    for (_, stage), n in starts.items():
        totals[stage] += n
    print("stage starts in total: " + ", ".join(f"{k} {v}" for k, v in sorted(totals.items())))
    if a.json:
        Path(a.json).write_text(json.dumps({"jobs": a.jobs, "wall_s": wall, "cpu_s": cpu, "import_s": imported, "artifacts": rows,
                                            "stage_starts": dict(totals), "load_average": os.getloadavg()[0]},
                                           indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
