"""Energy per inference.

A :class:`Meter` measures a window of the run (``start()`` ... ``stop()``). Meters live in
:mod:`edgeship.profiling.meters`, one module per sensor family, and are registered in :data:`METERS`
when that package is imported (explicitly, just below). The :class:`Recorder` picks one (``--energy auto``:
the best available real meter, else the ``estimate`` meter, which is always labelled ``estimated: true``),
measures idle power before and after the run, and turns the windows into gross and net joules per inference.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgeship.errors import EdgeshipError, MeterError
from edgeship.profiling.meters import (
    AUTO_ORDER,
    METERS,
    Availability,
    EnergyWindow,
    EstimateMeter,
    Meter,
    MeterContext,
)

__all__ = ["METERS", "Availability", "EnergyResult", "EnergyWindow", "EstimateMeter", "Meter", "MeterContext",
           "Recorder", "power_model_profile"]


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
    idle_source: str | None = None  # "measured" (idle windows before and after) or "power model"
    joules_total: float | None = None
    duration_s: float | None = None
    inferences: int = 0
    samples: int = 0
    idle_samples: int = 0
    resolution_j: float | None = None
    sampler_cpu_s: float | None = None
    sampler_cpu_fraction: float | None = None  # sampler thread CPU time / measured wall time
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["warnings"] = list(self.warnings)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EnergyResult:
        """From :meth:`to_dict`'s keys (a file may lack optional ones, or hold more)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in d.items() if k in names}, "warnings": tuple(d.get("warnings") or ())})

    @classmethod
    def unavailable(cls, source: str, reason: str) -> EnergyResult:
        return cls(source=source, estimated=False, reason=reason, available=False)


def power_model_profile(explicit: str | None, bundle_target: str | None, host_arch: str,
                        board: str | None = None) -> tuple[Any, str]:
    """The target profile whose power model the estimate uses, and why that one.

    An explicit ``--target`` wins. Else the profile of the board this runs on (the device-tree
    model :func:`edgeship.profiling.sysinfo.board_model` reads), else the bundle's target when its
    CPU architecture is this host's, else the only built-in profile of this architecture. When
    several fit (a Pi, a Jetson and two phones are all aarch64) none is picked: a phone's power
    model applied to a Pi's CPU time would describe neither machine.
    """
    from edgeship.targets import get_profile, list_profiles

    if explicit:
        return get_profile(explicit), f"--target {explicit}"
    same = [p for p in list_profiles() if p.arch == host_arch]
    on_board = [p for p in same if p.is_board(board)]
    if on_board:
        return on_board[0], f"detected board {board}"
    if bundle_target:
        try:
            p = get_profile(bundle_target)
        except EdgeshipError:
            p = None
        if p is not None and p.arch == host_arch:
            return p, f"the bundle's target {bundle_target}"
    other = f" (the bundle targets {bundle_target}, another architecture)" if bundle_target else ""
    if len(same) == 1:
        return same[0], f"the only built-in {host_arch} profile{other}"
    if same:
        return None, (f"board {board or 'not detected'}{other}: pass --target with one of "
                      f"{', '.join(p.name for p in same)} to pick a {host_arch} power model")
    return None, f"no target profile for a {host_arch} host; pass --target"


class Recorder:
    """Drives one meter around the measured loop and turns its windows into an :class:`EnergyResult`.

    ``start()`` measures idle power for ``idle_seconds`` and then opens the run window; ``stop()`` closes it
    and measures idle again. A meter failing mid-run (a file vanishing, a counter going backwards, a CSV log
    that misses the run) never stops the run: the result says energy is unavailable and why.
    """

    def __init__(self, meter: Meter | None, reason: str, idle_seconds: float = 0.0,
                 sleep: Any = time.sleep) -> None:
        self.meter = meter
        self.reason = reason
        self.idle_seconds = idle_seconds
        self.sleep = sleep
        self.window: EnergyWindow | None = None
        self.idle_windows: list[EnergyWindow] = []
        self.failure: str | None = None

    @classmethod
    def create(cls, choice: str, profile: Any, profile_reason: str, ctx: MeterContext | None = None,
               idle_seconds: float = 0.0) -> Recorder:
        """The recorder for ``--energy choice``; a forced meter that is unavailable raises :class:`MeterError`."""
        ctx = dataclasses.replace(ctx or MeterContext(), profile=profile)
        if choice == "off":
            return cls(None, "energy measurement switched off (--energy off)")
        if choice not in ("auto", "estimate"):
            meter = METERS.get(choice)(ctx)  # unknown names raise UnknownKeyError listing the meters
            avail = meter.available()
            if not avail.ok:
                raise MeterError(f"--energy {choice}: meter not available here: {avail.reason}; "
                                 "use --energy auto to fall back to the best available one")
            return cls(meter, f"--energy {choice}: {avail.reason}", idle_seconds)
        reasons = []
        if choice == "auto":
            for name in [*AUTO_ORDER, *(n for n in METERS if n not in AUTO_ORDER)]:
                meter_cls = METERS.get(name)
                if meter_cls.estimated:
                    continue
                try:
                    meter = meter_cls(ctx)
                    avail = meter.available()
                except EdgeshipError as e:
                    avail = Availability(False, str(e))
                if avail.ok:
                    return cls(meter, f"{name}: {avail.reason}", idle_seconds)
                reasons.append(f"{name}: {avail.reason}")
        estimate = EstimateMeter(ctx)
        if not estimate.available().ok:
            return cls(None, f"no power model ({profile_reason}); " + "; ".join(reasons))
        why = f"no real power meter found ({'; '.join(reasons)})" if choice == "auto" else "--energy estimate"
        return cls(estimate, f"{why}; estimate from the {profile.name} power model ({profile_reason})")

    def min_duration_s(self) -> float:
        """The measured loop must last at least this long for the meter to resolve it."""
        return self.meter.min_window_s() if self.meter is not None and self.failure is None else 0.0

    def _idle(self) -> None:
        assert self.meter is not None
        self.meter.start()
        self.sleep(self.idle_seconds)
        self.idle_windows.append(self.meter.stop())

    def start(self) -> None:
        if self.meter is None:
            return
        try:
            if self.idle_seconds > 0 and not self.meter.estimated:
                self._idle()
            self.meter.start()
        except MeterError as e:
            self.failure = str(e)

    def stop(self) -> None:
        if self.meter is None or self.failure is not None:
            return
        try:
            self.window = self.meter.stop()
            if self.idle_seconds > 0 and not self.meter.estimated:
                self._idle()
        except MeterError as e:
            self.failure = str(e)

    def idle_watts(self) -> tuple[float | None, str | None]:
        if isinstance(self.meter, EstimateMeter):
            return self.meter.idle_w, "power model"
        watts = [w.watts for w in self.idle_windows if w.watts is not None]
        return (sum(watts) / len(watts), "measured") if watts else (None, None)

    def result(self, inferences: int) -> EnergyResult:
        name = self.meter.name if self.meter else "none"
        if self.failure is not None:
            return EnergyResult.unavailable(name, f"{self.reason}; measurement failed: {self.failure}")
        if self.meter is None or self.window is None:
            return EnergyResult.unavailable(name, self.reason)
        w = self.window
        if inferences < 1:
            return EnergyResult.unavailable(name, f"{self.reason}; no inferences were measured")
        idle_w, idle_source = self.idle_watts()
        warnings = list(w.warnings) + [x for iw in self.idle_windows for x in iw.warnings if x not in w.warnings]
        net = None
        if idle_w is not None:
            net = (w.joules - idle_w * w.seconds) / inferences
            if net < 0:
                warnings.append(f"run power {w.joules / w.seconds:.3f} W is below idle {idle_w:.3f} W: the load is "
                                "within the meter's noise; net energy is not meaningful")
        elif self.idle_seconds <= 0 and not self.meter.estimated:
            warnings.append("no idle window (--idle-seconds 0): only gross energy")
        sampler_cpu = w.sampler_cpu_s + sum(iw.sampler_cpu_s for iw in self.idle_windows)
        return EnergyResult(
            source=self.meter.name, estimated=self.meter.estimated, reason=self.reason, available=True,
            joules_per_inference_gross=w.joules / inferences, joules_per_inference_net=net,
            avg_watts=w.watts, idle_watts=idle_w, idle_source=idle_source, joules_total=w.joules, duration_s=w.seconds,
            inferences=inferences, samples=w.samples, idle_samples=sum(iw.samples for iw in self.idle_windows),
            resolution_j=w.resolution_j, sampler_cpu_s=None if self.meter.estimated else sampler_cpu,
            sampler_cpu_fraction=w.sampler_cpu_s / w.seconds if w.seconds > 0 and not self.meter.estimated else None,
            warnings=tuple(warnings),
        )
