"""Linux powercap RAPL: cumulative ``energy_uj`` counters of the package and DRAM zones (Intel and AMD Zen)."""

from __future__ import annotations

from pathlib import Path

from edgeship.errors import MeterError
from edgeship.profiling.meters.base import METERS, Availability, MeterContext, PolledMeter

# core/uncore sit inside package-N; psys already contains the package: summing them would count twice.
_SUMMED = ("package-", "dram")
_ROOT_ONLY = ("energy_uj is root-only since Linux 5.10 (CVE-2020-8694): run as root, or make it readable "
              "(/etc/sysfs.conf: mode class/powercap/intel-rapl:0/energy_uj = 0444)")


@METERS.register("rapl")
class RaplMeter(PolledMeter):
    name = "rapl"
    mode = "counter"
    counter_min_window_s = 0.1  # RAPL updates every ~1 ms; 0.1 s spans ~100 updates

    def __init__(self, ctx: MeterContext | None = None) -> None:
        super().__init__(ctx)
        self.zones: list[tuple[str, Path, int]] = []  # (name, energy_uj path, max_energy_range_uj)

    def available(self) -> Availability:
        sysfs = self.ctx.sys
        # intel-rapl:* only: intel-rapl-mmio:* repeats package-0 through another interface.
        dirs = [d for d in sysfs.glob("sys/class/powercap/intel-rapl:*") if (d / "name").exists()]
        if not dirs:
            return Availability(False, f"no RAPL zones under {sysfs.path('sys/class/powercap')}")
        zones, seen = [], set()
        try:
            for d in dirs:
                name = sysfs.read_text(d / "name").strip()
                real = d.resolve()
                if not name.startswith(_SUMMED) or real in seen:
                    continue
                seen.add(real)
                energy = d / "energy_uj"
                try:
                    sysfs.read_int(energy)
                except MeterError as e:
                    if "permission denied" in str(e):
                        raise MeterError(f"{energy}: {_ROOT_ONLY}") from None
                    raise
                zones.append((name, energy, sysfs.read_int(d / "max_energy_range_uj")))
        except MeterError as e:
            return Availability(False, str(e))
        if not zones:
            return Availability(False, f"RAPL zones present but none is a package or dram zone ({len(dirs)} found)")
        self.zones = zones
        return Availability(True, "RAPL counters " + ", ".join(z[0] for z in zones) + " (CPU package and DRAM, "
                            "not the whole machine)")

    def read_counters_uj(self) -> tuple[int, ...]:
        return tuple(self.ctx.sys.read_int(p) for _, p, _ in self.zones)

    def wrap_ranges_uj(self) -> tuple[int | None, ...]:
        return tuple(w for _, _, w in self.zones)
