"""A virtual Raspberry Pi 5: an arm64 Debian userland under qemu user-mode emulation, with sshd on 127.0.0.1.

``edgeship device virtual-pi up|down|status``. Needs root, ``qemu-user-static``, ``debootstrap``,
``binfmt-support`` and ``zstd`` (the CI script installs them). The real aarch64 wheels of
onnxruntime and LiteRT run in it, so the ARM kernels, outputs, memory behaviour and the whole SSH
path are real; timings are emulated (100-450x slower) and are marked so: sshd passes
``EDGESHIP_EMULATED=qemu-user`` to every session, which the device's sysinfo reports.

Two qemu 7.2 traps shape this file: ARM programs see the host's x86 ``/proc/cpuinfo`` and
onnxruntime crashes on import, so a Raspberry Pi 5 cpuinfo is bind-mounted over it; and
``QEMU_CPU=max`` silently corrupts int8 results, so the CPU is pinned to Cortex-A76.

The rootfs (debootstrap, ~4 min) is cached as a ``.tar.zst`` in ``~/.cache/edgeship/virtual-pi``;
unpacking it takes seconds. Host and user keys are generated per working directory and never
enter the cached tarball.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from edgeship.errors import DeviceError

QEMU_CPU = "cortex-a76"  # Pi 5; never "max" (qemu 7.2 gives garbage int8 results with it)
SUITE = "bookworm"  # Raspberry Pi OS 12 is bookworm: same glibc and Python 3.11
PACKAGES = "python3,python3-venv,python3-pip,ca-certificates,openssh-server"
Log = Callable[[str], None]

_PI5_CORE = """processor\t: {n}
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1
"""
PI5_CPUINFO = "\n".join(_PI5_CORE.format(n=n) for n in range(4)) + (
    "\nRevision\t: d04170\nSerial\t\t: 0000000000000000\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n")


def wait_for_ssh_banner(port: int, timeout_s: float, alive: Callable[[], bool]) -> bool:
    """True once an SSH server answers with its banner on 127.0.0.1:port; False if ``alive()`` turns
    False (the server exited) or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while alive():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                if s.recv(64).startswith(b"SSH-"):
                    return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.3)
    return False


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgeship" / "virtual-pi"


def tarball() -> Path:
    return cache_dir() / f"rootfs-{SUITE}-arm64.tar.zst"


@dataclass(frozen=True)
class VirtualPi:
    """A running virtual Pi: where its sshd listens and how to log in (paths, no key material)."""

    workdir: str
    port: int
    pid: int
    identity: str
    known_hosts: str
    user: str = "root"
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"ssh://{self.user}@{self.host}:{self.port}"

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "url": self.url}


def _run(cmd: list[str], what: str, **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise DeviceError(f"virtual Pi: {what} failed (exit {proc.returncode}): {' | '.join(tail)}")
    return proc


def check_host() -> None:
    """Root, qemu-user, debootstrap, zstd, and binfmt_misc routing aarch64 binaries to qemu."""
    if os.geteuid() != 0:
        raise DeviceError("virtual Pi: needs root (chroot, mounts); run as root or in the CI container")
    missing = [t for t in ("qemu-aarch64-static", "debootstrap", "zstd", "chroot", "ssh-keygen") if not shutil.which(t)]
    if missing:
        raise DeviceError(f"virtual Pi: missing {', '.join(missing)}; apt-get install qemu-user-static debootstrap "
                          "binfmt-support zstd openssh-client")
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "register").exists():
        _run(["mount", "binfmt_misc", "-t", "binfmt_misc", str(binfmt)], "mounting binfmt_misc")
    if not (binfmt / "qemu-aarch64").exists():
        _run(["update-binfmts", "--enable", "qemu-aarch64"], "update-binfmts --enable qemu-aarch64")


def _mirror() -> str:
    """The Debian mirror of the host's own apt sources (CI machines may only reach that one)."""
    for src in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            text = src.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            words = line.split()
            if words[:1] == ["URIs:"] and "security" not in line:
                return words[1]
            if words[:1] == ["deb"] and "security" not in line:
                return next(w for w in words[1:] if "://" in w)
    return "http://deb.debian.org/debian"


def build_rootfs(rootfs: Path, log: Log = print) -> float:
    """debootstrap an arm64 bookworm with Python and sshd into ``rootfs``; returns seconds taken."""
    t0 = time.monotonic()
    if rootfs.exists():
        _unmount_under(rootfs)  # an interrupted second stage leaves proc/sys mounted inside
        shutil.rmtree(rootfs)
    rootfs.parent.mkdir(parents=True, exist_ok=True)
    log(f"virtual Pi: debootstrap {SUITE} arm64 from {_mirror()} (about 4 minutes)")
    _run(["debootstrap", "--arch=arm64", "--foreign", "--variant=minbase", f"--include={PACKAGES}", SUITE,
          str(rootfs), _mirror()], "debootstrap (first stage)")
    shutil.copy2(shutil.which("qemu-aarch64-static") or "", rootfs / "usr/bin/qemu-aarch64-static")
    _run(["chroot", str(rootfs), "/debootstrap/debootstrap", "--second-stage"], "debootstrap --second-stage",
         env={**os.environ, "QEMU_CPU": QEMU_CPU})
    for key in (rootfs / "etc/ssh").glob("ssh_host_*"):  # keys are made per working directory, never cached
        key.unlink()
    shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
    (rootfs / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
    return time.monotonic() - t0


@contextlib.contextmanager
def _cache_lock() -> Iterator[None]:
    """One builder at a time (a background ``prepare`` and a test fixture may race for the same tarball)."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def prepare(log: Log = print) -> Path:
    """Make sure the cached rootfs tarball exists (build it from nothing if not); returns its path."""
    cached = tarball()
    with _cache_lock():
        if cached.is_file():
            return cached
        build = cache_dir() / "rootfs.build"
        secs = build_rootfs(build, log)
        part = cached.with_suffix(".part")
        _run(["tar", "-I", "zstd -T0 -3", "-cpf", str(part), "-C", str(build), "."], "packing the rootfs")
        os.replace(part, cached)
        shutil.rmtree(build)
        log(f"virtual Pi: rootfs built in {secs:.0f} s, cached at {cached} ({cached.stat().st_size / 2**20:.0f} MB)")
    return cached


def ensure_rootfs(workdir: Path, log: Log = print) -> Path:
    """The unpacked rootfs in ``workdir``: already there, else from the cached tarball (built first if missing)."""
    rootfs = workdir / "rootfs"
    if (rootfs / "usr/bin/python3").exists():
        return rootfs
    cached = prepare(log)
    t0 = time.monotonic()
    tmp = workdir / "rootfs.unpack"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _run(["tar", "-I", "zstd -T0", "-xpf", str(cached), "-C", str(tmp)], f"unpacking {cached}")
    tmp.rename(rootfs)
    log(f"virtual Pi: rootfs unpacked from {cached} in {time.monotonic() - t0:.1f} s")
    return rootfs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mounted(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


def _mount(rootfs: Path) -> None:
    for fs, rel in (("proc", "proc"), ("sysfs", "sys")):
        if not _mounted(rootfs / rel):
            _run(["mount", "-t", fs, fs, str(rootfs / rel)], f"mounting {rel}")
    fake = rootfs.parent / "cpuinfo-pi5"
    fake.write_text(PI5_CPUINFO)
    if not _mounted(rootfs / "proc/cpuinfo"):
        _run(["mount", "--bind", str(fake), str(rootfs / "proc/cpuinfo")], "bind-mounting the Pi 5 /proc/cpuinfo")


def _unmount_under(path: Path) -> None:
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f if line.split()[1].startswith(prefix)]
    for p in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", p], capture_output=True, check=False)


def _unmount(rootfs: Path) -> None:
    for rel in ("proc/cpuinfo", "proc", "sys"):
        p = rootfs / rel
        if p.exists() and _mounted(p):
            if subprocess.run(["umount", str(p)], capture_output=True, check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(p)], capture_output=True, check=False)


def _keys(workdir: Path, rootfs: Path) -> tuple[Path, Path]:
    """Throwaway host and user keys for this working directory (made once, reused by later ``up``)."""
    keys = workdir / "keys"
    keys.mkdir(mode=0o700, exist_ok=True)
    host, user = keys / "ssh_host_ed25519_key", keys / "id_ed25519"
    for k in (host, user):
        if not k.exists():
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgeship-virtual-pi", "-f", str(k)], "ssh-keygen")
    for suffix in ("", ".pub"):
        shutil.copy2(f"{host}{suffix}", rootfs / f"etc/ssh/ssh_host_ed25519_key{suffix}")
    os.chmod(rootfs / "etc/ssh/ssh_host_ed25519_key", 0o600)
    ssh_dir = rootfs / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    shutil.copy2(f"{user}.pub", ssh_dir / "authorized_keys")
    os.chmod(ssh_dir / "authorized_keys", 0o600)
    return host, user


def _state_path(workdir: Path) -> Path:
    return workdir / "state.json"


def status(workdir: Path) -> VirtualPi | None:
    try:
        state = json.loads(_state_path(workdir).read_text())
        pi = VirtualPi(**{k: v for k, v in state.items() if k != "url"})
    except (OSError, ValueError, TypeError):
        return None
    try:
        cmdline = Path(f"/proc/{pi.pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pi if b"sshd" in cmdline else None


def up(workdir: Path | None = None, port: int = 0, log: Log = print) -> VirtualPi:
    workdir = (workdir or cache_dir()).resolve()
    running = status(workdir)
    if running is not None:
        return running
    check_host()
    workdir.mkdir(parents=True, exist_ok=True)
    rootfs = ensure_rootfs(workdir, log)
    port = port or _free_port()
    policy = rootfs / "usr/sbin/policy-rc.d"  # package scripts inside the chroot must not start services
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    (rootfs / "run/sshd").mkdir(parents=True, exist_ok=True)
    host_key, user_key = _keys(workdir, rootfs)
    _mount(rootfs)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "QEMU_CPU": QEMU_CPU}
    logf = open(workdir / "sshd.log", "ab")
    proc = subprocess.Popen(
        ["chroot", str(rootfs), "/usr/sbin/sshd", "-D", "-e", "-p", str(port), "-o", "ListenAddress=127.0.0.1",
         "-o", "PasswordAuthentication=no", "-o", "KbdInteractiveAuthentication=no", "-o", "PermitRootLogin=prohibit-password",
         "-o", "HostKey=/etc/ssh/ssh_host_ed25519_key",
         "-o", f"SetEnv=QEMU_CPU={QEMU_CPU} EDGESHIP_EMULATED=qemu-user"],
        env=env, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
    logf.close()
    # sshd under emulation needs a few seconds to start
    if not wait_for_ssh_banner(port, 60.0, lambda: proc.poll() is None):
        if proc.poll() is not None:
            _unmount(rootfs)
            tail = (workdir / "sshd.log").read_text(errors="replace").strip().splitlines()[-3:]
            raise DeviceError(f"virtual Pi: sshd exited with {proc.returncode}: {' | '.join(tail)}")
        os.killpg(proc.pid, signal.SIGKILL)
        _unmount(rootfs)
        raise DeviceError(f"virtual Pi: sshd did not answer on 127.0.0.1:{port} within 60 s; see {workdir}/sshd.log")
    known = workdir / "known_hosts"
    pub = Path(f"{host_key}.pub").read_text().split()
    known.write_text(f"[127.0.0.1]:{port} {pub[0]} {pub[1]}\n")
    pi = VirtualPi(workdir=str(workdir), port=port, pid=proc.pid, identity=str(user_key), known_hosts=str(known))
    _state_path(workdir).write_text(json.dumps(pi.to_dict(), indent=2))
    return pi


def down(workdir: Path | None = None) -> bool:
    """Stop sshd (and every session it started) and unmount. True if something was running."""
    workdir = (workdir or cache_dir()).resolve()
    pi = status(workdir)
    if pi is not None:
        _kill_tree(pi.pid)
    _unmount(workdir / "rootfs")
    _state_path(workdir).unlink(missing_ok=True)
    return pi is not None


def _kill_tree(pid: int) -> None:
    try:
        import psutil

        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except Exception:  # already gone, or psutil missing: fall back to the process group
        procs = []
    for p in procs:
        try:
            p.kill()
        except Exception:
            pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)


def cli(name: str, action: str, workdir: Path | None, port: int) -> int:
    if name != "virtual-pi":
        raise DeviceError(f"unknown device '{name}'; the only managed device is virtual-pi")
    if action == "up":
        pi = up(workdir, port)
        print(f"virtual Raspberry Pi 5 (arm64, qemu-user {QEMU_CPU}, EMULATED timings) at {pi.url}")
        print(f"  edgeship profile BUNDLE --device {pi.url} --identity {pi.identity} --accept-new-host-key")
        print(f"  host key: {pi.known_hosts}; stop with: edgeship device virtual-pi down"
              + (f" --workdir {pi.workdir}" if workdir else ""))
        return 0
    if action == "down":
        print("virtual Pi stopped" if down(workdir) else "virtual Pi was not running (mounts cleaned)")
        return 0
    found = status((workdir or cache_dir()).resolve())
    print(json.dumps(found.to_dict(), indent=2) if found else "virtual Pi: not running")
    return 0 if found else 1


if __name__ == "__main__":  # `python -m edgeship.virtual_pi prepare`: warm the rootfs cache (CI, in the background)
    import sys

    if sys.argv[1:] != ["prepare"]:
        sys.exit("usage: python -m edgeship.virtual_pi prepare")
    check_host()
    print(prepare())
