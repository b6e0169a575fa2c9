"""Where a LiteRT (``.tflite``) artifact's time goes, by XNNPACK kernel family, sampled with Linux ``perf``.

    python benchmarks/bench_litert_kernels.py B/tflite/int8-dynamic.tflite [--seconds 8] [--threads 2] [--top 12]

The ``ai-edge-litert`` Python interpreter has no op profiler, but the XNNPACK kernels in its library keep their
symbol names (``xnn_qd8_f32_qc8w_gemm_minmax_ukernel_...``), so ``perf record`` on a process that runs the model
in a loop shows what the CPU executes. (The other formats have their own per-op tools: ``.pte`` ETDump through
``edgeship profile --per-op``, ONNX Runtime's profiler through ``bench_onnx_ops.py``; their libraries are stripped,
so perf sees addresses there.) The model runs through edgeship's own LiteRT backend (as ``edgeship profile``
loads it) at its fixed shapes with dense text inputs (every attention-mask entry 1, every token id 1000), warmed
up before sampling starts: samples cover the steady-state loop only (``perf record -p`` for ``--seconds``).
Kernels are grouped into families (int8 GEMM, fp32 GEMM, dynamic activation quantization, softmax, GELU,
elementwise, layout, thread pool); ms per inference is each family's share of samples times the loop's measured
mean. Files are sampled one after the other, not interleaved: on a shared machine compare shares, not totals.
Needs ``perf`` (linux-perf) and a kernel that lets this user sample (``perf_event_paranoid`` <= 1, or root).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FAMILIES: tuple[tuple[str, str], ...] = (  # first match wins: (family, regex over the symbol)
    ("int8 GEMM, dynamic activations (linears)", r"qd8_f32_qc[48]w_.*gemm|qdu8_f32_qc[48]w_.*gemm"),
    ("int8 GEMM, static (linears)", r"q[su]8_.*gemm|qc8_.*gemm"),
    ("fp32 GEMM (attention batch matmuls, float linears)", r"f32_.*gemm|f32_.*igemm"),
    ("dynamic quantization of activations", r"f32_q[su]8_vcvt|f32_qd8|rminmax|qdu8_asymmetric|qd8_asymmetric"),
    ("packing a GEMM operand at run time", r"packw|pack_lh|packb|_pack_"),
    ("softmax", r"expminusmax|softmax|rmax_|vscale|compute_reciprocal"),
    ("GELU / erf / tanh", r"vgelu|verf|vtanh|vsigmoid"),
    ("elementwise and reductions (norms, residual adds)", r"_v(add|sub|mul|div|sqr|sqrt|rsqrt|max|min)|rsum|rdsum|elementwise"),
    ("layout (transposes, copies)", r"transpose|memmove|memcpy|memset|copy|xnn_x(8|16|32)_"),
    ("thread pool (dispatch, spinning)", r"thread_main|pthreadpool|thread_parallelize|futex|sched_yield"),
)

CHILD = r"""
import sys, time
import numpy as np
from pathlib import Path
from edgeship.profiling import backends
b = backends.load(Path(sys.argv[1]), threads=int(sys.argv[2]))
feeds = b.synthesize(b.inputs, {d: h[0] for d, h in b.dim_hints.items()})
for s in b.inputs:
    if "mask" in s.name:
        feeds[s.name] = np.ones_like(feeds[s.name])
    elif "ids" in s.name:
        feeds[s.name] = np.full_like(feeds[s.name], 1000)
feeds = b.adapt_feeds(feeds)
for _ in range(10):
    b.run(feeds)
info = b.info()
print("ready", info["engine"], flush=True)
t0, n, stop = time.perf_counter(), 0, float(sys.argv[3])
while time.perf_counter() - t0 < stop:
    b.run(feeds)
    n += 1
print(f"{(time.perf_counter() - t0) / n * 1e3:.4f}", flush=True)
"""


def family(symbol: str) -> str:
    for name, pattern in FAMILIES:
        if re.search(pattern, symbol):
            return name
    return "other"


def sample(model: Path, seconds: float, threads: int, workdir: Path) -> tuple[dict[str, float], float, str]:
    """(percent of samples by symbol, mean ms per inference, the engine that ran it)."""
    data = workdir / "perf.data"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(model), str(threads), str(seconds + 2.0)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert child.stdout is not None
    ready = child.stdout.readline()
    if not ready.startswith("ready"):
        child.kill()
        raise SystemExit(f"{model}: the model did not run (run `edgeship profile` on it to see why)")
    rec = subprocess.run(["perf", "record", "-q", "-F", "4000", "-o", str(data), "-p", str(child.pid), "--",
                          "sleep", str(seconds)], capture_output=True, text=True)
    ms = float(child.stdout.readline())
    child.wait()
    if rec.returncode != 0 or not data.exists():
        raise SystemExit(f"perf record failed ({rec.stderr.strip()[-300:]}); is perf_event_paranoid <= 1?")
    rep = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", "symbol", "--stdio", "-q",
                          "-g", "none"], capture_output=True, text=True, check=True)
    shares: dict[str, float] = collections.Counter()
    for line in rep.stdout.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+\[[.k]\]\s+(.+?)\s*$", line)
        if m:
            shares[m.group(2)] += float(m.group(1))
    return dict(shares), ms, ready.split(" ", 1)[1].strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", type=Path, nargs="+")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=12, help="kernels listed under the families (default %(default)s)")
    a = ap.parse_args()
    if shutil.which("perf") is None:
        raise SystemExit("perf is not installed (Debian: apt install linux-perf)")
    for model in a.models:
        if model.suffix != ".tflite":
            raise SystemExit(f"{model}: not a .tflite file (ONNX: bench_onnx_ops.py; .pte: edgeship profile --per-op)")
    for model in a.models:
        with tempfile.TemporaryDirectory() as tmp:
            shares, ms, engine = sample(model, a.seconds, a.threads, Path(tmp))
        total = sum(shares.values()) or 1.0
        by_family: dict[str, float] = collections.Counter()
        for sym, pct in shares.items():
            by_family[family(sym)] += pct
        print(f"{model}: {ms:.3f} ms per inference, {a.threads} threads, {engine}; {a.seconds:g} s of samples")
        print(f"{'family':52} {'share':>6} {'ms/inf':>7}")
        for name, pct in sorted(by_family.items(), key=lambda kv: -kv[1]):
            print(f"{name:52} {pct / total:6.1%} {ms * pct / total:7.3f}")
        ranked = sorted(shares.items(), key=lambda kv: -kv[1])
        if a.top:
            print(f"top {a.top} kernels, then the top of 'other'")
            for sym, pct in ranked[:a.top] + [kv for kv in ranked if family(kv[0]) == "other"][:5]:
                print(f"{pct / total:6.1%}  {sym[:110]}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
