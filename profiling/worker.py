"""Measure one artifact in this process: ``python -m edgeship.profiling.worker JOB.json RESULT.json``.

Started by :func:`edgeship.profiling.runner.profile` once per artifact. For torch-free
formats torch is made unimportable before any runtime is loaded, which proves the
device path needs no torch. The measurement runs in stages: open the artifact, resolve
its input, the timed loop, and (for a bundle with held-out samples) the device check.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import numpy as np

from edgeship.errors import ConfigError, EdgeshipError, InputError
from edgeship.manifest import Bundle
from edgeship.profiling import backends, energy, resident, sysinfo, telemetry
from edgeship.profiling.inputs import UserInputs, check_usable, length_buckets, read_inputs
from edgeship.profiling.progress import Progress, bar
from edgeship.profiling.results import (
    Agreement,
    ArtifactResult,
    InputInfo,
    Memory,
    NpuMode,
    RunConfig,
    Status,
    TelemetrySummary,
    UserInputsRun,
)
from edgeship.profiling.soak import run_soak
from edgeship.profiling.stats import LatencyStats
from edgeship.spec import fill_dims, resolve_dims

_BLOCKED = ("torch", "transformers", "executorch", "litert_torch", "torchao")
Feeds = dict[str, np.ndarray]
AGREEMENT_INPUTS = 256  # the user's inputs whose outputs the artifacts of a run are compared on (a second pass)


@dataclass(frozen=True)
class Job:
    """One artifact to measure: ``artifact`` of the bundle at ``bundle``, or the model ``file``.

    ``npu`` set: the artifact's compiled NPU model instead of its file (see :class:`~.results.NpuRun`).
    ``outputs_dir`` set (with --inputs): the outputs on the user's first inputs are saved there, for the runner
    to compare the artifacts of the run with each other.
    """

    config: RunConfig
    bundle: str | None = None
    artifact: str | None = None
    file: str | None = None
    npu: NpuMode | None = None
    outputs_dir: str | None = None

    @property
    def label(self) -> str:
        name = self.artifact or Path(self.file or "?").name
        return f"{name}@htp" if self.npu else name

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "bundle": self.bundle, "artifact": self.artifact, "file": self.file,
                "npu": self.npu, "outputs_dir": self.outputs_dir}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Job:
        if d.get("npu") not in (None, *get_args(NpuMode)):
            raise ConfigError(f"job: npu mode {d['npu']!r} is not one of {', '.join(get_args(NpuMode))}")
        return cls(RunConfig.from_dict(d["config"]), d.get("bundle"), d.get("artifact"), d.get("file"), d.get("npu"),
                   d.get("outputs_dir"))


def block_torch() -> None:
    """Make torch & co. unimportable (``import torch`` raises ImportError)."""
    for name in _BLOCKED:
        if name in sys.modules and sys.modules[name] is not None:
            return  # already imported by the caller (in-process use): nothing to prove here
        sys.modules[name] = None  # type: ignore[assignment]


def torch_blocked() -> bool:
    """Whether this process made torch unimportable (:func:`block_torch`)."""
    return "torch" in sys.modules and sys.modules["torch"] is None


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


@dataclass(frozen=True)
class _Opened:
    """The artifact a job points at, before anything is loaded."""

    ident: ArtifactResult  # identity fields only; becomes the result
    file: Path
    bundle: Bundle | None
    run_opts: dict[str, Any]


def _open(job: Job) -> _Opened:
    if job.bundle is not None:
        from edgeship.manifest import load_bundle

        bundle = load_bundle(job.bundle, verify=False)
        art = bundle.manifest.artifact(job.artifact or "")
        if job.npu == "device":  # the compiled HTP context model instead of the portable QDQ file
            from edgeship.profiling.backends.qnn import open_context

            ident, path, opts = open_context(bundle, art)
            return _Opened(ident, path, bundle, opts)
        ident = ArtifactResult(artifact=art.key, path=art.path, format=art.format, recipe=art.recipe,
                               size_bytes=art.size_bytes, fidelity=art.fidelity)
        return _Opened(ident, bundle.path_of(art), bundle, dict(art.runtime.get("options", {})))
    path = Path(job.file or "")
    ident = ArtifactResult(artifact=path.name, path=str(path), format=backends.format_of(path),
                           size_bytes=path.stat().st_size)
    return _Opened(ident, path, None, {})


def _pin(cpus: tuple[int, ...]) -> set[int] | None:
    """Pin this process (and the runtime threads it starts) to ``cpus``; returns the affinity to restore."""
    if not cpus:
        return None
    if not hasattr(os, "sched_setaffinity"):
        raise ConfigError("pinning to CPUs needs sched_setaffinity (Linux/Android); this OS has none")
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as e:
        raise ConfigError(f"cannot pin to CPUs {list(cpus)}: {e}") from None
    return before


def run_job(job: Job) -> ArtifactResult:
    restore = None
    base = ArtifactResult(artifact=job.label)
    try:
        restore = _pin(job.config.cpus)
        if job.npu in ("absent", "simulate"):  # no Hexagon NPU here: say why, or simulator numerics only
            from edgeship.profiling.backends.qnn import run_without_npu

            return run_without_npu(job)
        opened = _open(job)
        base = opened.ident
        return _measure(opened, job.config, job.outputs_dir)
    except EdgeshipError as e:
        return dataclasses.replace(base, status=Status.ERROR, error=str(e))
    except Exception as e:  # a runtime failing mid-run must not lose the other measurements
        return dataclasses.replace(base, status=Status.ERROR, error=f"{type(e).__name__}: {e}",
                                   traceback=traceback.format_exc())
    finally:
        if restore is not None:  # in-process (--no-isolate): give the caller its CPUs back
            os.sched_setaffinity(0, restore)


def _threads(cfg: RunConfig, bundle: Bundle | None) -> int | None:
    threads = cfg.threads
    if threads is None and bundle is not None:
        threads = int(bundle.manifest.target.get("threads") or 0) or None
    return None if threads is None else min(threads, os.cpu_count() or threads)


def _run_options(opened: _Opened, cfg: RunConfig) -> tuple[dict[str, Any], dict[str, Any] | None, list[str]]:
    """The backend's options (the bundle's, the user's that apply to this format, --per-op, --method), the
    per-op note of a backend that cannot time operators, and a warning for each option that does not apply."""
    fmt = str(opened.ident.format)
    user_opts, warnings = backends.split_options(fmt, cfg.options)
    run_opts = {**opened.run_opts, **user_opts}
    per_op = None
    if cfg.per_op:  # only backends that can time single operators get the option; the others say so
        if getattr(backends.get_backend(fmt), "per_op_capable", False):
            run_opts["per_op"] = True
        else:
            per_op = {"available": False, "note": f"the {fmt} backend has no per-operator timings"}
    if cfg.method:  # a bundle mixes formats: only those with methods (.pte) take it
        if "method" in backends.get_backend(fmt).options_accepted:
            run_opts["method"] = cfg.method
        else:
            warnings.append(f"--method does not apply to {fmt} artifacts (ignored)")
    return run_opts, per_op, warnings


def _measure(opened: _Opened, cfg: RunConfig, outputs_dir: str | None = None) -> ArtifactResult:
    fmt, bundle = str(opened.ident.format), opened.bundle
    run_opts, per_op, warnings = _run_options(opened, cfg)
    if backends.is_torch_free(fmt, run_opts):
        block_torch()
    threads = _threads(cfg, bundle)
    target = bundle.manifest.target.get("name") if bundle else None
    power_profile, power_reason = energy.power_model_profile(cfg.power_target, target, platform.machine(),
                                                             sysinfo.board_model())
    recorder = energy.Recorder.create(cfg.energy, power_profile, power_reason, idle_seconds=cfg.idle_seconds,
                                      ctx=energy.MeterContext(sample_hz=cfg.sample_hz, csv_path=cfg.energy_csv))
    rss0 = _rss_mb()
    t0 = time.perf_counter_ns()
    model = backends.load(opened.file, fmt, threads=threads, options=run_opts)
    load_s = (time.perf_counter_ns() - t0) / 1e9
    rss_load = _rss_mb()

    user = _read_user_inputs(bundle, cfg)
    all_feeds, inp = ([model.adapt_feeds(f) for f in user.feeds], _user_input_info(user)) if user \
        else _resolve_input(model, bundle, cfg)
    feeds = all_feeds[0]
    t0 = time.perf_counter_ns()
    first = model.run(feeds)
    first_ms = (time.perf_counter_ns() - t0) / 1e6
    prog = Progress(opened.ident.artifact, enabled=cfg.progress)
    for i in range(cfg.warmup):
        model.run_timed(all_feeds[i % len(all_feeds)])
        prog.update(f"{bar((i + 1) / cfg.warmup)} warm-up {i + 1}/{cfg.warmup}")
    loop = _timed_loop(model, all_feeds, cfg, recorder, prog)
    # after the timed loop, so the latency and energy figures are the same with or without a soak
    soak = run_soak(model, feeds, cfg.soak, _rss_mb, prog) if cfg.soak else None
    check = _device_check(model, bundle) if bundle is not None and not cfg.shapes else None
    split = resident.snapshot(opened.file)  # the model still loaded: what the peak was made of, near enough
    user_run = None
    if user is not None and bundle is not None:
        user_run = UserInputsRun(user.name, user.kind, user.count, user.sha256, length_buckets(loop.samples, user),
                                 prepared_mb=user.nbytes / 2**20, prepared_on=user.prepared_on)
        if outputs_dir:
            _save_outputs(model, all_feeds, bundle, Path(outputs_dir) / outputs_file(opened.ident.artifact))
    return dataclasses.replace(
        opened.ident, status=Status.OK, torch_free=torch_blocked(), input=inp,
        load_seconds=load_s, first_inference_ms=first_ms, warmup_runs=cfg.warmup, measured_seconds=loop.wall_s,
        latency=LatencyStats.from_ns(loop.samples), samples_ns=tuple(loop.samples),
        memory=Memory(rss0, rss_load, _peak_rss_mb(), split), threads=threads, runtime=model.info(),
        cpus=tuple(sorted(os.sched_getaffinity(0))) if cfg.cpus else (),
        output_shapes={k: tuple(np.shape(v)) for k, v in first.items()},
        energy=recorder.result(len(loop.samples)), telemetry=loop.telemetry, device_check=check, per_op=per_op,
        warnings=(*warnings, *loop.warnings), soak=soak, user_inputs=user_run)


def _read_user_inputs(bundle: Bundle | None, cfg: RunConfig) -> UserInputs | None:
    if not cfg.inputs:
        return None
    check_usable(bundle is not None, cfg.shapes)
    assert bundle is not None  # for mypy: check_usable refused a bare model file
    return read_inputs(cfg.inputs, bundle.manifest.inputs, bundle.manifest.preprocessing, bundle.root)


def _user_input_info(user: UserInputs) -> InputInfo:
    """Input 0's shapes stand for all (texts are padded to one length; arrays share their trailing shape)."""
    f = user.feeds[0]
    return InputInfo(f"your inputs {user.describe()}, round-robin", {k: tuple(v.shape) for k, v in f.items()},
                     {k: str(v.dtype) for k, v in f.items()})


def outputs_file(artifact: str) -> str:
    """Where an artifact's outputs on the user's inputs are saved: 'onnx/int8@htp' -> 'onnx__int8@htp.npz'."""
    return artifact.replace("/", "__") + ".npz"


def _save_outputs(model: Any, all_feeds: list[Feeds], bundle: Bundle, path: Path) -> None:
    """The first output on the first AGREEMENT_INPUTS inputs (as floats), one array per input."""
    name = bundle.manifest.outputs[0].name
    out = {}
    for i, f in enumerate(all_feeds[:AGREEMENT_INPUTS]):
        res = model.float_outputs(model.run(f))
        if name not in res:
            raise InputError(f"artifact has no output '{name}' (it has {', '.join(res)})")
        out[str(i)] = np.asarray(res[name])
    np.savez(path, **out)  # type: ignore[arg-type]


def _resolve_input(model: Any, bundle: Bundle | None, cfg: RunConfig) -> tuple[list[Feeds], InputInfo]:
    """The bundle's held-out sample 0 when there is one (and no --shape), else synthesized inputs."""
    if bundle is not None and not cfg.shapes and bundle.manifest.samples.get("inputs"):
        with np.load(bundle.root / bundle.manifest.samples["inputs"]) as z:
            feeds = {k: z[k][:1] if z[k].ndim else z[k] for k in z.files}
        source = "bundle held-out sample 0"
    else:
        specs = bundle.manifest.inputs if bundle else model.inputs
        # sizes the model's metadata or the batch-1 convention fixes are used, and said in the input source
        dims, dim_notes = fill_dims(specs, resolve_dims(specs, cfg.shapes, bundle.manifest.default_dims() if bundle
                                                        else {}), model.dim_hints)
        feeds = model.synthesize(specs, dims, seed=cfg.seed)
        source = f"synthesized (seed {cfg.seed})" + "".join(f"; {n}" for n in dim_notes)
    # what a text model really computes on (ONNX graphs drop trailing padding)
    real = int(np.count_nonzero(feeds["attention_mask"])) if "attention_mask" in feeds else None
    feeds = model.adapt_feeds(feeds)
    return [feeds], InputInfo(source, {k: tuple(v.shape) for k, v in feeds.items()},
                            {k: str(v.dtype) for k, v in feeds.items()}, real)


@dataclass(frozen=True)
class _Loop:
    samples: list[int]
    wall_s: float
    telemetry: TelemetrySummary
    warnings: list[str]


def _timed_loop(model: Any, all_feeds: list[Feeds], cfg: RunConfig, recorder: energy.Recorder, prog: Progress
                ) -> _Loop:
    """Run until both ``cfg.runs`` and the minimum time are reached (or ``max_seconds``), meters around it. Run ``i``
    is on input ``i % len(all_feeds)``, round-robin, in whole rounds: every input is timed equally often."""
    samples: list[int] = []
    warnings: list[str] = []
    tele = telemetry.Telemetry()
    cooldown = tele.wait_for_cooldown(cfg.cooldown_to_c) if cfg.cooldown_to_c is not None else None
    recorder.start()  # measures idle power first, outside the timed loop
    min_s = max(cfg.min_seconds, min(recorder.min_duration_s(), cfg.max_seconds))
    if min_s > cfg.min_seconds:
        warnings.append(f"run extended to {min_s:.2f} s so the {recorder.meter.name if recorder.meter else ''} "
                        "meter can resolve it")
    tele.start()
    min_ns, max_ns = int(min_s * 1e9), int(cfg.max_seconds * 1e9)
    # whole rounds of the inputs, so that each input weighs the same in the percentiles (one input: cfg.runs)
    n_inputs = len(all_feeds)
    runs = -(-max(cfg.runs, n_inputs) // n_inputs) * n_inputs
    start = time.perf_counter_ns()
    with model.float_mode():  # once around the loop, not per inference
        _run_rounds(model, all_feeds, runs, min_ns, max_ns, samples, warnings, prog)
    wall_s = (time.perf_counter_ns() - start) / 1e9
    tele_out = tele.stop()
    recorder.stop()  # and the idle window after the run
    if cooldown is not None:
        tele_out["cooldown"] = cooldown
    stats = LatencyStats.from_ns(samples)
    prog.done(f"{len(samples)} runs, p50 {stats.p50_ms:.2f} ms, p99 {stats.p99_ms:.2f} ms")
    return _Loop(samples, wall_s, TelemetrySummary.from_dict(tele_out), warnings)


def _run_rounds(model: Any, all_feeds: list[Feeds], runs: int, min_ns: int, max_ns: int, samples: list[int],
                warnings: list[str], prog: Progress) -> None:
    """The timed inferences: until both ``runs`` (whole rounds of the inputs) and ``min_ns`` are reached, or
    ``max_ns``; each inference's nanoseconds appended to ``samples``."""
    n_inputs = len(all_feeds)
    start = time.perf_counter_ns()
    while True:
        feeds = all_feeds[len(samples) % n_inputs]
        t = time.perf_counter_ns()
        model.run_timed(feeds)
        samples.append(time.perf_counter_ns() - t)
        elapsed = time.perf_counter_ns() - start
        if prog.due():  # the median is only worth computing when it will be printed
            # the run ends when both the count and the time are reached: the lagging one is the progress
            frac = min(len(samples) / runs, elapsed / min_ns if min_ns else 1.0)
            prog.update(f"{bar(frac)} run {len(samples)} ({elapsed / 1e9:.1f} s) p50 {np.median(samples) / 1e6:.2f} ms")
        if len(samples) >= runs and elapsed >= min_ns and len(samples) % n_inputs == 0:
            return
        if elapsed >= max_ns:
            warnings.append(f"stopped at --max-seconds {max_ns / 1e9:g} after {len(samples)} of {runs} runs")
            return


def _device_check(model: Any, bundle: Bundle) -> Agreement | None:
    """Run the bundle's held-out samples here and compare with the PyTorch reference outputs."""
    samples = bundle.manifest.samples
    if not samples.get("inputs") or not samples.get("outputs"):
        return None
    from edgeship.fidelity import compare

    with np.load(bundle.root / samples["inputs"]) as zi, np.load(bundle.root / samples["outputs"]) as zo:
        ref_inputs, ref_outputs = {k: zi[k] for k in zi.files}, {k: zo[k] for k in zo.files}
    out_name = bundle.manifest.outputs[0].name
    n = next(iter(ref_inputs.values())).shape[0]
    got, ref = [], []
    for i in range(n):
        res = model.float_outputs(model.run(model.adapt_feeds({k: v[i:i + 1] for k, v in ref_inputs.items()})))
        if out_name not in res:
            raise InputError(f"artifact has no output '{out_name}' (it has {', '.join(res)})")
        got.append(res[out_name])
        ref.append(ref_outputs[out_name][i:i + 1])
    classifier = bundle.manifest.model.get("task", "").endswith("classification")
    f = compare(ref, got, out_name, 0.0, classifier=classifier)
    return Agreement(f.output, f.n_samples, f.max_abs_err, f.mean_abs_err, f.mean_cosine, f.min_cosine,
                     f.top1_agreement)


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 2:
        print("usage: python -m edgeship.profiling.worker JOB.json RESULT.json", file=sys.stderr)
        return 2
    res = run_job(Job.from_dict(json.loads(Path(args[0]).read_text())))
    Path(args[1]).write_text(json.dumps(res.to_dict()))
    return 1 if res.failed else 0


if __name__ == "__main__":
    sys.exit(main())
