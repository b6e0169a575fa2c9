"""The fallback: the target profile's power model x this process's CPU time. A model, never a measurement."""

from __future__ import annotations

import os
import time

from edgeship.errors import MeterError
from edgeship.profiling.meters.base import METERS, Availability, EnergyWindow, Meter, MeterContext


@METERS.register("estimate")
class EstimateMeter(Meter):
    """E = idle_w x wall time + active_w_per_core x process CPU seconds."""

    name = "estimate"
    estimated = True

    def __init__(self, ctx: MeterContext | None = None) -> None:
        super().__init__(ctx)
        power = getattr(self.ctx.profile, "power", None)
        self.idle_w = float(power.idle_w) if power is not None else None
        self.active_w_per_core = float(power.active_w_per_core) if power is not None else None
        if (self.idle_w is not None and self.idle_w < 0) or (self.active_w_per_core or 0) < 0:
            raise MeterError("estimate meter: power model values must be >= 0")
        self._t0 = 0.0
        self._cpu0 = 0.0

    def available(self) -> Availability:
        if self.idle_w is None:
            return Availability(False, "no target profile with a power model; pass --target")
        return Availability(True, f"power model of {self.ctx.profile.name} x process CPU time "
                            "(an estimate, not a measurement)")

    def start(self) -> None:
        if self.idle_w is None:
            raise MeterError("estimate meter: no power model; pass --target")
        self._t0 = time.perf_counter()
        t = os.times()
        self._cpu0 = t.user + t.system

    def stop(self) -> EnergyWindow:
        wall = time.perf_counter() - self._t0
        t = os.times()
        cpu = t.user + t.system - self._cpu0
        joules = (self.idle_w or 0.0) * wall + (self.active_w_per_core or 0.0) * cpu
        return EnergyWindow(joules=joules, seconds=wall, samples=2,
                            warnings=(f"estimated from {cpu:.3f} CPU-seconds over {wall:.3f} s",))
