"""Real servers for the remote tests: Debian's OpenSSH sshd on 127.0.0.1, and the virtual Raspberry Pi 5."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgeship.virtual_pi import wait_for_ssh_banner

SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgeship-test", "-f", str(path)], check=True)
    return path


@dataclass
class Sshd:
    """A running sshd with throwaway keys; ``known_hosts`` already trusts its host key."""

    dir: Path
    port: int
    proc: subprocess.Popen[bytes]
    identity: Path
    known_hosts: Path
    host_pub: str
    user: str = "root"

    @property
    def url(self) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}"

    def kill(self) -> None:
        """SIGKILL the listener and every session it started, like a device losing power."""
        import psutil

        try:
            procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(timeout=10)


def sshd_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (sshd runs as root on 127.0.0.1 with throwaway keys)"
    if not Path(SSHD).exists() or shutil.which("ssh-keygen") is None:
        return "needs OpenSSH: apt-get install openssh-server openssh-client (.ci/run does)"
    return None


def start_sshd(d: Path) -> Sshd:
    d.mkdir(parents=True, exist_ok=True)
    host = keygen(d / "host_ed25519")
    user = keygen(d / "id_user")
    (d / "authorized_keys").write_text(Path(f"{user}.pub").read_text())
    port = free_port()
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    (d / "sshd_config").write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {host}
AuthorizedKeysFile {d}/authorized_keys
PidFile {d}/sshd.pid
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
Subsystem sftp internal-sftp
""")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdin=subprocess.DEVNULL,
                            stdout=open(d / "sshd.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    if not wait_for_ssh_banner(port, 20.0, lambda: proc.poll() is None):
        raise RuntimeError(f"sshd did not start: {(d / 'sshd.log').read_text()[-500:]}")
    pub = Path(f"{host}.pub").read_text().split()
    known = d / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {pub[0]} {pub[1]}\n")
    return Sshd(dir=d, port=port, proc=proc, identity=user, known_hosts=known, host_pub=f"{pub[0]} {pub[1]}")


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory, unavailable: Callable[[str, str], None]) -> Iterator[Sshd]:
    if why := sshd_missing():
        unavailable("remote", why)
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.kill()


@pytest.fixture
def sshd_fresh(tmp_path: Path, unavailable: Callable[[str, str], None]) -> Iterator[Sshd]:
    """A server of its own, for tests that kill it."""
    if why := sshd_missing():
        unavailable("remote", why)
    server = start_sshd(tmp_path / "sshd")
    yield server
    server.kill()


class KillAfterFirst(io.StringIO):
    """A progress stream that kills its server when the first artifact's record ("onnx/fp32: ok") is written:
    the connection is lost mid-run, with one artifact finished."""

    def __init__(self, server: Sshd) -> None:
        super().__init__()
        self.server = server
        self.killed = threading.Event()

    def write(self, s: str) -> int:
        if "onnx/fp32: ok" in s and not self.killed.is_set():
            self.killed.set()
            self.server.kill()
        return super().write(s)


@pytest.fixture
def kill_after_first(sshd_fresh: Sshd) -> KillAfterFirst:
    return KillAfterFirst(sshd_fresh)


@pytest.fixture(scope="session")
def device_workdir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One device work directory for the session, so the device venv is built once."""
    return str(tmp_path_factory.mktemp("device"))


@pytest.fixture(scope="session")
def virtual_pi(tmp_path_factory: pytest.TempPathFactory, unavailable: Callable[[str, str], None]) -> Iterator[object]:
    from edgeship import virtual_pi
    from edgeship.errors import DeviceError

    if os.geteuid() != 0 or shutil.which("qemu-aarch64-static") is None or shutil.which("debootstrap") is None:
        unavailable("arm64", "needs root and apt-get install qemu-user-static binfmt-support debootstrap zstd "
                    "(.ci/run installs them)")
    workdir = tmp_path_factory.mktemp("virtual-pi")
    try:
        pi = virtual_pi.up(workdir)
    except DeviceError as e:
        virtual_pi.down(workdir)
        raise RuntimeError(f"virtual Pi did not start: {e}") from None
    yield pi
    virtual_pi.down(workdir)
