"""Does `edgeship compare` tell noise from a real change on this machine? The issue-15 acceptance check.

    python benchmarks/bench_compare.py                       # a 2-MatMul ONNX model, 6 runs at 2 threads, 1 at 1
    python benchmarks/bench_compare.py --model B --repeats 5 # a bundle of yours

Profiles the model ``repeats + 1`` times with the same options (each run recorded in a scratch history
database) and compares every run with the one before (``--baseline last``): the verdicts should be
"indistinguishable". Then one run with ``--threads 1`` is compared against the last 2-thread run: with a free
second core it should be "slower". Prints the verdicts with their intervals and the machine's load average,
because on a shared machine the second core may not be free (then 2 threads are no faster, or slower).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def _edgeship(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeship", *args], env=env, capture_output=True, text=True,
                          check=False)


def matmul_onnx(d: Path, n: int, rows: int = 16) -> Path:
    """``d/mm.onnx``: two MatMuls of an n x n weight, a real model whose cost grows with n (tests/sdk/test_history.py
    uses it too, so the verdicts the test checks are on the model this benchmark measures)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    ws = [numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), f"w{i}") for i in (1, 2)]
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
                           helper.make_node("MatMul", ["r", "w2"], ["y"])], "mm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, n])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])], ws)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    d.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(d / "mm.onnx"))
    return d / "mm.onnx"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="bundle or model file (default: a generated 2-MatMul ONNX model)")
    ap.add_argument("--n", type=int, default=768, help="width of the generated model")
    ap.add_argument("--rows", type=int, default=64, help="rows of the generated model's input")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--min-seconds", default="2")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        model = Path(args.model) if args.model else matmul_onnx(d, args.n, args.rows)
        env = {**os.environ, "EDGESHIP_HISTORY": str(d / "history.sqlite")}
        common = ["--runs", "100", "--min-seconds", args.min_seconds, "--energy", "off", "--quiet"]
        verdicts = []
        print(f"load average before: {os.getloadavg()}")
        for i in range(args.repeats + 1):
            r = _edgeship("profile", str(model), "--threads", "2", *common, "--json", str(d / f"r{i}.json"), env=env)
            if r.returncode != 0:
                print(r.stderr, file=sys.stderr)
                return 1
            if i == 0:
                continue
            _edgeship("compare", str(d / f"r{i}.json"), "--json", str(d / f"c{i}.json"), env=env)
            for c in json.loads((d / f"c{i}.json").read_text()):
                verdicts.append(c["verdict"])
                print(f"repeat {i}: {c['artifact']}: {c['verdict']} {c['change_pct']:+.1f}% "
                      f"[{(c['ratio_low'] - 1) * 100:+.1f}, {(c['ratio_high'] - 1) * 100:+.1f}] p={c['p_value']:.2g}")
        _edgeship("profile", str(model), "--threads", "1", *common, "--json", str(d / "t1.json"), env=env)
        _edgeship("compare", str(d / "t1.json"), "--baseline", str(d / f"r{args.repeats}.json"), "--json",
                  str(d / "ct.json"), env=env)
        for c in json.loads((d / "ct.json").read_text()):
            print(f"--threads 1 vs 2: {c['artifact']}: {c['verdict']} {c['change_pct']:+.1f}% "
                  f"[{(c['ratio_low'] - 1) * 100:+.1f}, {(c['ratio_high'] - 1) * 100:+.1f}] p={c['p_value']:.2g}")
        same = sum(v == "indistinguishable" for v in verdicts)
        print(f"repeats indistinguishable: {same} of {len(verdicts)}; load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
