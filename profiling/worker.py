"""Measure one artifact in this process: ``python -m edgeship.profiling.worker JOB.json RESULT.json``.

Started by :func:`edgeship.profiling.runner.profile` once per artifact. For torch-free
formats torch is made unimportable before any runtime is loaded, which proves the
device path needs no torch.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.errors import EdgeshipError, InputError
from edgeship.profiling import backends, energy, telemetry
from edgeship.profiling.progress import Progress, bar
from edgeship.profiling.stats import LatencyStats
from edgeship.spec import fill_dims, resolve_dims

_BLOCKED = ("torch", "transformers", "executorch", "litert_torch", "torchao")


def block_torch() -> None:
    """Make torch & co. unimportable (``import torch`` raises ImportError)."""
    for name in _BLOCKED:
        if name in sys.modules and sys.modules[name] is not None:
            return  # already imported by the caller (in-process use): nothing to prove here
        sys.modules[name] = None  # type: ignore[assignment]


def _rss_mb() -> float:
    try:
        import psutil

        return float(psutil.Process().memory_info().rss) / 2**20
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    """Peak RSS of this process image.

    Linux keeps ``ru_maxrss`` across ``execve``, so a worker started from a large parent (an
    export that just held torch and the model) would inherit the parent's peak. ``VmHWM`` in
    /proc/self/status belongs to the new address space; use it where it exists.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, KiB on Linux


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    from edgeship.profiling.runner import RunConfig

    raw = dict(job["config"])
    raw["shapes"] = {k: tuple(v) for k, v in raw.get("shapes", {}).items()}
    cfg = RunConfig(**raw)
    out: dict[str, Any] = {"status": "error"}
    try:
        _measure(job, cfg, out)
        out["status"] = "ok"
    except EdgeshipError as e:
        out["error"] = str(e)
    except Exception as e:  # a runtime failing mid-run must not lose the other measurements
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()
    return out


def _measure(job: dict[str, Any], cfg: Any, out: dict[str, Any]) -> None:
    bundle = None
    ref_inputs: dict[str, np.ndarray] | None = None
    ref_outputs: dict[str, np.ndarray] | None = None
    if "bundle" in job:
        from edgeship.manifest import load_bundle

        bundle = load_bundle(job["bundle"], verify=False)
        art = bundle.manifest.artifact(job["artifact"])
        path = bundle.path_of(art)
        fmt = art.format
        out.update(artifact=art.key, path=art.path, format=fmt, recipe=art.recipe, size_bytes=art.size_bytes,
                   fidelity=art.fidelity.to_dict() if art.fidelity else None)
        run_opts = dict(art.runtime.get("options", {}))
    else:
        path = Path(job["file"])
        fmt = backends.format_of(path)
        out.update(artifact=path.name, path=str(path), format=fmt, recipe=None, size_bytes=path.stat().st_size,
                   fidelity=None)
        run_opts = {}
    user_opts, option_notes = backends.split_options(fmt, cfg.options)
    run_opts.update(user_opts)
    if cfg.per_op:  # only backends that can time single operators get the option; the others say so
        if getattr(backends.get_backend(fmt), "per_op_capable", False):
            run_opts["per_op"] = True
        else:
            out["per_op"] = {"available": False, "note": f"the {fmt} backend has no per-operator timings"}
    if backends.is_torch_free(fmt):
        block_torch()
    out["torch_free"] = "torch" in sys.modules and sys.modules["torch"] is None
    label = out["artifact"]
    prog = Progress(label, enabled=cfg.progress)

    threads = cfg.threads
    target = bundle.manifest.target.get("name") if bundle else None
    power_profile, power_reason = energy.power_model_profile(cfg.power_target, target, platform.machine())
    if threads is None and bundle is not None:
        threads = int(bundle.manifest.target.get("threads") or 0) or None
    if threads is not None:
        threads = min(threads, os.cpu_count() or threads)
    recorder = energy.Recorder.create(cfg.energy, power_profile, power_reason, idle_seconds=cfg.idle_seconds,
                                      ctx=energy.MeterContext(sample_hz=cfg.sample_hz, csv_path=cfg.energy_csv))

    rss0 = _rss_mb()
    t0 = time.perf_counter_ns()
    model = backends.load(path, fmt, threads=threads, options=run_opts)
    load_s = (time.perf_counter_ns() - t0) / 1e9
    rss_load = _rss_mb()

    if bundle is not None and not cfg.shapes and bundle.manifest.samples.get("inputs"):
        with np.load(bundle.root / bundle.manifest.samples["inputs"]) as z:
            feeds = {k: z[k][:1] if z[k].ndim else z[k] for k in z.files}
        out["input_source"] = "bundle held-out sample 0"
        if bundle.manifest.samples.get("outputs"):
            with np.load(bundle.root / bundle.manifest.samples["inputs"]) as zi, \
                    np.load(bundle.root / bundle.manifest.samples["outputs"]) as zo:
                ref_inputs = {k: zi[k] for k in zi.files}
                ref_outputs = {k: zo[k] for k in zo.files}
    else:
        specs = bundle.manifest.inputs if bundle else model.inputs
        defaults = bundle.manifest.default_dims() if bundle else {}
        # sizes the model's metadata or the batch-1 convention fixes are used, and said in input_source
        dims, dim_notes = fill_dims(specs, resolve_dims(specs, cfg.shapes, defaults), model.dim_hints)
        feeds = model.synthesize(specs, dims, seed=cfg.seed)
        out["input_source"] = f"synthesized (seed {cfg.seed})" + "".join(f"; {n}" for n in dim_notes)
    if "attention_mask" in feeds:  # what a text model really computes on (ONNX graphs drop trailing padding)
        out["input_real_tokens"] = int(np.count_nonzero(feeds["attention_mask"]))
    feeds = model.adapt_feeds(feeds)
    out["input_shapes"] = {k: list(v.shape) for k, v in feeds.items()}
    out["input_dtypes"] = {k: str(v.dtype) for k, v in feeds.items()}

    t0 = time.perf_counter_ns()
    first = model.run(feeds)
    first_ms = (time.perf_counter_ns() - t0) / 1e6
    for i in range(cfg.warmup):
        model.run_timed(feeds)
        prog.update(f"{bar((i + 1) / cfg.warmup)} warm-up {i + 1}/{cfg.warmup}")

    samples: list[int] = []
    warnings: list[str] = list(option_notes)
    tele = telemetry.Telemetry()
    cooldown = tele.wait_for_cooldown(cfg.cooldown_to_c) if cfg.cooldown_to_c is not None else None
    recorder.start()  # measures idle power first, outside the timed loop
    min_s = max(cfg.min_seconds, min(recorder.min_duration_s(), cfg.max_seconds))
    if min_s > cfg.min_seconds:
        warnings.append(f"run extended to {min_s:.2f} s so the {recorder.meter.name if recorder.meter else ''} "
                        "meter can resolve it")
    tele.start()
    start = time.perf_counter_ns()
    min_ns, max_ns = int(min_s * 1e9), int(cfg.max_seconds * 1e9)
    while True:
        t = time.perf_counter_ns()
        model.run_timed(feeds)
        samples.append(time.perf_counter_ns() - t)
        elapsed = time.perf_counter_ns() - start
        if prog.due():  # the median is only worth computing when it will be printed
            # the run ends when both the count and the time are reached: the lagging one is the progress
            frac = min(len(samples) / max(cfg.runs, 1), elapsed / min_ns if min_ns else 1.0)
            prog.update(f"{bar(frac)} run {len(samples)} ({elapsed / 1e9:.1f} s) p50 {np.median(samples) / 1e6:.2f} ms")
        if len(samples) >= cfg.runs and elapsed >= min_ns:
            break
        if elapsed >= max_ns:
            warnings.append(f"stopped at --max-seconds {cfg.max_seconds:g} after {len(samples)} of {cfg.runs} runs")
            break
    wall_s = (time.perf_counter_ns() - start) / 1e9
    tele_out = tele.stop()
    recorder.stop()  # and the idle window after the run
    if cooldown is not None:
        tele_out["cooldown"] = cooldown
    stats = LatencyStats.from_ns(samples)
    prog.done(f"{len(samples)} runs, p50 {stats.p50_ms:.2f} ms, p99 {stats.p99_ms:.2f} ms")

    device_check = None
    if ref_inputs is not None and ref_outputs is not None:
        device_check = _device_check(model, ref_inputs, ref_outputs, bundle)

    out.update(
        load_seconds=load_s, first_inference_ms=first_ms, warmup_runs=cfg.warmup, measured_seconds=wall_s,
        latency=stats.to_dict(), samples_ns=samples, rss_before_load_mb=rss0, rss_after_load_mb=rss_load,
        peak_rss_mb=_peak_rss_mb(), threads=threads, runtime=model.info(),
        output_shapes={k: list(np.shape(v)) for k, v in first.items()},
        energy=recorder.result(len(samples)).to_dict(), telemetry=tele_out, device_check=device_check,
        warnings=warnings,
    )


def _device_check(model: Any, ref_inputs: dict[str, np.ndarray], ref_outputs: dict[str, np.ndarray],
                  bundle: Any) -> dict[str, Any]:
    """Run the bundle's held-out samples here and compare with the PyTorch reference outputs."""
    from edgeship.fidelity import compare

    out_name = bundle.manifest.outputs[0].name
    n = next(iter(ref_inputs.values())).shape[0]
    got, ref = [], []
    for i in range(n):
        feeds = model.adapt_feeds({k: v[i:i + 1] for k, v in ref_inputs.items()})
        res = model.float_outputs(model.run(feeds))  # a quantized output is compared as floats
        if out_name not in res:
            raise InputError(f"artifact has no output '{out_name}' (it has {', '.join(res)})")
        got.append(res[out_name])
        ref.append(ref_outputs[out_name][i:i + 1])
    classifier = bundle.manifest.model.get("task", "").endswith("classification")
    fid = compare(ref, got, out_name, 0.0, classifier=classifier)
    d = fid.to_dict()
    d.pop("floor_mean_cosine")
    d.pop("passed")
    return d


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 2:
        print("usage: python -m edgeship.profiling.worker JOB.json RESULT.json", file=sys.stderr)
        return 2
    job = json.loads(Path(args[0]).read_text())
    res = run_job(job)
    Path(args[1]).write_text(json.dumps(res))
    return 0 if res["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
