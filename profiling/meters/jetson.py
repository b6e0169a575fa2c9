"""NVIDIA Jetson INA3221 rails: JetPack 5/6 hwmon layout and JetPack 4 (L4T 32) IIO layout.

The input rail (``VDD_IN``; ``POM_5V_IN`` on the Nano) is the module's total; where a board has none
(AGX Orin) the rails are summed. No rail includes the carrier board.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeship.errors import MeterError
from edgeship.profiling.meters.base import METERS, Availability, MeterContext, PolledMeter

INPUT_RAILS = ("VDD_IN", "POM_5V_IN")


@dataclass(frozen=True)
class Rail:
    label: str
    power_mw: Path | None = None  # JetPack 4 in_power<c>_input
    volts_mv: Path | None = None
    amps_ma: Path | None = None


def find_rails(ctx: MeterContext) -> tuple[list[Rail], str]:
    sysfs = ctx.sys
    rails: list[Rail] = []
    # JetPack 5/6: hwmon<N> changes between boots, so glob it.
    for d in sysfs.glob("sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*"):
        for label_file in sorted(d.glob("in*_label")):
            k = label_file.name[2:-len("_label")]
            if (d / f"curr{k}_input").exists():  # in7 "sum of shunt voltages" has no current
                rails.append(Rail(sysfs.read_text(label_file).strip(), volts_mv=d / f"in{k}_input",
                                  amps_ma=d / f"curr{k}_input"))
    if rails:
        return rails, "JetPack 5/6 hwmon"
    for d in sysfs.glob("sys/bus/i2c/drivers/ina3221x/*/iio:device*"):
        for name_file in sorted(d.glob("rail_name_*")):
            c = name_file.name.rsplit("_", 1)[1]
            power = d / f"in_power{c}_input"
            rails.append(Rail(sysfs.read_text(name_file).strip(), power_mw=power if power.exists() else None,
                              volts_mv=d / f"in_voltage{c}_input", amps_ma=d / f"in_current{c}_input"))
    return rails, "JetPack 4 IIO"


@METERS.register("jetson")
class JetsonMeter(PolledMeter):
    name = "jetson"
    resolution_w = 1e-3

    def __init__(self, ctx: MeterContext | None = None) -> None:
        super().__init__(ctx)
        self.rails: list[Rail] = []

    def available(self) -> Availability:
        try:
            rails, layout = find_rails(self.ctx)
        except MeterError as e:
            return Availability(False, str(e))
        if not rails:
            return Availability(False, "no INA3221 rails under sys/bus/i2c/drivers/ina3221{,x} (not a Jetson?)")
        total = [r for r in rails if r.label in INPUT_RAILS]
        self.rails = total[:1] or rails
        try:
            self.read_power_w()
        except MeterError as e:
            return Availability(False, str(e))
        what = self.rails[0].label if total else "sum of " + ", ".join(r.label for r in rails)
        return Availability(True, f"Jetson INA3221 ({layout}): {what}; excludes the carrier board")

    def read_power_w(self) -> float:
        sysfs = self.ctx.sys
        mw = 0.0
        for r in self.rails:
            if r.power_mw is not None:
                mw += sysfs.read_int(r.power_mw)
            elif r.volts_mv is not None and r.amps_ma is not None:
                mw += sysfs.read_int(r.volts_mv) * sysfs.read_int(r.amps_ma) / 1000
            else:  # pragma: no cover - find_rails always sets one of the two
                raise MeterError(f"jetson rail {r.label}: no power or V x I files")
        return mw / 1000
