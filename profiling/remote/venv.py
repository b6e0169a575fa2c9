"""The ``python-venv`` device runtime: Linux with Python >= 3.11, edgeship in a venv built from pushed wheels.

The device needs only ``python3`` (with ``venv``). The host downloads the runtime wheels for the
device's platform (:mod:`.wheels`), pushes the ones the device lacks to ``<workdir>/wheels`` and
builds ``<workdir>/venv`` from them with ``pip --no-index``: no internet needed on the device. A
stamp in the venv records what it was built from, so an unchanged runtime is not rebuilt.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgeship.errors import DeviceError
from edgeship.manifest import sha256_file
from edgeship.profiling.remote.runtime import RUNTIMES, DeviceRuntime, Probe, Provision
from edgeship.profiling.remote.wheels import Platform, RuntimeWheels, runtime_wheels

MIN_PYTHON = (3, 11)
_FACTS = ("hostname", "machine", "os", "kernel", "python", "glibc", "cpus", "mem_total")

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


@RUNTIMES.register("python-venv")
class PythonVenvRuntime(DeviceRuntime):
    def _probe(self, workdir: str, files: Sequence[str]) -> dict[str, Any]:
        cmd = f"python3 -c {shlex.quote(_PROBE)} {shlex.quote(workdir)} {shlex.quote(json.dumps(list(files)))}"
        code, out, err = self.t.run(cmd, timeout=600)
        if code == 127:
            raise DeviceError(f"{self.label}: no python3 on the device; install Python >= 3.11 with venv "
                              "(apt install python3 python3-venv)")
        if code != 0:
            raise DeviceError(f"{self.label}: probing the device failed (exit {code}): {err.strip()[-300:]}")
        return dict(json.loads(out.strip().splitlines()[-1]))

    def probe(self, workdir: str, files: Sequence[str]) -> Probe:
        info = self._probe(workdir, files)
        facts = {k: info.get(k) for k in _FACTS}
        facts.update(has_venv=info["has_venv"], runtime_stamp=info.get("runtime_stamp") or {})
        return Probe(workdir=str(info["workdir"]), hashes=dict(info["hashes"]), free_disk=int(info["free_disk"]),
                     mem_available=info.get("mem_available"), facts=facts)

    def plan(self, probe: Probe) -> Provision:
        f = probe.facts
        py = tuple(int(x) for x in str(f["python"]).split(".")[:2])
        if py < MIN_PYTHON:
            raise DeviceError(f"{self.label}: Python {f['python']} on the device; edgeship's runtime needs "
                              f">= {'.'.join(map(str, MIN_PYTHON))} (Raspberry Pi OS bookworm ships 3.11)")
        plat = Platform(machine=str(f["machine"]), python=".".join(str(f["python"]).split(".")[:2]), glibc=f["glibc"])
        stamp = f["runtime_stamp"]
        # an extra once installed stays: a later run without --inputs must not rebuild the venv without it
        extras = tuple(sorted({*self.extras, *((stamp.get("wheels") or {}).get("extras") or ())}))
        wheels = runtime_wheels(plat, self.log, extras)
        deps_ok = stamp.get("deps_stamp") == wheels.deps_stamp
        if deps_ok and stamp.get("edgeship_stamp") == wheels.edgeship_stamp:
            return Provision()
        missing: list[Path] = []
        if not deps_ok:
            have = self._probe(probe.workdir, [f"wheels/{p.name}" for p in wheels.deps])["hashes"]
            missing = [p for p in wheels.deps if have.get(f"wheels/{p.name}") != sha256_file(p)]
            if not f["has_venv"]:
                raise DeviceError(f"{self.label}: the device's python3 has no venv/ensurepip; apt install python3-venv")
        missing.append(wheels.edgeship)
        install = [wheels.edgeship] if deps_ok else [*wheels.deps, wheels.edgeship]
        # An installed wheel takes about three times its compressed size.
        return Provision(push=tuple((p, f"wheels/{p.name}") for p in missing),
                         install_bytes=3 * sum(p.stat().st_size for p in install),
                         state={"wheels": wheels, "deps_ok": deps_ok})

    def provision(self, probe: Probe, plan: Provision) -> None:
        wheels: RuntimeWheels = plan.state["wheels"]
        venv, whl = f"{probe.workdir}/venv", f"{probe.workdir}/wheels"
        pip = f"PIP_CONFIG_FILE=/dev/null {shlex.quote(venv)}/bin/python -m pip install -q --no-index " \
              f"--disable-pip-version-check --find-links {shlex.quote(whl)}"
        ew = shlex.quote(f"{whl}/{wheels.edgeship.name}" + (f"[{','.join(wheels.extras)}]" if wheels.extras else ""))
        if plan.state["deps_ok"]:
            self.log("updating edgeship in the device venv")
            self.sh(f"{pip} --no-deps --force-reinstall {ew}", "reinstalling edgeship on the device")
        else:
            self.log("creating the device venv from pushed wheels (no internet needed on the device)")
            self.sh(f"rm -rf {shlex.quote(venv)} && python3 -m venv {shlex.quote(venv)} && {pip} {ew}",
                    "installing the runtime into the device venv", timeout=1800)
        stamp = json.dumps({"deps_stamp": wheels.deps_stamp, "edgeship_stamp": wheels.edgeship_stamp,
                            "wheels": wheels.to_dict()})
        self.sh(f"printf %s {shlex.quote(stamp)} > {shlex.quote(venv)}/edgeship-runtime.json", "writing the venv stamp")

    def agent_command(self, workdir: str, run_dir: str) -> str:
        return (f"cd {shlex.quote(run_dir)} && PIP_CONFIG_FILE=/dev/null exec {shlex.quote(workdir)}/venv/bin/python "
                "-m edgeship.profiling.remote.agent job.json result.json")
