"""Sweep threads and core sets to find the most frugal setting: ``edgeship profile B --sweep threads=1,2,4
--sweep cores=big,little,all``.

Each artifact is measured once per (threads, core set), each time in a fresh worker pinned to that core set
with ``sched_setaffinity``. Core sets come from the target profile's clusters: ``big`` is its fastest cluster,
``little`` its slowest, ``all`` every CPU this process may run on. The clusters are found among this host's
CPUs by their maximum frequency (``cpufreq/cpuinfo_max_freq``, or ``cpu_capacity`` where the kernel has it);
a set the host does not have (one cluster only, no cpufreq in a VM, a cluster count that does not match the
profile) is skipped and the result says why. Torch-free: the device runs this.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgeship.errors import ConfigError
from edgeship.profiling.results import ArtifactResult, ProfileResult, RunConfig

CORE_SETS = ("big", "little", "all")
SWEEP_KEYS = ("threads", "cores")


@dataclass(frozen=True)
class Sweep:
    threads: tuple[int | None, ...] = (None,)  # None: the bundle's / runtime's default
    cores: tuple[str | None, ...] = (None,)  # None: not pinned

    def settings(self) -> list[tuple[int | None, str | None]]:
        return list(itertools.product(self.threads, self.cores))


def parse_sweep(specs: Sequence[str]) -> Sweep:
    """``["threads=1,2,4", "cores=big,all"]`` -> :class:`Sweep`; a bad key or value is a one-line error."""
    found: dict[str, tuple[str, ...]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not values.strip():
            raise ConfigError(f"--sweep {spec!r}: write KEY=V1,V2 (e.g. --sweep threads=1,2,4)")
        if key not in SWEEP_KEYS:
            near = difflib.get_close_matches(key, SWEEP_KEYS, n=1)
            raise ConfigError(f"--sweep {key}: unknown; sweepable: {', '.join(SWEEP_KEYS)}"
                              + (f" (did you mean {near[0]}?)" if near else ""))
        if key in found:
            raise ConfigError(f"--sweep {key} given twice: list every value once, e.g. {key}=1,2,4")
        found[key] = tuple(v.strip() for v in values.split(",") if v.strip())
    threads: list[int | None] = []
    for v in found.get("threads", ()):
        if not v.isdigit() or int(v) < 1:
            raise ConfigError(f"--sweep threads={v}: threads must be whole numbers >= 1")
        threads.append(int(v))
    cores: list[str | None] = []
    for v in found.get("cores", ()):
        if v not in CORE_SETS:
            raise ConfigError(f"--sweep cores={v}: core sets are {', '.join(CORE_SETS)}")
        cores.append(v)
    return Sweep(tuple(dict.fromkeys(threads)) or (None,), tuple(dict.fromkeys(cores)) or (None,))


def _host_cpu_speed(sys_root: Path, cpus: Sequence[int]) -> dict[int, int] | None:
    """CPU -> its capacity or maximum frequency, or None when the kernel does not say (a VM, no cpufreq)."""
    for name in ("cpu_capacity", "cpufreq/cpuinfo_max_freq"):
        speed = {}
        for c in cpus:
            f = sys_root / f"sys/devices/system/cpu/cpu{c}/{name}"
            try:
                speed[c] = int(f.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                break
        else:
            return speed
    return None


def core_sets(clusters: Sequence[tuple[str, int, int]], target: str, wanted: Sequence[str],
              sys_root: Path = Path("/"), allowed: Sequence[int] | None = None) -> dict[str, tuple[int, ...] | str]:
    """Each wanted core set -> the CPU ids to pin to, or the reason it is not available on this host.

    ``clusters``: the target profile's (name, count, max_mhz)."""
    cpus = sorted(allowed if allowed is not None else os.sched_getaffinity(0))
    out: dict[str, tuple[int, ...] | str] = {}
    ranked = sorted(clusters, key=lambda c: c[2])
    speed = _host_cpu_speed(sys_root, cpus)
    groups: list[tuple[int, ...]] = []
    if speed:
        for v in sorted(set(speed.values())):
            groups.append(tuple(c for c in cpus if speed[c] == v))
    for name in wanted:
        if name == "all":
            out[name] = tuple(cpus)
            continue
        if len(ranked) < 2:
            desc = ", ".join(f"{n} x{k}" for n, k, _ in ranked)
            out[name] = f"cores={name} skipped: {target} has one core cluster ({desc}), no big/little split; use cores=all"
        elif not speed:
            out[name] = (f"cores={name} skipped: this host's kernel gives no per-CPU capacity or max frequency (no "
                         f"cpufreq in sysfs), so {target}'s clusters cannot be found among CPUs {cpus}")
        elif [len(g) for g in groups] != [c[1] for c in ranked]:
            out[name] = (f"cores={name} skipped: this host's CPUs group as {[list(g) for g in groups]} by speed, not as "
                         f"{target}'s clusters ({', '.join(f'{n} x{k}' for n, k, _ in ranked)}): not that device")
        else:
            out[name] = groups[-1] if name == "big" else groups[0]
    return out


def setting_label(threads: int | None, cores: str | None) -> str:
    return " ".join(x for x in (f"threads={threads}" if threads else "threads=default",
                                f"cores={cores}" if cores else "") if x)


def run_sweep(source: str | Path, sweep: Sweep, config: RunConfig, clusters: Sequence[tuple[str, int, int]],
              target: str, profile_fn: Callable[..., ProfileResult], sys_root: Path = Path("/"),
              on_setting: Callable[[str], None] | None = None, **profile_kwargs: object) -> ProfileResult:
    """Every artifact in every available (threads, cores) setting, as one result whose artifact results each
    carry their ``setting``; the skipped core sets are the result's ``notes``."""
    sets = core_sets(clusters, target, [c for c in sweep.cores if c], sys_root)
    notes = [v for v in sets.values() if isinstance(v, str)]
    results: list[ArtifactResult] = []
    last: ProfileResult | None = None
    for threads, cores in sweep.settings():
        cpus = sets.get(cores) if cores else ()
        if isinstance(cpus, str):
            continue
        if on_setting is not None:
            on_setting(setting_label(threads, cores))
        cfg = dataclasses.replace(config, threads=threads if threads else config.threads, cpus=tuple(cpus or ()),
                                  core_set=cores)
        last = profile_fn(source, config=cfg, **profile_kwargs)
        results += [dataclasses.replace(r, setting=setting_label(threads or r.threads, cores)) for r in last.results]
    if last is None:
        raise ConfigError("--sweep: no setting can run on this host: " + "; ".join(notes))
    return dataclasses.replace(last, config=config, results=tuple(results), notes=tuple(notes))


def clusters_of(profile: object) -> list[tuple[str, int, int]]:
    """(name, count, max_mhz) of a :class:`~edgeship.targets.schema.TargetProfile`'s clusters."""
    return [(c.name, c.count, c.max_mhz) for c in getattr(profile, "clusters", ())]


def recommended(pick: Mapping[str, object]) -> dict[str, object]:
    """A decision's pick as the runtime setting a bundle records for its target."""
    setting = str(pick.get("setting") or "")
    parts = dict(p.split("=", 1) for p in setting.split() if "=" in p)
    threads = parts.get("threads")
    return {"artifact": pick["artifact"], "threads": int(threads) if threads and threads.isdigit() else None,
            "cores": parts.get("cores"), "setting": setting or None}
