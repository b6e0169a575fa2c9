"""The device runtime as wheels the HOST fetches, so a device without internet can be set up.

``pip download --only-binary=:all: --platform ... --python-version ...`` gets edgeship's runtime
dependencies (pinned to the versions this host runs, so x86 and the device use the same runtime
release where one exists) for the device's platform; edgeship itself is built into a wheel from
this checkout. Both are cached under ``~/.cache/edgeship/wheels``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from edgeship.errors import DeviceError

Log = Callable[[str], None]
_LOCK = threading.Lock()
_SOURCE_DIRS = ("sdk", "profiling", "targets", "exporters")


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgeship" / "wheels"


@dataclass(frozen=True)
class Platform:
    """What pip needs to pick wheels for a device."""

    machine: str  # aarch64, x86_64, armv7l
    python: str  # "3.11"
    glibc: str | None  # "2.36"; None on musl or unknown

    @property
    def key(self) -> str:
        return f"cp{self.python.replace('.', '')}-{self.machine}-glibc{self.glibc or 'none'}"

    def pip_args(self) -> list[str]:
        if not self.glibc:
            raise DeviceError(f"device with {self.machine} and no glibc: there are no manylinux wheels for it; "
                              "use a glibc distribution (Raspberry Pi OS, Debian, Ubuntu)")
        major, minor = (int(x) for x in self.glibc.split(".")[:2])
        plats = [f"manylinux_{major}_{m}_{self.machine}" for m in range(minor, 16, -1)]
        plats.append(f"manylinux2014_{self.machine}")
        args = ["--only-binary=:all:", "--python-version", self.python, "--implementation", "cp",
                "--abi", f"cp{self.python.replace('.', '')}", "--abi", "abi3", "--abi", "none"]
        for p in plats:
            args += ["--platform", p]
        return args


@dataclass(frozen=True)
class RuntimeWheels:
    deps: tuple[Path, ...]
    edgeship: Path
    deps_stamp: str
    edgeship_stamp: str

    def to_dict(self) -> dict[str, object]:
        return {"deps": [p.name for p in self.deps], "edgeship": self.edgeship.name,
                "deps_stamp": self.deps_stamp, "edgeship_stamp": self.edgeship_stamp}


def runtime_requirements() -> list[str]:
    """edgeship's plain dependencies (the device runtime), pinned to this host's versions where installed."""
    reqs = []
    for req in metadata.requires("edgeship") or []:
        if "extra ==" in req:
            continue
        name = re.split(r"[\s;<>=!~\[]", req, maxsplit=1)[0]
        marker = req.partition(";")[2].strip()
        try:
            spec = f"{name}=={metadata.version(name)}"
        except metadata.PackageNotFoundError:
            spec = req.partition(";")[0].strip()
        reqs.append(f"{spec}; {marker}" if marker else spec)
    return reqs


def _pip(args: list[str], what: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = " | ".join(line for line in proc.stderr.splitlines() if "ERROR" in line)[-400:]
        raise DeviceError(f"{what} failed: {tail or proc.stderr.strip()[-400:]}")


def dist_name(req: str) -> str:
    """The normalised distribution name of a requirement string ("ai_edge_litert==2.3.0" -> "ai-edge-litert")."""
    return re.split(r"[\s;<>=!~\[]", req, maxsplit=1)[0].lower().replace("_", "-")


def extra_requirement(dist: str) -> str:
    """A distribution a job needs beyond the plain runtime (onnxruntime-genai for ONNX GenAI LLM folders), pinned
    to this host's version like :func:`runtime_requirements`, else as edgeship's extras declare it. The extra's
    environment marker is left out: it describes the host, and pip says itself when the device has no wheel."""
    try:
        return f"{dist}=={metadata.version(dist)}"
    except metadata.PackageNotFoundError:
        pass
    for req in metadata.requires("edgeship") or []:
        if dist_name(req) == dist_name(dist):
            return req.partition(";")[0].strip()
    return dist


def download_deps(plat: Platform, log: Log = print, reqs: list[str] | None = None,
                  extras: bool = False) -> tuple[tuple[Path, ...], str]:
    """Wheels of the runtime dependencies for ``plat``; downloaded once, then from the cache.

    ``extras``: ``reqs`` are additions to the runtime (:func:`extra_wheels`): only their own wheels (the device
    resolves their dependencies against the runtime it has) and only the versions asked for, so the device runs the
    host's release or says it cannot."""
    reqs = reqs if reqs is not None else runtime_requirements()
    dest = cache_root() / plat.key
    stamp = hashlib.sha256("\n".join([*reqs, "--no-deps"] if extras else reqs).encode()).hexdigest()[:16]
    done = dest / f"complete-{stamp}.json"
    if done.is_file():
        names = json.loads(done.read_text())
        files = tuple(dest / n for n in names)
        if all(f.is_file() for f in files):
            return files, stamp
    dest.mkdir(parents=True, exist_ok=True)
    log(f"downloading runtime wheels for {plat.key}: {', '.join(r.split(';')[0] for r in reqs)}")
    with tempfile.TemporaryDirectory(prefix="edgeship-dl-") as td:
        rfile = Path(td, "requirements.txt")
        rfile.write_text("\n".join(reqs) + "\n")
        only = ["--no-deps"] if extras else []
        try:
            _pip(["download", "-q", *only, *plat.pip_args(), "-d", td, "-r", str(rfile)], f"pip download for {plat.key}")
        except DeviceError:
            if extras:
                raise
            # The host's exact versions may have no wheel for this platform: let pip pick the newest that has one.
            loose = [re.sub(r"==[^;]+", "", r) for r in reqs]
            rfile.write_text("\n".join(loose) + "\n")
            _pip(["download", "-q", *plat.pip_args(), "-d", td, "-r", str(rfile)],
                 f"pip download of {', '.join(loose)} for {plat.key} (no wheels for this device?)")
        names = sorted(p.name for p in Path(td).glob("*.whl"))
        for n in names:
            shutil.copy2(Path(td, n), dest / n)
    done.write_text(json.dumps(names))
    return tuple(dest / n for n in names), stamp


def _source_root() -> Path | None:
    import edgeship

    root = Path(edgeship.__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and 'name = "edgeship"' in pyproject.read_text(encoding="utf-8"):
        return root
    return None


def _source_hash(root: Path) -> str:
    h = hashlib.sha256()
    files = [root / "pyproject.toml", *(p for d in _SOURCE_DIRS for p in sorted((root / d).rglob("*"))
                                        if p.is_file() and p.suffix in (".py", ".toml", ".txt", ".typed"))]
    for p in files:
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def edgeship_wheel(log: Log = print) -> tuple[Path, str]:
    """A wheel of this edgeship (built from the checkout, cached by a hash of its sources)."""
    from edgeship import __version__

    root = _source_root()
    if root is None:  # installed from a wheel: fetch the same release
        dest = cache_root() / f"edgeship-{__version__}"
        found = sorted(dest.glob("edgeship-*.whl"))
        if not found:
            dest.mkdir(parents=True, exist_ok=True)
            _pip(["download", "-q", "--no-deps", "-d", str(dest), f"edgeship=={__version__}"], "pip download edgeship")
            found = sorted(dest.glob("edgeship-*.whl"))
        return found[0], __version__
    stamp = _source_hash(root)
    dest = cache_root() / f"edgeship-src-{stamp}"
    found = sorted(dest.glob("edgeship-*.whl"))
    if found:
        return found[0], stamp
    log(f"building the edgeship wheel from {root}")
    with tempfile.TemporaryDirectory(prefix="edgeship-wheel-") as td:
        # Build from a copy: building in the checkout would leave build/ and egg-info behind.
        src = Path(td, "src")
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            if (root / name).is_file():
                shutil.copy2(root / name, src / name)
        for d in _SOURCE_DIRS:
            shutil.copytree(root / d, src / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        out = Path(td, "out")
        try:  # this environment's setuptools first: no index needed
            _pip(["wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)], "building the edgeship wheel")
        except DeviceError:  # too old a setuptools here: let pip fetch the build backend pyproject asks for
            _pip(["wheel", "-q", "--no-deps", "-w", str(out), str(src)], "building the edgeship wheel")
        built = sorted(out.glob("edgeship-*.whl"))
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built[0], dest / built[0].name)
    return dest / built[0].name, stamp


def runtime_wheels(plat: Platform, log: Log = print) -> RuntimeWheels:
    with _LOCK:  # fleet threads share one cache: one download per platform
        return _runtime_wheels(plat, log)


def extra_wheels(plat: Platform, reqs: list[str], log: Log = print) -> tuple[Path, ...]:
    """The wheels of ``reqs`` (additions to the runtime) for ``plat``, from the same cache; a one-line DeviceError
    naming them when the device's platform has none."""
    with _LOCK:
        try:
            return download_deps(plat, log, reqs, extras=True)[0]
        except DeviceError as e:
            raise DeviceError(f"{', '.join(reqs)} cannot be installed on this device ({plat.key}): {e}") from None


def _runtime_wheels(plat: Platform, log: Log) -> RuntimeWheels:
    deps, deps_stamp = download_deps(plat, log)
    wheel, stamp = edgeship_wheel(log)
    return RuntimeWheels(deps=deps, edgeship=wheel, deps_stamp=deps_stamp, edgeship_stamp=stamp)
