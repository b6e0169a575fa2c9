"""What runs edgeship on a device, separate from how the host reaches it.

A :class:`~edgeship.profiling.remote.transport.Transport` only moves bytes and runs commands. A
:class:`DeviceRuntime` knows what the device needs: how to ``probe`` it (what is there, how much
room), what to ``plan`` and ``provision`` so the agent can run, and the command that runs the agent
(:mod:`.agent`) and where its result lands. The session above drives both and never looks inside.

One runtime exists today, ``python-venv`` (:mod:`.venv`: Linux with Python >= 3.11, runtime wheels
pushed from the host). An Android runtime (a prebuilt runner pushed over ``adb://``) or a device
farm registers another with ``@RUNTIMES.register(name)``; the run logic does not change.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeship.errors import DeviceError
from edgeship.profiling.remote.transport import LineSink, Transport
from edgeship.registry import Registry

Log = Callable[[str], None]
RUNTIMES: Registry[type[DeviceRuntime]] = Registry("device runtime")
_BUILTIN = {"python-venv": "edgeship.profiling.remote.venv"}
DEFAULT_RUNTIME = "python-venv"


@dataclass(frozen=True)
class Probe:
    """What a runtime found on the device before anything was pushed."""

    workdir: str  # absolute, exists
    hashes: Mapping[str, str | None]  # sha256 of the asked files (relative to workdir); None = absent
    free_disk: int  # bytes free in workdir
    mem_available: int | None  # bytes, None where the device does not say
    facts: Mapping[str, Any] = field(default_factory=dict)  # hostname, machine, os...: for the device identity


@dataclass(frozen=True)
class Provision:
    """What the runtime must put on the device before the agent can run."""

    push: tuple[tuple[Path, str], ...] = ()  # (local file, path relative to workdir)
    install_bytes: int = 0  # disk the installation takes on top of the pushed files
    state: Mapping[str, Any] = field(default_factory=dict)  # for provision(): what to install

    @property
    def needed(self) -> bool:
        return bool(self.push) or bool(self.state)


class DeviceRuntime(ABC):
    """How edgeship runs on one kind of device, over any transport."""

    def __init__(self, transport: Transport, label: str, log: Log) -> None:
        self.t = transport
        self.label = label  # the device's name in messages
        self.log = log

    def sh(self, command: str, what: str, timeout: float | None = 600) -> str:
        """Run ``command``; a non-zero exit is a one-line DeviceError naming ``what`` failed."""
        code, out, err = self.t.run(command, timeout=timeout)
        if code != 0:
            tail = " | ".join(err.strip().splitlines()[-3:]) or out.strip()[-300:]
            raise DeviceError(f"{self.label}: {what} failed (exit {code}): {tail}")
        return out

    @abstractmethod
    def probe(self, workdir: str, files: Sequence[str]) -> Probe:
        """Create ``workdir`` if needed and report on the device and on ``files`` (relative to it)."""

    @abstractmethod
    def plan(self, probe: Probe, requirements: Sequence[str] = ()) -> Provision:
        """What must be pushed and installed; raises DeviceError when the device cannot run edgeship.

        ``requirements``: what the job needs on top of edgeship's plain runtime (pip requirement strings, e.g.
        onnxruntime-genai for ONNX GenAI LLM folders), from :func:`.wheels.extra_requirement`."""

    @abstractmethod
    def provision(self, probe: Probe, plan: Provision) -> None:
        """Install what ``plan`` pushed (only called when ``plan.needed``)."""

    @abstractmethod
    def agent_command(self, workdir: str, run_dir: str) -> str:
        """The command that runs the agent on ``run_dir/job.json``, writing ``run_dir/result.json``."""

    def run_agent(self, workdir: str, run_dir: str, on_line: LineSink, timeout: float) -> None:
        code, _, err = self.t.run(self.agent_command(workdir, run_dir), on_line=on_line, timeout=timeout)
        if code != 0:
            tail = " | ".join(x for x in err.strip().splitlines()[-2:] if x)
            raise DeviceError(f"{self.label}: the device runner exited with {code}: {tail}")

    def collect(self, run_dir: str, local: Path) -> None:
        self.t.get(f"{run_dir}/result.json", local)


def runtime_for(name: str) -> type[DeviceRuntime]:
    for key, module in _BUILTIN.items():
        if key not in RUNTIMES:
            importlib.import_module(module)
    return RUNTIMES.get(name)  # unknown name: UnknownKeyError listing the valid ones
