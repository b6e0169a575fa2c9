"""Profile on one remote device: connect, probe, push, provision the runtime, run, collect, clean up.

How the host reaches the device is a :class:`~.transport.Transport` (``ssh://``); what edgeship
needs there is a :class:`~.runtime.DeviceRuntime` (``python-venv``: Python >= 3.11 and runtime wheels
pushed from the host); what the agent measures there is a :class:`~.jobs.RemoteJob` (``encoder``: the ordinary
runner, ``llm``: the LLM bench). This module only sequences them. Everything arrives from the host: the
bundle (only files whose sha256 differs from the copy already there) and the runtime. Layout on the
device, under the work directory (default ``~/.cache/edgeship-device``)::

    bundles/<name>/   the pushed bundle, kept between runs so unchanged artifacts are not re-sent
    wheels/, venv/    the runtime's own files (python-venv), kept for the same reason
    inputs/<sha>/     --inputs: the user's inputs as the host prepared them (.npz), kept like the bundle
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
from typing import Any, Generic, TypeVar

from edgeship.errors import DeviceError, EdgeshipError
from edgeship.manifest import MANIFEST_NAME, ArtifactRecord, Bundle, load_bundle, sha256_file
from edgeship.profiling.remote.jobs import RemoteJob, RemoteOutcome
from edgeship.profiling.remote.runtime import DEFAULT_RUNTIME, DeviceRuntime, Probe, Provision, runtime_for
from edgeship.profiling.remote.transport import (
    DEVICE_TAG,
    RESULT_TAG,
    DeviceURL,
    Transport,
    TransportOptions,
    transport_for,
)
from edgeship.profiling.results import DeviceInfo

DEFAULT_WORKDIR = "~/.cache/edgeship-device"
RunT = TypeVar("RunT")  # what a device's run returns: the job's result type
Log = Callable[[str], None]


@dataclass(frozen=True)
class PushFile:
    local: Path
    remote: str  # relative to the device work directory
    sha256: str
    size: int


@dataclass(frozen=True)
class BundleFiles:
    """What one run pushes: the files, the artifacts to run (none for a single model file), where the source lands."""

    files: list[PushFile]
    bundle: Bundle | None
    artifacts: list[ArtifactRecord]
    remote_source: str

    @property
    def keys(self) -> list[str]:
        return [a.key for a in self.artifacts]


def _artifact_files(bundle: Bundle, a: ArtifactRecord, base: str) -> list[PushFile]:
    """One file, or every file of a folder artifact (an ONNX GenAI model), each with its manifest checksum."""
    if not a.files:
        return [PushFile(bundle.path_of(a), f"{base}/{a.path}", a.sha256, a.size_bytes)]
    return [PushFile(bundle.path_of(a) / rel, f"{base}/{a.path}/{rel}", str(meta["sha256"]), int(meta["size_bytes"]))
            for rel, meta in sorted(a.files.items())]


def _bundle_files(source: Path, artifact: str | None, staging: Path) -> BundleFiles:
    """Files to push for a bundle (or one model file), the artifacts to run, and the remote source path."""
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
        return BundleFiles([PushFile(source, rel, sha256_file(source), source.stat().st_size)], None, [], rel)
    bundle = load_bundle(source, verify=True)
    m = bundle.manifest
    arts = [m.artifact(artifact)] if artifact else list(m.artifacts)
    base = f"bundles/{source.resolve().name}"
    files = [f for a in arts for f in _artifact_files(bundle, a, base)]
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
    return BundleFiles(files, bundle, arts, base)


def _input_files(inputs: str, bundle: Bundle | None, staging: Path) -> tuple[list[PushFile], str]:
    """--inputs: the user's inputs prepared here (tokenized or decoded with the bundle's files, by the code the
    device would run) as one .npz to push, and where it goes under the work directory. A bad file is one error
    on the host before anything is sent; the device needs nothing beyond the plain runtime."""
    from edgeship.profiling.inputs import read_inputs, write_prepared

    if bundle is None:
        raise DeviceError("--inputs needs a bundle: its manifest says how to tokenize or preprocess them and which "
                          "inputs the model takes (a bare model file has neither)")
    user = read_inputs(inputs, bundle.manifest.inputs, bundle.manifest.preprocessing, bundle.root)
    local = staging / "inputs.npz"
    write_prepared(user, local)
    rel = f"inputs/{user.sha256[:16]}/{user.name}.npz"  # per content, so runs on other inputs do not collide
    return [PushFile(local, rel, sha256_file(local), local.stat().st_size)], rel


class DeviceSession(Generic[RunT]):
    """One device, one run of ``job``. ``run()`` returns the job's result for the device, failed or not."""

    def __init__(self, url: str, options: TransportOptions, job: RemoteJob[RunT], log: Log,
                 workdir: str | None = None, name: str | None = None, runtime: str = DEFAULT_RUNTIME) -> None:
        self.url = DeviceURL.parse(url)
        self.options = options
        self.job = job
        self.log = log
        self.workdir = self.url.workdir or workdir or DEFAULT_WORKDIR
        self.name = name or str(self.url)
        self.runtime_cls = runtime_for(runtime)
        self.identity: dict[str, Any] = {"url": str(self.url), "name": self.name}
        self.partial: list[dict[str, Any]] = []  # streamed by the agent: what survives a lost connection
        self.device: DeviceInfo | None = None
        self.timings: dict[str, float] = {}
        self.t: Transport | None = None
        self.source_text = ""
        self.remote_inputs: str | None = None  # --inputs: where the pushed file is, under the work directory

    def run(self, source: Path, artifact: str | None) -> RunT:
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

    def failed(self, error: str) -> RunT:
        self.log(f"FAILED: {error}")
        # What finished before the failure, in the same schema as a complete run.
        return self.job.finish(None, self.device, self.partial, self.source_text, self._outcome("error", error))

    def _outcome(self, status: str = "ok", error: str | None = None) -> RemoteOutcome:
        return RemoteOutcome(url=str(self.url), identity=dict(self.identity), status=status, error=error,
                             timings_s=dict(self.timings))

    def _stage(self, name: str, t0: float) -> float:
        now = time.monotonic()
        self.timings[name] = round(now - t0, 3)
        return now

    def _run(self, source: Path, artifact: str | None, staging: Path) -> RunT:
        self.source_text = str(source)
        t0 = time.monotonic()
        push = _bundle_files(source, artifact, staging)
        self.job.check(push.bundle, push.artifacts)  # what the device cannot run is refused before connecting
        files = push.files
        inputs = self.job.inputs()
        if inputs:
            input_files, self.remote_inputs = _input_files(inputs, push.bundle, staging)
            files = [*files, *input_files]
        self.log(f"connecting to {self.url}")
        self.t = transport_for(self.url, self.options)
        self.t.connect()
        self.identity.update(self.t.identity())
        rt = self.runtime_cls(self.t, self.name, self.log)
        t0 = self._stage("connect", t0)

        probe = rt.probe(self.workdir, [f.remote for f in files])
        facts = dict(probe.facts)
        self.identity.update({k: v for k, v in facts.items() if k not in ("mem_total", "has_venv", "runtime_stamp")})
        self.identity["mem_total_mb"] = round((facts.get("mem_total") or 0) / 2**20)
        to_push = [f for f in files if probe.hashes.get(f.remote) != f.sha256]
        plan = rt.plan(probe, self.job.requirements(push.artifacts))
        self._check_room(probe, to_push, plan, _biggest(push))
        t0 = self._stage("check", t0)

        self._push(rt, probe.workdir, to_push, plan)
        self.identity["pushed_files"], self.identity["skipped_files"] = len(to_push), len(files) - len(to_push)
        t0 = self._stage("push", t0)
        if plan.needed:
            rt.provision(probe, plan)
        t0 = self._stage("runtime", t0)

        document = self._profile(rt, probe.workdir, push.remote_source, push.keys, staging)
        self._stage("profile", t0)
        dev = self.device or DeviceInfo.from_dict(document.get("device") or {})
        self.identity.update(arch=dev.arch, cpu_model=dev.cpu_model, board=dev.board, runtimes=dict(dev.runtimes),
                             emulated=dev.emulated)
        return self.job.finish(document, dev, self.partial, self.source_text, self._outcome())

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

    def _profile(self, rt: DeviceRuntime, wd: str, remote_source: str, keys: list[str],
                 staging: Path) -> dict[str, Any]:
        run_dir = f"{wd}/runs/{uuid.uuid4().hex[:12]}"
        config = self.job.config_dict()
        if self.remote_inputs:
            config["inputs"] = f"{wd}/{self.remote_inputs}"
        job = {"kind": self.job.kind, "source": f"{wd}/{remote_source}", "artifacts": keys, "config": config}
        jpath = staging / "job.json"
        jpath.write_text(json.dumps(job))
        rt.sh(f"mkdir -p {shlex.quote(run_dir)}", "creating the run directory")
        rt.t.put(jpath, f"{run_dir}/job.json")
        self.log(f"profiling {len(keys) or 1} artifact(s) on the device")

        def on_line(stream: str, line: str) -> None:
            if stream == "stdout" and line.startswith(DEVICE_TAG):
                self.device = DeviceInfo.from_dict(json.loads(line[len(DEVICE_TAG):]))
            elif stream == "stdout" and line.startswith(RESULT_TAG):
                r = json.loads(line[len(RESULT_TAG):])
                self.partial.append(r)
                self.log(f"{r.get('artifact')}: {r.get('status')}")
            elif stream == "stderr" and line.strip():
                self.log(line.strip())

        try:
            rt.run_agent(wd, run_dir, on_line, timeout=self.job.timeout_s(len(keys)))
            local = staging / "result.json"
            rt.collect(run_dir, local)
            return dict(json.loads(local.read_text()))
        finally:
            try:
                rt.t.run(f"rm -rf {shlex.quote(run_dir)}", timeout=60)
            except DeviceError:
                pass  # the connection is gone; the next run's directory is a new one anyway


def _biggest(push: BundleFiles) -> int:
    """The largest artifact's bytes (all files of a folder artifact): what must fit in RAM at once."""
    if not push.artifacts:
        return max((f.size for f in push.files), default=0)
    return max(a.size_bytes for a in push.artifacts)  # a folder's size_bytes is the sum of its files
