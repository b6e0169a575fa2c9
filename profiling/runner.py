"""Profile a bundle, one of its artifacts, or a bare model file on this machine.

Each artifact is measured in a fresh child process (``edgeship.profiling.worker``)
so that peak RSS belongs to that artifact alone and a crashing runtime cannot take
the other measurements with it. Torch-free formats run with torch made
unimportable in the child. Never imports torch, transformers or the exporters.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeship import quiet
from edgeship.errors import ConfigError, EdgeshipError
from edgeship.manifest import MANIFEST_NAME, load_bundle
from edgeship.profiling import sysinfo
from edgeship.profiling.child import run_module
from edgeship.profiling.results import RESULT_SCHEMA_VERSION, ArtifactResult, ProfileResult, RunConfig
from edgeship.profiling.worker import Job, run_job

__all__ = ["RESULT_SCHEMA_VERSION", "ArtifactResult", "ProfileResult", "RunConfig", "profile", "write_json_atomic"]


def _jobs(source: Path, artifacts: Sequence[str], config: RunConfig, pubkey: str | Path | None = None
          ) -> tuple[list[Job], str | None]:
    """One job per artifact to measure."""
    from edgeship import signing

    if source.suffix == ".zip" and source.is_file():
        from edgeship.bundle import unpack

        dest = Path(tempfile.mkdtemp(prefix="edgeship-bundle-"))
        _UNPACKED.append(dest)
        return _jobs(unpack(source, dest), artifacts, config, pubkey)
    if source.name == MANIFEST_NAME:
        return _jobs(source.parent, artifacts, config, pubkey)
    if not source.exists():
        raise EdgeshipError(f"nothing to profile at {source}: give a bundle directory or a .onnx/.tflite/.pte file")
    signing.check(source, pubkey)  # a signed bundle when a key or $EDGESHIP_PUBKEY says so
    if source.is_dir():
        bundle = load_bundle(source, verify=True)
        arts = [bundle.manifest.artifact(a) for a in artifacts] if artifacts else list(bundle.manifest.artifacts)
        jobs = []
        for a in arts:
            jobs.append(Job(config, bundle=str(source.resolve()), artifact=a.key))
            if a.details.get("npu"):  # its compiled NPU model too: measured, simulated, or why not
                from edgeship.profiling.backends.qnn import npu_mode

                jobs.append(Job(config, bundle=str(source.resolve()), artifact=a.key, npu=npu_mode(config.simulate_npu)))
        return jobs, bundle.manifest.target.get("name")
    if artifacts:
        raise ConfigError("--artifact selects inside a bundle; a single model file was given")
    return [Job(config, file=str(source.resolve()))], None


_UNPACKED: list[Path] = []  # bundles unpacked from .zip for this process; removed at exit


@atexit.register
def _cleanup_unpacked() -> None:
    for d in _UNPACKED:
        shutil.rmtree(d, ignore_errors=True)


def _run_child(job: Job, timeout: float) -> ArtifactResult:
    run = run_module("edgeship.profiling.worker", job.to_dict(), timeout, pass_fds=quiet.pass_fds())
    if run.returncode is None:
        return ArtifactResult(artifact=job.label, error=f"timed out after {timeout:.0f} s")
    if run.result is not None:
        return ArtifactResult.from_dict(run.result)
    return ArtifactResult(artifact=job.label, error=f"worker exited with code {run.returncode} and wrote no "
                          "result (the runtime crashed; run with --no-isolate --debug to see where)")


def profile(source: str | Path, *, artifact: str | Sequence[str] | None = None, config: RunConfig | None = None,
            isolate: bool = True, json_path: str | Path | None = None, pubkey: str | Path | None = None,
            on_result: Callable[[ArtifactResult], None] | None = None, **kwargs: Any) -> ProfileResult:
    """Measure every artifact of a bundle (or the given ones, or one model file) on this machine.

    ``pubkey``: refuse a bundle that this key did not sign (default: ``$EDGESHIP_PUBKEY``, else no check).
    ``kwargs`` are :class:`RunConfig` fields (``runs=200, threads=4, energy="auto"``...).
    ``on_result`` sees each artifact's result as soon as it is measured.
    """
    if config is None:
        config = RunConfig(**kwargs)
    elif kwargs:
        config = dataclasses.replace(config, **kwargs)
    artifacts = [artifact] if isinstance(artifact, str) else list(artifact or ())
    jobs, target = _jobs(Path(source), artifacts, config, pubkey)
    outputs_dir = _check_user_inputs(jobs, config)
    if outputs_dir is not None:
        jobs = [dataclasses.replace(j, outputs_dir=str(outputs_dir)) for j in jobs]
    if config.options:
        from edgeship.profiling import backends

        backends.split_options("onnx", config.options)  # a key no backend knows fails before any run
    results = []
    # --repeat K: K rounds, each running every artifact once in a fresh process, so that a machine that slows
    # down part-way slows every artifact alike instead of one artifact's K runs
    for k in range(config.repeat):
        for job in jobs:
            r = _run_child(job, timeout=_child_timeout(config)) if isolate else run_job(job)
            if config.repeat > 1:
                r = dataclasses.replace(r, repeat_index=k)
            if on_result is not None:
                on_result(r)
            results.append(r)
    if outputs_dir is not None:
        results = agree_on_user_inputs(results, jobs, outputs_dir)
        shutil.rmtree(outputs_dir, ignore_errors=True)
    res = ProfileResult.new(sysinfo.describe(), config, results, source=str(source), target=target)
    if json_path is not None:
        write_json_atomic(Path(json_path), res.to_json())
    return res


def _check_user_inputs(jobs: Sequence[Job], config: RunConfig) -> Path | None:
    """--inputs: read once here so that a bad file is one error before any artifact runs; the directory the
    workers save their outputs on those inputs to."""
    if not config.inputs:
        return None
    from edgeship.profiling.inputs import check_usable, read_inputs

    check_usable(bool(jobs) and jobs[0].bundle is not None, config.shapes)
    bundle = load_bundle(str(jobs[0].bundle), verify=False)
    read_inputs(config.inputs, bundle.manifest.inputs, bundle.manifest.preprocessing, bundle.root)
    d = Path(tempfile.mkdtemp(prefix="edgeship-outputs-"))
    _UNPACKED.append(d)  # removed at exit if this run fails before it removes it itself
    return d


def _child_timeout(config: RunConfig) -> float:
    """Seconds a worker may take before it counts as hung; a soak adds a generous second per inference."""
    return config.max_seconds * 3 + 600 + (config.soak or 0) * 1.0


def write_json_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def reference_artifact(results: Sequence[ArtifactResult]) -> ArtifactResult | None:
    """The run's most faithful artifact to compare the others with on the user's inputs: an fp32 one (ONNX first,
    whose runtime computes in fp32 throughout), measured without error; None when the run has none."""
    fp32 = [r for r in results if r.ok and r.recipe == "fp32" and r.npu is None]
    return min(fp32, key=lambda r: (r.format != "onnx", r.artifact), default=None)


def agree_on_user_inputs(results: list[ArtifactResult], jobs: Sequence[Job], outputs_dir: Path
                         ) -> list[ArtifactResult]:
    """Each artifact's outputs on the user's inputs against the reference artifact's (not PyTorch's: there is no
    reference output for the user's inputs on the device), into each result's ``user_inputs``."""
    from edgeship.fidelity import compare
    from edgeship.profiling.results import Agreement
    from edgeship.profiling.worker import outputs_file

    ref = reference_artifact(results)
    if ref is None:
        note = "no fp32 artifact measured in this run to compare with; the device check is the held-out one only"
        return [_with_agreement(r, None, None, note) for r in results]
    manifest = load_bundle(str(jobs[0].bundle), verify=False).manifest
    out_name = manifest.outputs[0].name
    ref_out = _load_outputs(outputs_dir / outputs_file(ref.artifact))
    out = []
    for r in results:
        got = _load_outputs(outputs_dir / outputs_file(r.artifact)) if r.ok and r.user_inputs else None
        if r.artifact == ref.artifact or got is None or not ref_out:
            same = r.artifact == ref.artifact
            out.append(_with_agreement(r, None, None, "the reference the run's other artifacts are compared with on "
                                       "your inputs" if same else None))
            continue
        n = min(len(got), len(ref_out))
        f = compare(ref_out[:n], got[:n], out_name, 0.0,
                    classifier=str(manifest.model.get("task", "")).endswith("classification"))
        agree = Agreement(f.output, f.n_samples, f.max_abs_err, f.mean_abs_err, f.mean_cosine, f.min_cosine,
                          f.top1_agreement)
        count = r.user_inputs.count if r.user_inputs else n
        note = f"on the first {n} of your {count} inputs" if n < count else f"on all {n} of your inputs"
        out.append(_with_agreement(r, agree, ref.artifact, f"{note}, against {ref.artifact}, not against PyTorch"))
    return out


def _load_outputs(path: Path) -> list[Any]:
    if not path.is_file():
        return []
    with np.load(path) as z:
        return [z[str(i)] for i in range(len(z.files))]


def _with_agreement(r: ArtifactResult, agree: Any, vs: str | None, note: str | None) -> ArtifactResult:
    if r.user_inputs is None:
        return r
    return dataclasses.replace(r, user_inputs=dataclasses.replace(r.user_inputs, agreement=agree, agreement_vs=vs,
                                                                  agreement_note=note))
