"""Several devices at once: one thread per device, one progress view, one combined results document.

A device that fails (unreachable, refused, too small, lost mid-run) becomes an entry with
``status: "error"`` and whatever it measured before failing; the others carry on.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from edgeship.errors import BundleError, ConfigError
from edgeship.profiling.remote.jobs import EncoderJob, RemoteJob, RunT
from edgeship.profiling.remote.runtime import DEFAULT_RUNTIME, runtime_for
from edgeship.profiling.remote.session import DeviceSession
from edgeship.profiling.remote.transport import DeviceURL, option_names, options_for
from edgeship.profiling.results import FleetResult, RunConfig

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

ConfigT = TypeVar("ConfigT", bound="DataclassInstance")
_ENTRY_KEYS = ("url", "name", "target", "workdir", "runtime")  # the rest of an entry: its transport's options


@dataclass(frozen=True)
class DeviceEntry:
    url: str
    name: str | None = None
    target: str | None = None
    workdir: str | None = None
    runtime: str | None = None  # default: python-venv
    options: Mapping[str, Any] = field(default_factory=dict)  # for the URL scheme's transport (identity=...)


def load_inventory(path: str | Path) -> list[DeviceEntry]:
    """``[[device]]`` tables: url (required), name, target, workdir, runtime, and the transport's options
    (for ssh://: identity, known_hosts, ssh_config, accept_new_host_key, connect_timeout)."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"--inventory {p}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--inventory {p}: not UTF-8 text; an inventory is a TOML file of [[device]] tables") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--inventory {p}: not valid TOML ({e})") from None
    extra = sorted(set(data) - {"device"})
    if extra or not isinstance(data.get("device"), list) or not data["device"]:
        raise ConfigError(f"--inventory {p}: expected one or more [[device]] tables"
                          + (f", found unknown key(s) {', '.join(extra)}" if extra else ""))
    return [_entry(d, f"--inventory {p}: device #{i}") for i, d in enumerate(data["device"], 1)]


def _entry(d: object, where: str) -> DeviceEntry:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where} must be a [[device]] table, got {type(d).__name__}")
    if not isinstance(d.get("url"), str):
        raise ConfigError(f"{where} needs url = \"ssh://user@host[:port]\"")
    url = DeviceURL.parse(d["url"])  # reject bad URLs before anything connects
    options = {k: v for k, v in d.items() if k not in _ENTRY_KEYS}
    unknown = sorted(set(options) - set(option_names(url.scheme)))
    if unknown:
        raise ConfigError(f"{where} has unknown key(s) {', '.join(unknown)}; valid for {url.scheme}:// devices: "
                          f"{', '.join([*_ENTRY_KEYS, *option_names(url.scheme)])}")
    options_for(url.scheme, options)  # a value of the wrong type fails here, before anything connects
    if d.get("target"):
        from edgeship.targets import get_profile

        get_profile(d["target"])  # unknown target: UnknownKeyError with the closest name
    if d.get("runtime"):
        runtime_for(str(d["runtime"]))
    opt = {k: str(d[k]) for k in ("name", "target", "workdir", "runtime") if d.get(k) is not None}
    return DeviceEntry(url=d["url"], options=options, **opt)


class FleetProgress:
    """One view for all devices: ``[name] message`` lines, serialised, throttled per device."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None, every_s: float = 1.0) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}

    def logger(self, name: str) -> Any:
        def log(text: str) -> None:
            if not self.enabled:
                return
            now = time.monotonic()
            routine = text.startswith("[") and " run " in text  # the device runner's running counters
            with self._lock:
                if routine and now - self._last.get(name, 0.0) < self.every_s:
                    return
                self._last[name] = now
                self.stream.write(f"[{name}] {text}\n")
                self.stream.flush()

        return log


def _entries(devices: Sequence[str], inventory: str | None) -> list[DeviceEntry]:
    entries = [DeviceEntry(url=u) for u in devices]
    if inventory:
        entries += load_inventory(inventory)
    if not entries:
        raise ConfigError("no device: give --device ssh://user@host[:port] (repeatable) or --inventory FILE")
    names = [e.name or str(DeviceURL.parse(e.url)) for e in entries]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"device(s) listed twice: {', '.join(dup)}; give each a distinct name in the inventory")
    return entries


def config_for(entry: DeviceEntry, config: ConfigT) -> ConfigT:
    """An inventory target supplies the power model and thread count unless the command line chose them (the
    encoder's RunConfig and the LLM's LLMRunConfig both have these two fields)."""
    if not entry.target:
        return config
    from edgeship.targets import get_profile

    prof = get_profile(entry.target)
    return dataclasses.replace(config, power_target=getattr(config, "power_target", None) or entry.target,
                               threads=getattr(config, "threads", None) or prof.threads)


def run_fleet(source: str | Path, make_job: Callable[[DeviceEntry], RemoteJob[RunT]], *, devices: Sequence[str] = (),
              inventory: str | None = None, artifact: str | None = None,
              transport_options: Mapping[str, Any] | None = None, workdir: str | None = None,
              progress: FleetProgress, max_parallel: int = 8) -> list[RunT]:
    """Run the job ``make_job`` gives for each device on every device in parallel, one result per device."""
    entries = _entries(devices, inventory)
    src = Path(source)
    if not src.exists():
        raise BundleError(f"nothing to profile at {src}: give a bundle directory, a .zip bundle or a model file")
    sessions = []
    for e in entries:
        name = e.name or str(DeviceURL.parse(e.url))
        options = options_for(DeviceURL.parse(e.url).scheme, {**(transport_options or {}), **e.options})
        # The device runner's own progress lines are streamed back and shown in the view.
        sessions.append(DeviceSession(e.url, options, make_job(e), progress.logger(name),
                                      workdir=e.workdir or workdir, name=e.name, runtime=e.runtime or DEFAULT_RUNTIME))
    with ThreadPoolExecutor(max_workers=max(1, min(max_parallel, len(sessions)))) as pool:
        return list(pool.map(lambda s: s.run(src, artifact), sessions))


def shared_options(identity: str | None = None, accept_new_host_key: bool = False, known_hosts: str | None = None,
                   ssh_config: str | None = None, transport_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Options for every device (an inventory entry's own keys win); ``identity``... are the ssh:// ones by name."""
    shared = {k: v for k, v in {"identity": identity, "accept_new_host_key": accept_new_host_key or None,
                                "known_hosts": known_hosts, "ssh_config": ssh_config}.items() if v is not None}
    shared.update(transport_options or {})
    return shared


def profile_fleet(source: str | Path, *, devices: Sequence[str] = (), inventory: str | None = None,
                  config: RunConfig | None = None, artifact: str | None = None, identity: str | None = None,
                  accept_new_host_key: bool = False, known_hosts: str | None = None, ssh_config: str | None = None,
                  transport_options: Mapping[str, Any] | None = None, workdir: str | None = None,
                  progress: FleetProgress | None = None, max_parallel: int = 8) -> FleetResult:
    """Profile ``source`` on every device in parallel.

    Returns one :class:`DeviceRun` per device: what a local ``profile`` returns, plus the device's
    URL, identity, status and error. ``transport_options`` apply to every device (an inventory
    entry's own keys win); ``identity``, ``known_hosts``... are the ssh:// ones by name.
    """
    cfg = config or RunConfig()
    runs = run_fleet(source, lambda e: EncoderJob(config_for(e, cfg)), devices=devices, inventory=inventory,
                     artifact=artifact, transport_options=shared_options(identity, accept_new_host_key, known_hosts,
                                                                         ssh_config, transport_options),
                     workdir=workdir, progress=progress or FleetProgress(enabled=cfg.progress),
                     max_parallel=max_parallel)
    return FleetResult(tuple(runs))
