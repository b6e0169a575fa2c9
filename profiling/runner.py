"""Profile a bundle, one of its artifacts, or a bare model file on this machine.

Each artifact is measured in a fresh child process (``edgeship.profiling.worker``)
so that peak RSS belongs to that artifact alone and a crashing runtime cannot take
the other measurements with it. Torch-free formats run with torch made
unimportable in the child. Never imports torch, transformers or the exporters.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeship.errors import ConfigError, EdgeshipError
from edgeship.manifest import MANIFEST_NAME, load_bundle
from edgeship.profiling import sysinfo

RESULT_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class RunConfig:
    runs: int = 50
    min_seconds: float = 2.0
    max_seconds: float = 300.0
    warmup: int = 5
    threads: int | None = None
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    energy: str = "auto"
    idle_seconds: float = 1.0
    sample_hz: float = 10.0
    cooldown_to_c: float | None = None
    energy_csv: str | None = None
    power_target: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    per_op: bool = False
    progress: bool = True
    seed: int = 0
    simulate_npu: bool = False  # without a Hexagon NPU, run compiled QNN context models on the HTP simulator

    def __post_init__(self) -> None:
        if self.runs < 1:
            raise ConfigError(f"--runs must be >= 1, got {self.runs}")
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be >= 0, got {self.warmup}")
        if self.min_seconds < 0 or self.max_seconds <= 0 or self.max_seconds < self.min_seconds:
            raise ConfigError(f"--min-seconds {self.min_seconds} / --max-seconds {self.max_seconds}: need "
                              "0 <= min <= max and max > 0")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if self.idle_seconds < 0 or not self.sample_hz > 0:
            raise ConfigError(f"--idle-seconds {self.idle_seconds} / --sample-hz {self.sample_hz}: need idle >= 0 "
                              "and a sampling rate > 0")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shapes"] = {k: list(v) for k, v in self.shapes.items()}
        d["options"] = dict(self.options)
        return d


@dataclass(frozen=True)
class ProfileResult:
    """Everything one ``edgeship profile`` measured. ``results`` holds one dict per artifact."""

    device: dict[str, Any]
    config: dict[str, Any]
    results: tuple[dict[str, Any], ...]
    source: str
    target: str | None
    created_utc: str
    edgeship_version: str
    schema_version: int = RESULT_SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["results"] = list(self.results)
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ProfileResult:
        if d.get("schema_version") != RESULT_SCHEMA_VERSION:
            raise ConfigError(f"results schema_version {d.get('schema_version')!r}, expected {RESULT_SCHEMA_VERSION}")
        return cls(device=dict(d["device"]), config=dict(d["config"]), results=tuple(d["results"]),
                   source=str(d["source"]), target=d.get("target"), created_utc=str(d["created_utc"]),
                   edgeship_version=str(d["edgeship_version"]))

    @property
    def ok(self) -> bool:
        return all(r.get("status") in ("ok", "skipped", "simulated") for r in self.results)


def _jobs(source: Path, artifact: str | None) -> tuple[list[dict[str, Any]], str | None]:
    """One job per artifact to measure."""
    if source.suffix == ".zip" and source.is_file():
        from edgeship.bundle import unpack

        dest = Path(tempfile.mkdtemp(prefix="edgeship-bundle-"))
        _UNPACKED.append(dest)
        return _jobs(unpack(source, dest), artifact)
    if source.is_dir():
        bundle = load_bundle(source, verify=True)
        arts = [bundle.manifest.artifact(artifact)] if artifact else list(bundle.manifest.artifacts)
        return [{"bundle": str(source.resolve()), "artifact": a.key} for a in arts], bundle.manifest.target.get("name")
    if source.name == MANIFEST_NAME:
        return _jobs(source.parent, artifact)
    if not source.exists():
        raise EdgeshipError(f"nothing to profile at {source}: give a bundle directory or a .onnx/.tflite/.pte file")
    if artifact:
        raise ConfigError("--artifact selects inside a bundle; a single model file was given")
    return [{"file": str(source.resolve())}], None


_UNPACKED: list[Path] = []  # bundles unpacked from .zip for this process; removed at exit


@atexit.register
def _cleanup_unpacked() -> None:
    for d in _UNPACKED:
        shutil.rmtree(d, ignore_errors=True)


def _run_child(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="edgeship-job-") as td:
        jpath, rpath = Path(td, "job.json"), Path(td, "result.json")
        jpath.write_text(json.dumps(job))
        try:
            proc = subprocess.run([sys.executable, "-m", "edgeship.profiling.worker", str(jpath), str(rpath)],
                                  stdin=subprocess.DEVNULL, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return {"status": "error", "error": f"timed out after {timeout:.0f} s", **_ident(job)}
        if rpath.is_file():
            return dict(json.loads(rpath.read_text()))
        return {"status": "error", "error": f"worker exited with code {proc.returncode} and wrote no result "
                "(the runtime crashed; run with --no-isolate --debug to see where)", **_ident(job)}


def _ident(job: Mapping[str, Any]) -> dict[str, Any]:
    return {"artifact": job.get("artifact") or Path(job.get("file", "?")).name}


def profile(source: str | Path, *, artifact: str | None = None, config: RunConfig | None = None,
            isolate: bool = True, json_path: str | Path | None = None, **kwargs: Any) -> ProfileResult:
    """Measure every artifact of a bundle (or one model file) on this machine.

    ``kwargs`` are :class:`RunConfig` fields (``runs=200, threads=4, energy="auto"``...).
    """
    if config is None:
        config = RunConfig(**kwargs)
    elif kwargs:
        config = dataclasses.replace(config, **kwargs)
    jobs, target = _jobs(Path(source), artifact)
    from edgeship.profiling.backends.qnn import add_npu_jobs

    jobs = add_npu_jobs(jobs, config.simulate_npu)
    if config.options:
        from edgeship.profiling import backends

        backends.split_options("onnx", config.options)  # a key no backend knows fails before any run
    results = []
    for job in jobs:
        job = {**job, "config": config.to_dict()}
        if isolate:
            results.append(_run_child(job, timeout=config.max_seconds * 3 + 600))
        else:
            from edgeship.profiling.worker import run_job

            results.append(run_job(job))
    res = ProfileResult(device=sysinfo.describe(), config=config.to_dict(), results=tuple(results),
                        source=str(source), target=target, created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        edgeship_version=_version())
    if json_path is not None:
        write_json_atomic(Path(json_path), res.to_json())
    return res


def write_json_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _version() -> str:
    from edgeship import __version__

    return __version__


def merge_results(results: Sequence[ProfileResult]) -> dict[str, Any]:
    """Several runs (devices) in one document: ``{"schema_version", "runs": [...]}``."""
    return {"schema_version": RESULT_SCHEMA_VERSION, "runs": [r.to_dict() for r in results]}
