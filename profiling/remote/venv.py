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
from typing import Any

from edgeship.errors import DeviceError
from edgeship.manifest import sha256_file
from edgeship.profiling.remote.runtime import RUNTIMES, DeviceRuntime, Probe, Provision
from edgeship.profiling.remote.wheels import Platform, RuntimeWheels, dist_name, extra_wheels, runtime_wheels

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

    def plan(self, probe: Probe, requirements: Sequence[str] = ()) -> Provision:
        f = probe.facts
        py = tuple(int(x) for x in str(f["python"]).split(".")[:2])
        if py < MIN_PYTHON:
            raise DeviceError(f"{self.label}: Python {f['python']} on the device; edgeship's runtime needs "
                              f">= {'.'.join(map(str, MIN_PYTHON))} (Raspberry Pi OS bookworm ships 3.11)")
        plat = Platform(machine=str(f["machine"]), python=".".join(str(f["python"]).split(".")[:2]), glibc=f["glibc"])
        wheels = runtime_wheels(plat, self.log)
        stamp = f["runtime_stamp"]
        deps_ok = stamp.get("deps_stamp") == wheels.deps_stamp
        edgeship_ok = deps_ok and stamp.get("edgeship_stamp") == wheels.edgeship_stamp
        # Extras (what one kind of job needs, e.g. onnxruntime-genai) are added to the venv and kept, so encoder
        # and LLM runs on one device do not rebuild it in turn.
        have_extras = sorted(stamp.get("extras") or []) if deps_ok else []
        need_extras = [r for r in dict.fromkeys(requirements) if r not in have_extras]
        if edgeship_ok and not need_extras:
            return Provision()
        try:
            extras = extra_wheels(plat, need_extras, self.log) if need_extras else ()
        except DeviceError as e:
            raise DeviceError(f"{self.label}: {e}") from None
        candidates = [*(wheels.deps if not deps_ok else ()), *extras]
        have = self._probe(probe.workdir, [f"wheels/{p.name}" for p in candidates])["hashes"] if candidates else {}
        missing = [p for p in candidates if have.get(f"wheels/{p.name}") != sha256_file(p)]
        if not deps_ok and not f["has_venv"]:
            raise DeviceError(f"{self.label}: the device's python3 has no venv/ensurepip; apt install python3-venv")
        if not edgeship_ok:
            missing.append(wheels.edgeship)
        install = [*(wheels.deps if not deps_ok else ()), *extras, *(() if edgeship_ok else (wheels.edgeship,))]
        # An installed wheel takes about three times its compressed size.
        return Provision(push=tuple((p, f"wheels/{p.name}") for p in missing),
                         install_bytes=3 * sum(p.stat().st_size for p in install),
                         state={"wheels": wheels, "deps_ok": deps_ok, "edgeship_ok": edgeship_ok,
                                "extras": need_extras,
                                # one entry per distribution: a new pin replaces the one installed before
                                "all_extras": sorted({dist_name(r): r for r in [*have_extras, *need_extras]}.values())})

    def provision(self, probe: Probe, plan: Provision) -> None:
        wheels: RuntimeWheels = plan.state["wheels"]
        venv, whl = f"{probe.workdir}/venv", f"{probe.workdir}/wheels"
        pip = f"PIP_CONFIG_FILE=/dev/null {shlex.quote(venv)}/bin/python -m pip install -q --no-index " \
              f"--disable-pip-version-check --find-links {shlex.quote(whl)}"
        ew = shlex.quote(f"{whl}/{wheels.edgeship.name}")
        extras = " ".join(shlex.quote(r) for r in plan.state["extras"])
        if not plan.state["deps_ok"]:
            self.log("creating the device venv from pushed wheels (no internet needed on the device)")
            self.sh(f"rm -rf {shlex.quote(venv)} && python3 -m venv {shlex.quote(venv)} && {pip} {ew} {extras}",
                    "installing the runtime into the device venv", timeout=1800)
        else:
            if not plan.state["edgeship_ok"]:
                self.log("updating edgeship in the device venv")
                self.sh(f"{pip} --no-deps --force-reinstall {ew}", "reinstalling edgeship on the device")
            if extras:
                self.log(f"adding {', '.join(plan.state['extras'])} to the device venv")
                self.sh(f"{pip} {extras}", f"installing {', '.join(plan.state['extras'])} on the device",
                        timeout=1800)
        stamp = json.dumps({"deps_stamp": wheels.deps_stamp, "edgeship_stamp": wheels.edgeship_stamp,
                            "extras": plan.state["all_extras"], "wheels": wheels.to_dict()})
        self.sh(f"printf %s {shlex.quote(stamp)} > {shlex.quote(venv)}/edgeship-runtime.json", "writing the venv stamp")

    def agent_command(self, workdir: str, run_dir: str) -> str:
        return (f"cd {shlex.quote(run_dir)} && PIP_CONFIG_FILE=/dev/null exec {shlex.quote(workdir)}/venv/bin/python "
                "-m edgeship.profiling.remote.agent job.json result.json")
