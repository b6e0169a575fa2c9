"""Energy per inference.

A :class:`Meter` measures a window of the run (``start()`` ... ``stop()``).
Meters are registered by name in :data:`METERS`; real sensor meters live in
:mod:`edgeship.profiling.meters`. The ``estimate`` meter here multiplies the
target profile's power model by the process CPU time and is always labelled
``estimated: true``: it is a model, not a measurement.
"""

from __future__ import annotations

import dataclasses
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from edgeship.errors import EdgeshipError, MeterError
from edgeship.registry import Registry


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str


@dataclass(frozen=True)
class EnergyWindow:
    """What a meter saw over one window."""

    joules: float
    seconds: float
    samples: int
    resolution_j: float | None = None
    sampler_cpu_s: float = 0.0
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class EnergyResult:
    source: str
    estimated: bool
    reason: str
    available: bool
    joules_per_inference_gross: float | None = None
    joules_per_inference_net: float | None = None
    avg_watts: float | None = None
    idle_watts: float | None = None
    duration_s: float | None = None
    inferences: int = 0
    samples: int = 0
    resolution_j: float | None = None
    sampler_cpu_s: float | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["warnings"] = list(self.warnings)
        return d

    @classmethod
    def unavailable(cls, source: str, reason: str) -> EnergyResult:
        return cls(source=source, estimated=False, reason=reason, available=False)


class Meter(ABC):
    name: str = ""
    estimated: bool = False

    @abstractmethod
    def available(self) -> Availability: ...

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def stop(self) -> EnergyWindow: ...


METERS: Registry[type[Meter]] = Registry("energy meter")


@METERS.register("estimate")
class EstimateMeter(Meter):
    """E = idle_w x wall time + active_w_per_core x process CPU seconds (from the target profile)."""

    name = "estimate"
    estimated = True

    def __init__(self, idle_w: float, active_w_per_core: float, **_: Any) -> None:
        if idle_w < 0 or active_w_per_core < 0:
            raise MeterError("estimate meter: power model values must be >= 0")
        self.idle_w = idle_w
        self.active_w_per_core = active_w_per_core
        self._t0 = 0.0
        self._cpu0 = 0.0

    def available(self) -> Availability:
        return Availability(True, "power model of the target profile x process CPU time (an estimate, not a measurement)")

    def start(self) -> None:
        self._t0 = time.perf_counter()
        t = os.times()
        self._cpu0 = t.user + t.system

    def stop(self) -> EnergyWindow:
        wall = time.perf_counter() - self._t0
        t = os.times()
        cpu = t.user + t.system - self._cpu0
        return EnergyWindow(joules=self.idle_w * wall + self.active_w_per_core * cpu, seconds=wall, samples=2,
                            warnings=(f"estimated from {cpu:.3f} CPU-seconds over {wall:.3f} s",))

    def net_joules(self, window: EnergyWindow) -> float:
        return window.joules - self.idle_w * window.seconds


def power_model_profile(explicit: str | None, bundle_target: str | None, host_arch: str) -> tuple[Any, str]:
    """The target profile whose power model the estimate uses, and why that one.

    An explicit ``--target`` wins. Else the bundle's target when its CPU architecture is this
    host's, else the first built-in profile of this architecture: a Pi power model applied to
    x86 CPU time would describe neither machine.
    """
    from edgeship.targets import get_profile, list_profiles

    if explicit:
        return get_profile(explicit), f"--target {explicit}"
    if bundle_target:
        try:
            p = get_profile(bundle_target)
        except EdgeshipError:
            p = None
        if p is not None and p.arch == host_arch:
            return p, f"the bundle's target {bundle_target}"
    same = [p for p in list_profiles() if p.arch == host_arch]
    if same:
        why = f"first built-in {host_arch} profile"
        if bundle_target:
            why += f" (the bundle targets {bundle_target}, another architecture)"
        return same[0], why
    return None, f"no target profile for a {host_arch} host; pass --target"


class Recorder:
    """Drives one meter around the measured loop and turns its window into an :class:`EnergyResult`."""

    def __init__(self, meter: Meter | None, reason: str, idle_w: float | None = None) -> None:
        self.meter = meter
        self.reason = reason
        self.idle_w = idle_w
        self.window: EnergyWindow | None = None

    @classmethod
    def create(cls, choice: str, profile: Any, profile_reason: str) -> Recorder:
        if choice == "off":
            return cls(None, "energy measurement switched off (--energy off)")
        if choice not in ("auto", "estimate"):
            meter = METERS.get(choice)()  # unknown names raise UnknownKeyError listing the meters
            avail = meter.available()
            if not avail.ok:
                raise MeterError(f"--energy {choice}: meter not available here: {avail.reason}; "
                                 "use --energy auto to fall back to an estimate")
            return cls(meter, f"--energy {choice}: {avail.reason}")
        reasons = []
        if choice == "auto":
            for name, meter_cls in METERS.items():
                if meter_cls.estimated:
                    continue
                try:
                    meter = meter_cls()
                    avail = meter.available()
                except EdgeshipError as e:
                    reasons.append(f"{name}: {e}")
                    continue
                if avail.ok:
                    return cls(meter, f"{name}: {avail.reason}")
                reasons.append(f"{name}: {avail.reason}")
        if profile is None:
            return cls(None, f"no power model ({profile_reason}); " + "; ".join(reasons))
        meter = EstimateMeter(profile.power.idle_w, profile.power.active_w_per_core)
        why = "no real power meter found" + (f" ({'; '.join(reasons)})" if reasons else "") if choice == "auto" \
            else "--energy estimate"
        return cls(meter, f"{why}; estimate from the {profile.name} power model ({profile_reason})",
                   idle_w=profile.power.idle_w)

    def start(self) -> None:
        if self.meter is not None:
            self.meter.start()

    def stop(self) -> None:
        if self.meter is not None:
            self.window = self.meter.stop()

    def result(self, inferences: int) -> EnergyResult:
        if self.meter is None or self.window is None:
            return EnergyResult.unavailable(self.meter.name if self.meter else "none", self.reason)
        w = self.window
        gross = w.joules / max(inferences, 1)
        net = None
        if isinstance(self.meter, EstimateMeter):
            net = self.meter.net_joules(w) / max(inferences, 1)
        return EnergyResult(
            source=self.meter.name, estimated=self.meter.estimated, reason=self.reason, available=True,
            joules_per_inference_gross=gross, joules_per_inference_net=net,
            avg_watts=w.joules / w.seconds if w.seconds > 0 else None, idle_watts=self.idle_w, duration_s=w.seconds,
            inferences=inferences, samples=w.samples, resolution_j=w.resolution_j, sampler_cpu_s=w.sampler_cpu_s,
            warnings=w.warnings,
        )
