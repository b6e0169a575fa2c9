"""How the host reaches a device: a small protocol, one implementation per URL scheme.

``ssh://user@host:port`` is the only scheme today (:mod:`.ssh`); a new one (adb://, a serial
console...) registers itself with ``@TRANSPORTS.register("scheme")``, implements :class:`Transport`
and declares its own :class:`TransportOptions`. A transport only moves bytes and runs commands;
what edgeship needs on the device is a :class:`~.runtime.DeviceRuntime`.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from edgeship.errors import ConfigError
from edgeship.registry import Registry

# Lines the device agent prints on stdout so results survive a connection that dies mid-run.
DEVICE_TAG = "EDGESHIP-DEVICE "
RESULT_TAG = "EDGESHIP-RESULT "

LineSink = Callable[[str, str], None]  # (stream name "stdout"/"stderr", line without newline)

TRANSPORTS: Registry[type[Transport]] = Registry("device transport scheme")
# Modules that register a scheme; imported on first use so `import edgeship.profiling.remote` stays light.
_BUILTIN = {"ssh": "edgeship.profiling.remote.ssh"}


@dataclass(frozen=True)
class DeviceURL:
    """A parsed ``scheme://user@host:port?workdir=...``. Never holds a password."""

    scheme: str
    host: str
    user: str | None
    port: int | None
    workdir: str | None

    @classmethod
    def parse(cls, url: str) -> DeviceURL:
        shown = repr(re.sub(r"(://[^/@]*?):[^/@]*@", r"\1:***@", url))  # quoted, escaped, never the password
        try:
            parts = urlsplit(url)
        except ValueError as e:  # "Invalid IPv6 URL"
            raise ConfigError(f"--device {shown}: not a URL ({e}); expected scheme://[user@]host[:port]") from None
        if not parts.scheme or not parts.hostname:
            raise ConfigError(f"--device {shown}: expected scheme://[user@]host[:port], e.g. ssh://pi@raspberrypi.local")
        if parts.password is not None:
            # A password in a URL ends up in shell history, logs and results files.
            raise ConfigError(f"--device for {parts.hostname}: passwords in device URLs are refused; "
                              "use a key (--identity KEY or ~/.ssh/config IdentityFile) or ssh-agent")
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(f"--device {shown}: the port is not a number between 1 and 65535") from None
        query = parse_qs(parts.query)
        unknown = sorted(set(query) - {"workdir"})
        if unknown:
            raise ConfigError(f"--device {shown}: unknown option(s) {', '.join(map(repr, unknown))}; the only one is "
                              "?workdir=DIR")
        workdir = query.get("workdir", [None])[-1]
        return cls(scheme=parts.scheme, host=parts.hostname, user=parts.username, port=port, workdir=workdir)

    def __str__(self) -> str:
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"{self.scheme}://{user}{self.host}{port}"


@dataclass(frozen=True)
class TransportOptions:
    """How to connect, per scheme: each transport declares its own subclass (``SshOptions`` for ssh://).
    Paths only: key material is never copied into results."""

    connect_timeout: float = 15.0


def option_names(scheme: str) -> list[str]:
    return sorted(f.name for f in dataclasses.fields(_transport_cls(scheme).options_type))


def options_for(scheme: str, settings: Mapping[str, Any]) -> TransportOptions:
    """The options of ``scheme``'s transport from ``key = value`` settings (an inventory entry, the CLI)."""
    cls = _transport_cls(scheme).options_type
    unknown = sorted(set(settings) - set(option_names(scheme)))
    if unknown:
        raise ConfigError(f"unknown {scheme}:// option(s) {', '.join(unknown)}; valid: {', '.join(option_names(scheme))}")
    hints = typing.get_type_hints(cls)
    for k, v in settings.items():
        allowed = typing.get_args(hints[k]) or (hints[k],)
        if float in allowed and isinstance(v, int) and not isinstance(v, bool):
            continue
        if not isinstance(v, tuple(t for t in allowed if isinstance(t, type))):
            raise ConfigError(f"{scheme}:// option {k} = {v!r}: expected {hints[k]}")
    return cls(**settings)


class Transport(ABC):
    """One live connection to one device: moves files and runs commands, knows nothing of edgeship."""

    scheme = ""
    options_type: type[TransportOptions] = TransportOptions

    def __init__(self, url: DeviceURL, options: TransportOptions) -> None:
        self.url = url
        self.options = options

    @abstractmethod
    def connect(self) -> None:
        """Open the connection; raises DeviceError with a one-line reason."""

    @abstractmethod
    def run(self, command: str, on_line: LineSink | None = None, timeout: float | None = None) -> tuple[int, str, str]:
        """Run a shell command; returns (exit code, stdout, stderr). Lines are streamed to ``on_line``."""

    @abstractmethod
    def put(self, local: Path, remote: str) -> None:
        """Copy a file to the device (atomically: a temporary name, then a rename)."""

    @abstractmethod
    def get(self, remote: str, local: Path) -> None:
        """Copy a file from the device."""

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """Who we are connected to (host, port, user, host key fingerprint); no secrets."""

    def __enter__(self) -> Transport:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _transport_cls(scheme: str) -> type[Transport]:
    for key, module in _BUILTIN.items():
        if key not in TRANSPORTS:
            importlib.import_module(module)
    return TRANSPORTS.get(scheme)  # unknown scheme: UnknownKeyError listing the valid ones


def transport_for(url: DeviceURL, options: TransportOptions | None = None) -> Transport:
    cls = _transport_cls(url.scheme)
    options = options if options is not None else cls.options_type()
    if not isinstance(options, cls.options_type):
        raise ConfigError(f"{url.scheme}:// needs {cls.options_type.__name__}, got {type(options).__name__}")
    return cls(url, options)
