"""``ssh://`` devices through paramiko, honouring ~/.ssh/config, known_hosts and identity files.

Host keys are strict by default: an unknown key is refused with its fingerprint and the
command that would trust it. ``accept_new_host_key`` behaves like OpenSSH's
``StrictHostKeyChecking=accept-new``: an unknown key is recorded in known_hosts, a changed key
is always refused. Passwords are never asked for, stored or logged; keys come from files or
ssh-agent.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeship.errors import DeviceError
from edgeship.profiling.remote.transport import TRANSPORTS, DeviceURL, LineSink, Transport, TransportOptions


def fingerprint(key: Any) -> str:
    """OpenSSH's ``SHA256:...`` form of a public key."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def _known_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def _policies() -> tuple[type, type]:
    import paramiko

    class Strict(paramiko.MissingHostKeyPolicy):
        def __init__(self, known_hosts: Path) -> None:
            self.known_hosts = known_hosts

        def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
            raise DeviceError(
                f"host key of {hostname} ({key.get_name()} {fingerprint(key)}) is not in {self.known_hosts}: "
                "check the fingerprint on the device (ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub), then add it "
                "with ssh-keyscan or connect once with --accept-new-host-key")

    class AcceptNew(paramiko.MissingHostKeyPolicy):
        """Record an unknown key (a changed one never reaches a policy: paramiko raises BadHostKeyException)."""

        def __init__(self, known_hosts: Path) -> None:
            self.known_hosts = known_hosts

        def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
            client.get_host_keys().add(hostname, key.get_name(), key)
            self.known_hosts.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with open(self.known_hosts, "a", encoding="utf-8") as f:
                f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
            os.chmod(self.known_hosts, 0o600)

    return Strict, AcceptNew


@dataclass(frozen=True)
class SshOptions(TransportOptions):
    """How to authenticate and whom to trust on ssh:// devices."""

    identity: str | None = None
    accept_new_host_key: bool = False
    known_hosts: str | None = None  # default ~/.ssh/known_hosts (or the ssh config's UserKnownHostsFile)
    ssh_config: str | None = None  # default ~/.ssh/config


@TRANSPORTS.register("ssh")
class SshTransport(Transport):
    scheme = "ssh"
    options_type = SshOptions
    options: SshOptions

    def __init__(self, url: DeviceURL, options: TransportOptions) -> None:
        super().__init__(url, options)
        self._client: Any = None
        self._sftp: Any = None
        self._host_key: Any = None
        cfg = self._ssh_config()
        self.hostname = str(cfg.get("hostname", url.host))
        self.port = int(url.port or cfg.get("port", 22))
        self.user = url.user or cfg.get("user") or getpass.getuser()
        if options.identity:
            self.identities = [os.path.expanduser(options.identity)]
        else:
            self.identities = [os.path.expanduser(p) for p in cfg.get("identityfile", []) if os.path.exists(os.path.expanduser(p))]
        known = options.known_hosts or (cfg.get("userknownhostsfile", "").split() or ["~/.ssh/known_hosts"])[0]
        self.known_hosts = Path(os.path.expanduser(known))
        self.accept_new = options.accept_new_host_key or cfg.get("stricthostkeychecking", "").lower() == "accept-new"
        self.proxy_command = cfg.get("proxycommand")

    def _ssh_config(self) -> dict[str, Any]:
        import paramiko

        path = Path(os.path.expanduser(self.options.ssh_config or "~/.ssh/config"))
        if not path.is_file():
            return {}
        try:
            return dict(paramiko.SSHConfig.from_path(str(path)).lookup(self.url.host))
        except Exception as e:  # paramiko raises several types for malformed files
            raise DeviceError(f"{path}: cannot read this ssh config ({type(e).__name__}: {e}); fix the file or "
                              "pass --identity and a full ssh://user@host:port") from None

    @property
    def where(self) -> str:
        return f"{self.user}@{self.hostname}:{self.port}"

    def connect(self) -> None:
        import paramiko

        strict, accept_new = _policies()
        client = paramiko.SSHClient()
        if self.known_hosts.is_file():
            try:
                client.load_host_keys(str(self.known_hosts))
            except Exception as e:
                raise DeviceError(f"{self.known_hosts}: unreadable known_hosts file ({e}); fix or move it") from None
        client.set_missing_host_key_policy((accept_new if self.accept_new else strict)(self.known_hosts))
        sock = paramiko.ProxyCommand(self.proxy_command) if self.proxy_command else None
        t = self.options.connect_timeout
        try:
            client.connect(self.hostname, port=self.port, username=self.user, key_filename=self.identities or None,
                           look_for_keys=not self.identities, allow_agent=not self.options.identity, timeout=t,
                           banner_timeout=t, auth_timeout=t, sock=sock)
        except DeviceError:
            client.close()
            raise
        except paramiko.BadHostKeyException as e:
            client.close()
            raise DeviceError(
                f"host key of {_known_name(self.hostname, self.port)} CHANGED (now {fingerprint(e.key)}, "
                f"{self.known_hosts} has {fingerprint(e.expected_key)}): possible man-in-the-middle; if the device "
                f"was reinstalled, remove the old key with ssh-keygen -R '{_known_name(self.hostname, self.port)}'"
            ) from None
        except paramiko.PasswordRequiredException:
            client.close()
            raise DeviceError(f"{self.where}: the private key is passphrase-protected; load it into ssh-agent "
                              "(ssh-add KEY) and leave --identity out") from None
        except paramiko.AuthenticationException:
            client.close()
            keys = ", ".join(self.identities) if self.identities else "ssh-agent and ~/.ssh/id_*"
            raise DeviceError(f"{self.where}: authentication failed with {keys}; add the public key to "
                              f"~{self.user}/.ssh/authorized_keys on the device or pass the right --identity") from None
        except (paramiko.ssh_exception.NoValidConnectionsError, TimeoutError, OSError) as e:
            client.close()
            errors = list(getattr(e, "errors", {}).values()) or [e]
            refused = all(isinstance(x, ConnectionRefusedError) for x in errors)
            reason = "connection refused (is sshd running on that port?)" if refused else str(errors[0])
            raise DeviceError(f"cannot connect to {self.hostname}:{self.port}: {reason}") from None
        except paramiko.SSHException as e:
            client.close()
            raise DeviceError(f"{self.where}: SSH handshake failed ({e})") from None
        transport = client.get_transport()
        transport.set_keepalive(5)  # notice a dead device within seconds, not at the TCP timeout
        self._host_key = transport.get_remote_server_key()
        self._client = client

    def _need(self) -> Any:
        if self._client is None:
            raise DeviceError(f"{self.where}: not connected")
        return self._client

    def _lost(self, doing: str) -> DeviceError:
        return DeviceError(f"connection to {self.where} lost while {doing}: the device rebooted, sshd stopped or the "
                           "network dropped; results finished before this point are kept")

    def run(self, command: str, on_line: LineSink | None = None, timeout: float | None = None) -> tuple[int, str, str]:
        transport = self._need().get_transport()
        if transport is None or not transport.is_active():
            raise self._lost("starting a command")
        chan = transport.open_session()
        chan.exec_command(command)
        bufs = {"stdout": b"", "stderr": b""}
        text = {"stdout": [], "stderr": []}  # type: dict[str, list[str]]
        deadline = None if timeout is None else time.monotonic() + timeout

        def feed(name: str, data: bytes, final: bool = False) -> None:
            bufs[name] += data
            *lines, bufs[name] = bufs[name].split(b"\n")
            if final and bufs[name]:
                lines.append(bufs[name])
                bufs[name] = b""
            for raw in lines:
                line = raw.decode("utf-8", errors="replace").rstrip("\r")
                text[name].append(line)
                if on_line is not None:
                    on_line(name, line)

        while True:
            busy = False
            if chan.recv_ready():
                feed("stdout", chan.recv(65536))
                busy = True
            if chan.recv_stderr_ready():
                feed("stderr", chan.recv_stderr(65536))
                busy = True
            if not busy:
                if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                if not transport.is_active():
                    break
                if deadline is not None and time.monotonic() > deadline:
                    chan.close()
                    raise DeviceError(f"{self.where}: command timed out after {timeout:.0f} s")
                time.sleep(0.05)
        feed("stdout", b"", final=True)
        feed("stderr", b"", final=True)
        status = chan.recv_exit_status() if chan.exit_status_ready() else -1
        if status == -1 and not transport.is_active():
            raise self._lost("running a command")
        return status, "\n".join(text["stdout"]), "\n".join(text["stderr"])

    def _sftp_client(self) -> Any:
        if self._sftp is None:
            self._sftp = self._need().open_sftp()
        return self._sftp

    def put(self, local: Path, remote: str) -> None:
        sftp = self._sftp_client()
        tmp = f"{remote}.part"
        try:
            sftp.put(str(local), tmp)
            try:
                sftp.posix_rename(tmp, remote)
            except OSError:
                sftp.rename(tmp, remote)
        except (OSError, EOFError) as e:
            transport = self._need().get_transport()
            if transport is None or not transport.is_active():
                raise self._lost(f"copying {local.name}") from None
            raise DeviceError(f"{self.where}: copying {local.name} to {remote} failed ({e or type(e).__name__}): "
                              "is the device's disk full or the directory not writable?") from None

    def get(self, remote: str, local: Path) -> None:
        try:
            self._sftp_client().get(remote, str(local))
        except (OSError, EOFError) as e:
            raise DeviceError(f"{self.where}: fetching {remote} failed ({e or type(e).__name__})") from None

    def close(self) -> None:
        for obj in (self._sftp, self._client):
            if obj is not None:
                try:
                    obj.close()
                except Exception:  # closing a dead connection may raise anything; nothing left to save
                    pass
        self._sftp = self._client = None

    def identity(self) -> dict[str, Any]:
        key = self._host_key
        return {"transport": "ssh", "host": self.hostname, "port": self.port, "user": self.user,
                "host_key": f"{key.get_name()} {fingerprint(key)}" if key is not None else None}
