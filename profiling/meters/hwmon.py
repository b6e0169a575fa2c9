"""Generic Linux hwmon power sensors: ``power*_input``/``_average`` (µW), ``in*_input`` (mV) x ``curr*_input``
(mA), or cumulative ``energy*_input`` (µJ). Typical case: an INA219 on a Raspberry Pi 4."""

from __future__ import annotations

import re
from pathlib import Path

from edgeship.errors import MeterError
from edgeship.profiling.meters.base import METERS, Availability, MeterContext, PolledMeter

_INDEX = re.compile(r"^(power|in|curr|energy)(\d+)_(input|average)$")
# Drivers whose power reading describes the board or the CPU: INA2xx-style shunt monitors, the ACPI power
# meter (whole system) and the Zen energy drivers. A GPU's own hwmon (amdgpu, nouveau) would present GPU-only
# power as the machine's, so it is not used.
BOARD_SENSORS = ("ina", "power_meter", "zenergy", "amd_energy")


@METERS.register("hwmon")
class HwmonMeter(PolledMeter):
    name = "hwmon"
    resolution_w = 1e-6

    def __init__(self, ctx: MeterContext | None = None) -> None:
        super().__init__(ctx)
        self.device = ""
        self.power_files: list[Path] = []  # µW
        self.vi_pairs: list[tuple[Path, Path]] = []  # (mV, mA)
        self.energy_files: list[Path] = []  # µJ

    def available(self) -> Availability:
        sysfs = self.ctx.sys
        found: list[tuple[int, Path, str]] = []
        skipped: list[str] = []
        try:
            for d in sysfs.glob("sys/class/hwmon/hwmon*"):
                if not (d / "name").exists():
                    continue
                name = sysfs.read_text(d / "name").strip()
                if name == "ina3221":  # the Jetson rails: their sum double-counts VDD_IN, see the jetson meter
                    continue
                files = {m.group(0): m for f in d.iterdir() if (m := _INDEX.match(f.name))}
                if not any(k.startswith(("power", "energy")) or k.startswith("curr") for k in files):
                    continue
                if not name.startswith(BOARD_SENSORS):
                    skipped.append(name)
                    continue
                found.append((0 if name.startswith("ina") else 1, d, name))  # dedicated power monitors first
        except (MeterError, OSError) as e:
            return Availability(False, str(e))
        for _, d, name in sorted(found, key=lambda x: x[0]):
            if self._probe(d):
                self.device = f"{name} ({d.name})"
                try:
                    (self.read_power_w if self.mode == "power" else self.read_counters_uj)()
                except MeterError as e:
                    return Availability(False, str(e))
                what = "power" if self.mode == "power" else "energy counter"
                return Availability(True, f"hwmon {what} sensor {self.device}")
        also = f" (skipped {', '.join(skipped)}: not a board or CPU power sensor)" if skipped else ""
        return Availability(False, f"no hwmon power, V x I or energy sensor under {sysfs.path('sys/class/hwmon')}"
                            + also)

    def _probe(self, d: Path) -> bool:
        names = {f.name for f in d.iterdir()}

        def idx(prefix: str, suffix: str = "input") -> list[int]:
            return sorted(int(m.group(2)) for n in names if (m := _INDEX.match(n))
                          and m.group(1) == prefix and m.group(3) == suffix)

        power = idx("power") or idx("power", "average")
        suffix = "input" if idx("power") else "average"
        self.power_files = [d / f"power{k}_{suffix}" for k in power]
        curr = set(idx("curr"))
        self.vi_pairs = [] if power else [(d / f"in{k}_input", d / f"curr{k}_input") for k in idx("in") if k in curr]
        self.energy_files = [d / f"energy{k}_input" for k in idx("energy")]
        if self.power_files or self.vi_pairs:
            self.mode = "power"
            return True
        if self.energy_files:
            self.mode = "counter"
            return True
        return False

    def read_power_w(self) -> float:
        sysfs = self.ctx.sys
        uw = sum(sysfs.read_int(p) for p in self.power_files)
        # V x I per channel: mV x mA = µW. A bus voltage cannot be negative; a current may be (reverse flow).
        uw += sum(sysfs.read_int(v) * abs(sysfs.read_int(i, signed=True)) for v, i in self.vi_pairs)
        return uw / 1e6

    def read_counters_uj(self) -> tuple[int, ...]:
        return tuple(self.ctx.sys.read_int(p) for p in self.energy_files)

    def wrap_ranges_uj(self) -> tuple[int | None, ...]:
        return tuple(None for _ in self.energy_files)  # hwmon documents no wrap range: backwards is an error
