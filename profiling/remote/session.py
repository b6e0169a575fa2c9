"""Profile on one remote device: connect, check, push, set up the runtime, run, pull, clean up.

The device needs only ``python3`` (>= 3.11, with ``venv``) and an SSH server. Everything else
arrives from the host: the bundle (only files whose sha256 differs from the copy already there),
and a venv built from wheels the host downloaded for the device's platform (no internet needed
on the device). Layout on the device, under the work directory (default
``~/.cache/edgeship-device``)::

    bundles/<name>/   the pushed bundle, kept between runs so unchanged artifacts are not re-sent
    wheels/           runtime wheels, kept for the same reason
    venv/             the runtime (edgeship without torch), with a stamp of what it was built from
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
from edgeship.profiling.remote.transport import (
    DEVICE_TAG,
    RESULT_TAG,
    ConnectOptions,
    DeviceURL,
    Transport,
    transport_for,
)
from edgeship.profiling.remote.wheels import Platform, RuntimeWheels, runtime_wheels
from edgeship.profiling.results import ArtifactResult, DeviceInfo, DeviceRun, ProfileResult, RunConfig

DEFAULT_WORKDIR = "~/.cache/edgeship-device"
MIN_PYTHON = (3, 11)
Log = Callable[[str], None]

# Runs with the device's own python3 before any venv exists: standard library only.
_PROBE = r"""
import hashlib, json, os, platform, shutil, sys
w = os.path.expanduser(sys.argv[1]); os.makedirs(w, exist_ok=True)
def sha(p):
    h = hashlib.sha256()
    with open(p, 'rb') as f:
        for b in iter(lambda: f.read(1 << 20), b''): h.update(b)
    return h.hexdigest()
mem = {}
try:
    for line in open('/proc/meminfo'):
        k, _, v = line.partition(':'); mem[k] = int(v.split()[0]) * 1024
except OSError: pass
osr = {}
try:
    for line in open('/etc/os-release'):
        k, _, v = line.strip().partition('='); osr[k] = v.strip('"')
except OSError: pass
stamp = None
try: stamp = json.load(open(os.path.join(w, 'venv', 'edgeship-runtime.json')))
except (OSError, ValueError): pass
hashes = {}
for rel in json.loads(sys.argv[2]):
    p = os.path.join(w, rel); hashes[rel] = sha(p) if os.path.isfile(p) else None
try: import ensurepip; has_venv = True
except ImportError: has_venv = False
du = shutil.disk_usage(w)
print(json.dumps({"workdir": w, "machine": platform.machine(), "system": platform.system(),
    "kernel": platform.release(), "os": osr.get('PRETTY_NAME'), "python": platform.python_version(),
    "glibc": platform.libc_ver()[1] or None, "has_venv": has_venv, "free_disk": du.free,
    "mem_available": mem.get('MemAvailable'), "mem_total": mem.get('MemTotal'), "cpus": os.cpu_count(),
    "hostname": platform.node(), "runtime_stamp": stamp, "hashes": hashes}))
"""


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


class DeviceSession:
    """One device, one run. ``run()`` returns the device's entry for the combined results document."""

    def __init__(self, url: str, options: ConnectOptions, config: RunConfig, log: Log,
                 workdir: str | None = None, name: str | None = None) -> None:
        self.url_text = url
        self.url = DeviceURL.parse(url)
        self.options = options
        self.config = config
        self.log = log
        self.workdir = self.url.workdir or workdir or DEFAULT_WORKDIR
        self.name = name or str(self.url)
        self.identity: dict[str, Any] = {"url": str(self.url), "name": self.name}
        self.partial: list[ArtifactResult] = []
        self.device: DeviceInfo | None = None
        self.result: ProfileResult | None = None
        self.timings: dict[str, float] = {}
        self.t: Transport | None = None
        self.source_text = ""

    def _sh(self, command: str, what: str, timeout: float | None = 600) -> str:
        assert self.t is not None
        code, out, err = self.t.run(command, timeout=timeout)
        if code != 0:
            tail = " | ".join(err.strip().splitlines()[-3:]) or out.strip()[-300:]
            raise DeviceError(f"{self.name}: {what} failed (exit {code}): {tail}")
        return out

    def _probe(self, rels: list[str]) -> dict[str, Any]:
        cmd = f"python3 -c {shlex.quote(_PROBE)} {shlex.quote(self.workdir)} {shlex.quote(json.dumps(rels))}"
        assert self.t is not None
        code, out, err = self.t.run(cmd, timeout=600)
        if code == 127:
            raise DeviceError(f"{self.name}: no python3 on the device; install Python >= 3.11 with venv "
                              "(apt install python3 python3-venv)")
        if code != 0:
            raise DeviceError(f"{self.name}: probing the device failed (exit {code}): {err.strip()[-300:]}")
        return dict(json.loads(out.strip().splitlines()[-1]))

    def _check(self, info: dict[str, Any], to_push: list[PushFile], install: list[Path], wheels_missing: list[Path],
               biggest_artifact: int) -> None:
        py = tuple(int(x) for x in info["python"].split(".")[:2])
        if py < MIN_PYTHON:
            raise DeviceError(f"{self.name}: Python {info['python']} on the device; edgeship's runtime needs "
                              f">= {'.'.join(map(str, MIN_PYTHON))} (Raspberry Pi OS bookworm ships 3.11)")
        if install and not info["has_venv"]:
            raise DeviceError(f"{self.name}: the device's python3 has no venv/ensurepip; apt install python3-venv")
        push_bytes = sum(f.size for f in to_push) + sum(p.stat().st_size for p in wheels_missing)
        # An installed wheel takes about three times its compressed size; keep a margin for results and logs.
        install_bytes = 3 * sum(p.stat().st_size for p in install)
        need = push_bytes + install_bytes + 16 * 2**20
        if info["free_disk"] < need:
            raise DeviceError(f"{self.name}: only {info['free_disk'] / 2**20:.1f} MB free in {info['workdir']}, this run "
                              f"needs about {need / 2**20:.1f} MB (push {push_bytes / 2**20:.1f} MB, runtime install "
                              f"{install_bytes / 2**20:.1f} MB); free space or choose another ?workdir=")
        mem = info.get("mem_available")
        if mem is not None and mem < biggest_artifact + 64 * 2**20:
            raise DeviceError(f"{self.name}: {mem / 2**20:.0f} MB of RAM available, the largest artifact alone is "
                              f"{biggest_artifact / 2**20:.0f} MB (+ runtime); close programs or profile a smaller one")

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
        self.log(f"connecting to {self.url}")
        self.t = transport_for(self.url, self.options)
        self.t.connect()
        self.identity.update(self.t.identity())
        t0 = self._stage("connect", t0)

        info = self._probe([f.remote for f in files])
        self.identity.update({k: info[k] for k in ("hostname", "machine", "os", "kernel", "python", "glibc", "cpus")})
        self.identity["mem_total_mb"] = round((info.get("mem_total") or 0) / 2**20)
        wd = info["workdir"]
        to_push = [f for f in files if info["hashes"].get(f.remote) != f.sha256]
        plat = Platform(machine=info["machine"], python=".".join(info["python"].split(".")[:2]), glibc=info["glibc"])
        wheels = runtime_wheels(plat, self.log)
        stamp = info.get("runtime_stamp") or {}
        deps_ok = stamp.get("deps_stamp") == wheels.deps_stamp
        edgeship_ok = deps_ok and stamp.get("edgeship_stamp") == wheels.edgeship_stamp
        wheels_missing: list[Path] = []
        if not deps_ok:
            have = self._probe([f"wheels/{p.name}" for p in wheels.deps])["hashes"]
            wheels_missing = [p for p in wheels.deps if have.get(f"wheels/{p.name}") != sha256_file(p)]
        if not edgeship_ok:
            wheels_missing.append(wheels.edgeship)
        biggest = max((f.size for f in files if f.remote.split("/")[-1] != MANIFEST_NAME), default=0)
        install = [] if edgeship_ok else [wheels.edgeship] if deps_ok else [*wheels.deps, wheels.edgeship]
        self._check(info, to_push, install, wheels_missing, biggest)
        t0 = self._stage("check", t0)

        skipped = len(files) - len(to_push)
        self.log(f"pushing {len(to_push)} file(s), {sum(f.size for f in to_push) / 2**20:.1f} MB "
                 f"({skipped} unchanged, skipped)")
        dirs = sorted({f"{wd}/{f.remote.rsplit('/', 1)[0]}" for f in to_push} | {f"{wd}/wheels"})
        self._sh("mkdir -p " + " ".join(shlex.quote(d) for d in dirs), "creating directories")
        for f in to_push:
            self.t.put(f.local, f"{wd}/{f.remote}")
        for p in wheels_missing:
            self.t.put(p, f"{wd}/wheels/{p.name}")
        self.identity["pushed_files"], self.identity["skipped_files"] = len(to_push), skipped
        t0 = self._stage("push", t0)

        if not edgeship_ok:
            self._install(wd, wheels, deps_ok)
        t0 = self._stage("runtime", t0)

        result = self._profile(wd, remote_source, keys, staging)
        self._stage("profile", t0)
        dev = result.device
        self.identity.update(arch=dev.arch, cpu_model=dev.cpu_model, board=dev.board, runtimes=dict(dev.runtimes),
                             emulated=dev.emulated)
        return DeviceRun(result, url=str(self.url), identity=dict(self.identity), timings_s=dict(self.timings))

    def _install(self, wd: str, wheels: RuntimeWheels, deps_ok: bool) -> None:
        venv, whl = f"{wd}/venv", f"{wd}/wheels"
        pip = f"PIP_CONFIG_FILE=/dev/null {shlex.quote(venv)}/bin/python -m pip install -q --no-index " \
              f"--disable-pip-version-check --find-links {shlex.quote(whl)}"
        ew = shlex.quote(f"{whl}/{wheels.edgeship.name}")
        if deps_ok:
            self.log("updating edgeship in the device venv")
            self._sh(f"{pip} --no-deps --force-reinstall {ew}", "reinstalling edgeship on the device")
        else:
            self.log("creating the device venv from pushed wheels (no internet needed on the device)")
            self._sh(f"rm -rf {shlex.quote(venv)} && python3 -m venv {shlex.quote(venv)} && {pip} {ew}",
                     "installing the runtime into the device venv", timeout=1800)
        stamp = json.dumps({"deps_stamp": wheels.deps_stamp, "edgeship_stamp": wheels.edgeship_stamp,
                            "wheels": wheels.to_dict()})
        self._sh(f"printf %s {shlex.quote(stamp)} > {shlex.quote(venv)}/edgeship-runtime.json", "writing the venv stamp")

    def _profile(self, wd: str, remote_source: str, keys: list[str], staging: Path) -> ProfileResult:
        assert self.t is not None
        run_dir = f"{wd}/runs/{uuid.uuid4().hex[:12]}"
        job = {"source": f"{wd}/{remote_source}", "artifacts": keys, "config": self.config.to_dict()}
        jpath = staging / "job.json"
        jpath.write_text(json.dumps(job))
        self._sh(f"mkdir -p {shlex.quote(run_dir)}", "creating the run directory")
        self.t.put(jpath, f"{run_dir}/job.json")
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

        cmd = (f"cd {shlex.quote(run_dir)} && PIP_CONFIG_FILE=/dev/null exec {shlex.quote(wd)}/venv/bin/python "
               "-m edgeship.profiling.remote.agent job.json result.json")
        try:
            code, _, err = self.t.run(cmd, on_line=on_line, timeout=self.config.max_seconds * 3 * max(1, len(keys)) + 900)
            if code != 0:
                tail = " | ".join(x for x in err.strip().splitlines()[-2:] if x)
                raise DeviceError(f"{self.name}: the device runner exited with {code}: {tail}")
            local = staging / "result.json"
            self.t.get(f"{run_dir}/result.json", local)
            self.result = ProfileResult.from_dict(json.loads(local.read_text()))
            return self.result
        finally:
            try:
                self.t.run(f"rm -rf {shlex.quote(run_dir)}", timeout=60)
            except DeviceError:
                pass  # the connection is gone; the next run's directory is a new one anyway

