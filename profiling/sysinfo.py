"""What machine a measurement was taken on. Torch-free; reads /proc and /sys where they exist."""

from __future__ import annotations

import functools
import os
import platform
import re
import sys
from pathlib import Path

from edgeship.profiling.results import DeviceInfo

RUNTIME_PACKAGES = ("onnxruntime", "ai-edge-litert", "tflite-runtime", "executorch", "numpy")


def cpu_model(root: Path = Path("/")) -> str:
    try:
        text = (root / "proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    for line in text.splitlines():
        k, sep, v = line.partition(":")
        if sep:
            fields.setdefault(k.strip(), v.strip())
    for key in ("model name", "Model", "Hardware", "cpu model"):
        if fields.get(key):
            return fields[key]
    part = fields.get("CPU part")
    return f"ARM CPU part {part}" if part else platform.machine()


def board_model(root: Path = Path("/")) -> str | None:
    for rel in ("proc/device-tree/model", "sys/firmware/devicetree/base/model"):
        try:
            return (root / rel).read_bytes().rstrip(b"\0").decode(errors="replace")
        except OSError:
            continue
    try:
        for line in (root / "proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("Model"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


def cpu_freq_mhz() -> dict[str, float] | None:
    try:
        import psutil

        f = psutil.cpu_freq()
    except Exception:  # psutil raises various errors on exotic platforms
        return None
    if f is None:
        return None
    return {"current": float(f.current), "min": float(f.min), "max": float(f.max)}


def emulation() -> str | None:
    """'qemu-user' when this process runs under qemu user-mode emulation, else None.

    qemu-user passes QEMU_* settings through the environment and the virtual Pi
    sets EDGESHIP_EMULATED; either marks timings as emulated, never device latency.
    """
    if os.environ.get("EDGESHIP_EMULATED"):
        return os.environ["EDGESHIP_EMULATED"]
    if os.environ.get("QEMU_CPU") and platform.machine() in ("aarch64", "armv7l"):
        return "qemu-user"
    return None


def dist_version(dist: str) -> str | None:
    """An installed distribution's version, or None.

    Read from its ``NAME-VERSION.dist-info`` directory name on ``sys.path``: importing ``importlib.metadata`` (and
    the email parser it brings) added 3.3 MB to a profiling worker's RSS, measured. Installs without a dist-info
    directory (eggs, some editable installs) fall back to importlib.metadata.
    """
    version = _dist_infos().get(_normalize(dist))
    if version is not None:
        return version
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@functools.cache
def _dist_infos() -> dict[str, str]:
    """Normalized distribution name -> version, from the dist-info directories on ``sys.path`` (first one wins, as
    for imports); listed once per process, not once per package asked for."""
    found: dict[str, str] = {}
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for n in names:
            if n.endswith(".dist-info"):
                name, _, version = n[: -len(".dist-info")].partition("-")
                if version:
                    found.setdefault(_normalize(name), version)
    return found


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def runtime_versions() -> dict[str, str]:
    return {pkg: v for pkg in RUNTIME_PACKAGES if (v := dist_version(pkg)) is not None}


def describe() -> DeviceInfo:
    uname = platform.uname()
    return DeviceInfo(hostname=uname.node, arch=platform.machine(), cpu_model=cpu_model(), board=board_model(),
                      logical_cpus=os.cpu_count(), cpu_freq_mhz=cpu_freq_mhz(), os=f"{uname.system} {uname.release}",
                      python=platform.python_version(), python_executable=sys.executable, runtimes=runtime_versions(),
                      emulated=emulation())
