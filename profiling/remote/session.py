"""Profile on one remote device: connect, probe, push, provision the runtime, run, collect, clean up.

How the host reaches the device is a :class:`~.transport.Transport` (``ssh://``); what edgeship
needs there is a :class:`~.runtime.DeviceRuntime` (``python-venv``: Python >= 3.11 and runtime wheels
pushed from the host). This module only sequences them. Everything arrives from the host: the
bundle (only files whose sha256 differs from the copy already there) and the runtime. Layout on the
device, under the work directory (default ``~/.cache/edgeship-device``)::

    bundles/<name>/   the pushed bundle, kept between runs so unchanged artifacts are not re-sent
    wheels/, venv/    the runtime's own files (python-venv), kept for the same reason
    runs/<id>/        job and results of one run; removed at the end
"""

from __future__ import annotations

import json
import shlex
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeship.errors import DeviceError, EdgeshipError
from edgeship.manifest import MANIFEST_NAME, load_bundle, sha256_file
from edgeship.profiling.remote.runtime import DEFAULT_RUNTIME, DeviceRuntime, Probe, Provision, runtime_for
from edgeship.profiling.remote.transport import (
    DEVICE_TAG,
    RESULT_TAG,
    DeviceURL,
    Transport,
    TransportOptions,
    transport_for,
)
from edgeship.profiling.results import ArtifactResult, DeviceInfo, DeviceRun, ProfileResult, RunConfig

DEFAULT_WORKDIR = "~/.cache/edgeship-device"
Log = Callable[[str], None]


@dataclass(frozen=True)
class PushFile:
    local: Path
    remote: str  # relative to the device work directory
    sha256: str
    size: int


def _bundle_files(source: Path, artifact: str | None, staging: Path) -> tuple[list[PushFile], list[str], str]:
    """Files to push for a bundle (or one model file), the artifact keys to run, and the remote source path."""
    if source.suffix == ".zip" and source.is_file():
        from edgeship.bundle import unpack

        source = unpack(source, staging / source.stem)
    if source.name == MANIFEST_NAME:
        source = source.parent
    if not source.exists():
        raise DeviceError(f"nothing to profile at {source}: give a bundle directory or a .onnx/.tflite/.pte file")
    if source.is_file():
        if artifact:
            raise DeviceError("--artifact selects inside a bundle; a single model file was given")
        rel = f"files/{source.name}"
        return [PushFile(source, rel, sha256_file(source), source.stat().st_size)], [], rel
    bundle = load_bundle(source, verify=True)
    m = bundle.manifest
    arts = [m.artifact(artifact)] if artifact else list(m.artifacts)
    base = f"bundles/{source.resolve().name}"
    files = [PushFile(bundle.path_of(a), f"{base}/{a.path}", a.sha256, a.size_bytes) for a in arts]
    for rel in sorted(set(m.samples.values())):
        p = source / rel
        if p.is_file():
            files.append(PushFile(p, f"{base}/{rel}", sha256_file(p), p.stat().st_size))
    # With --artifact the device copy lists only what was sent, so its checksum verification passes.
    data = json.loads((source / MANIFEST_NAME).read_text(encoding="utf-8"))
    keep = {a.path for a in arts}
    data["artifacts"] = [a for a in data["artifacts"] if a["path"] in keep]
    mpath = staging / MANIFEST_NAME
    mpath.write_text(json.dumps(data, indent=2), encoding="utf-8")
    files.append(PushFile(mpath, f"{base}/{MANIFEST_NAME}", sha256_file(mpath), mpath.stat().st_size))
    return files, [a.key for a in arts], base


def _bundle_dir(source: Path, staging: Path) -> Path:
    """The local bundle directory :func:`_bundle_files` pushed from (a .zip is unpacked in staging by then)."""
    if source.suffix == ".zip" and source.is_file():
        return staging / source.stem
    return source.parent if source.name == MANIFEST_NAME else source


def _input_files(inputs: str, source: Path, base: str) -> tuple[list[PushFile], str]:
    """--inputs: the file (or the image folder's files) and the bundle's tokenizer files to push, and where the
    inputs go under the work directory.

    Read here first, so that a bad file is one error on the host before anything is sent. Kept under a name
    made from its content, like the bundle, so an unchanged file is not sent again."""
    from edgeship.profiling.inputs import read_inputs

    if not source.is_dir():
        raise DeviceError("--inputs needs a bundle: its manifest says how to tokenize or preprocess them and which "
                          "inputs the model takes (a bare model file has neither)")
    bundle = load_bundle(source, verify=False)
    user = read_inputs(inputs, bundle.manifest.inputs, bundle.manifest.preprocessing, bundle.root)
    p = Path(inputs)
    rel = f"inputs/{user.sha256[:16]}/{p.name}"
    members = [(p, rel)] if p.is_file() else [(f, f"{rel}/{f.name}") for f in sorted(p.iterdir())
                                              if f.is_file() and not f.name.startswith(".")]
    # the tokenizer the device tokenizes with; a run without --inputs never needs it
    members += [(source / f, f"{base}/{f}") for f in bundle.manifest.preprocessing.get("files") or ()
                if (source / f).is_file()]
    return [PushFile(f, r, sha256_file(f), f.stat().st_size) for f, r in members], rel


class DeviceSession:
    """One device, one run. ``run()`` returns the device's :class:`DeviceRun`, failed or not."""

    def __init__(self, url: str, options: TransportOptions, config: RunConfig, log: Log,
                 workdir: str | None = None, name: str | None = None, runtime: str = DEFAULT_RUNTIME) -> None:
        self.url = DeviceURL.parse(url)
        self.options = options
        self.config = config
        self.log = log
        self.workdir = self.url.workdir or workdir or DEFAULT_WORKDIR
        self.name = name or str(self.url)
        self.runtime_cls = runtime_for(runtime)
        self.identity: dict[str, Any] = {"url": str(self.url), "name": self.name}
        self.partial: list[ArtifactResult] = []  # streamed by the agent: what survives a lost connection
        self.device: DeviceInfo | None = None
        self.timings: dict[str, float] = {}
        self.t: Transport | None = None
        self.source_text = ""
        self.remote_inputs: str | None = None  # --inputs: where the pushed file is, under the work directory

    def run(self, source: Path, artifact: str | None) -> DeviceRun:
        """Never raises: a device that fails is a run with ``status="error"`` and what it measured before."""
        try:
            with tempfile.TemporaryDirectory(prefix="edgeship-remote-") as td:
                return self._run(source, artifact, Path(td))
        except EdgeshipError as e:
            return self.failed(str(e))
        except Exception as e:  # a bug or an odd network error on one device must not stop the fleet
            return self.failed(f"{self.name}: {type(e).__name__}: {e}")
        finally:
            if self.t is not None:
                self.t.close()

    def failed(self, error: str) -> DeviceRun:
        self.log(f"FAILED: {error}")
        partial = None
        if self.partial or self.device:
            # What finished before the failure, in the same schema as a complete run.
            partial = ProfileResult.new(self.device or DeviceInfo(), self.config, self.partial, self.source_text, None)
        return DeviceRun(partial, url=str(self.url), identity=dict(self.identity), status="error", error=error,
                         timings_s=dict(self.timings))

    def _stage(self, name: str, t0: float) -> float:
        now = time.monotonic()
        self.timings[name] = round(now - t0, 3)
        return now

    def _run(self, source: Path, artifact: str | None, staging: Path) -> DeviceRun:
        self.source_text = str(source)
        t0 = time.monotonic()
        files, keys, remote_source = _bundle_files(source, artifact, staging)
        if self.config.inputs:
            input_files, remote_inputs = _input_files(self.config.inputs, _bundle_dir(source, staging), remote_source)
            files += input_files
            self.remote_inputs = remote_inputs
        self.log(f"connecting to {self.url}")
        self.t = transport_for(self.url, self.options)
        self.t.connect()
        self.identity.update(self.t.identity())
        rt = self.runtime_cls(self.t, self.name, self.log)
        rt.extras = ("inputs",) if self.config.inputs else ()
        t0 = self._stage("connect", t0)

        probe = rt.probe(self.workdir, [f.remote for f in files])
        facts = dict(probe.facts)
        self.identity.update({k: v for k, v in facts.items() if k not in ("mem_total", "has_venv", "runtime_stamp")})
        self.identity["mem_total_mb"] = round((facts.get("mem_total") or 0) / 2**20)
        to_push = [f for f in files if probe.hashes.get(f.remote) != f.sha256]
        plan = rt.plan(probe)
        biggest = max((f.size for f in files if f.remote.split("/")[-1] != MANIFEST_NAME), default=0)
        self._check_room(probe, to_push, plan, biggest)
        t0 = self._stage("check", t0)

        self._push(rt, probe.workdir, to_push, plan)
        self.identity["pushed_files"], self.identity["skipped_files"] = len(to_push), len(files) - len(to_push)
        t0 = self._stage("push", t0)
        if plan.needed:
            rt.provision(probe, plan)
        t0 = self._stage("runtime", t0)

        result = self._profile(rt, probe.workdir, remote_source, keys, staging)
        self._stage("profile", t0)
        dev = result.device
        self.identity.update(arch=dev.arch, cpu_model=dev.cpu_model, board=dev.board, runtimes=dict(dev.runtimes),
                             emulated=dev.emulated)
        return DeviceRun(result, url=str(self.url), identity=dict(self.identity), timings_s=dict(self.timings))

    def _check_room(self, probe: Probe, to_push: list[PushFile], plan: Provision, biggest_artifact: int) -> None:
        push_bytes = sum(f.size for f in to_push) + sum(p.stat().st_size for p, _ in plan.push)
        need = push_bytes + plan.install_bytes + 16 * 2**20  # a margin for results and logs
        if probe.free_disk < need:
            raise DeviceError(f"{self.name}: only {probe.free_disk / 2**20:.1f} MB free in {probe.workdir}, this run "
                              f"needs about {need / 2**20:.1f} MB (push {push_bytes / 2**20:.1f} MB, runtime install "
                              f"{plan.install_bytes / 2**20:.1f} MB); free space or choose another ?workdir=")
        mem = probe.mem_available
        if mem is not None and mem < biggest_artifact + 64 * 2**20:
            raise DeviceError(f"{self.name}: {mem / 2**20:.0f} MB of RAM available, the largest artifact alone is "
                              f"{biggest_artifact / 2**20:.0f} MB (+ runtime); close programs or profile a smaller one")

    def _push(self, rt: DeviceRuntime, wd: str, to_push: list[PushFile], plan: Provision) -> None:
        pairs = [(f.local, f.remote) for f in to_push] + list(plan.push)
        self.log(f"pushing {len(to_push)} file(s), {sum(f.size for f in to_push) / 2**20:.1f} MB "
                 f"(unchanged ones skipped)" + (f" and {len(plan.push)} runtime file(s)" if plan.push else ""))
        dirs = sorted({f"{wd}/{rel.rsplit('/', 1)[0]}" for _, rel in pairs if "/" in rel})
        if dirs:
            rt.sh("mkdir -p " + " ".join(shlex.quote(d) for d in dirs), "creating directories")
        for local, rel in pairs:
            rt.t.put(local, f"{wd}/{rel}")

    def _profile(self, rt: DeviceRuntime, wd: str, remote_source: str, keys: list[str], staging: Path) -> ProfileResult:
        run_dir = f"{wd}/runs/{uuid.uuid4().hex[:12]}"
        config = self.config.to_dict()
        if self.remote_inputs:
            config["inputs"] = f"{wd}/{self.remote_inputs}"
        job = {"source": f"{wd}/{remote_source}", "artifacts": keys, "config": config}
        jpath = staging / "job.json"
        jpath.write_text(json.dumps(job))
        rt.sh(f"mkdir -p {shlex.quote(run_dir)}", "creating the run directory")
        rt.t.put(jpath, f"{run_dir}/job.json")
        self.log(f"profiling {len(keys) or 1} artifact(s) on the device")

        def on_line(stream: str, line: str) -> None:
            if stream == "stdout" and line.startswith(DEVICE_TAG):
                self.device = DeviceInfo.from_dict(json.loads(line[len(DEVICE_TAG):]))
            elif stream == "stdout" and line.startswith(RESULT_TAG):
                r = ArtifactResult.from_dict(json.loads(line[len(RESULT_TAG):]))
                self.partial.append(r)
                self.log(f"{r.artifact}: {r.status}")
            elif stream == "stderr" and line.strip():
                self.log(line.strip())

        try:
            rt.run_agent(wd, run_dir, on_line, timeout=self.config.max_seconds * 3 * max(1, len(keys)) + 900)
            local = staging / "result.json"
            rt.collect(run_dir, local)
            return ProfileResult.from_dict(json.loads(local.read_text()))
        finally:
            try:
                rt.t.run(f"rm -rf {shlex.quote(run_dir)}", timeout=60)
            except DeviceError:
                pass  # the connection is gone; the next run's directory is a new one anyway
