"""Raspberry Pi 5 PMIC: ``vcgencmd pmic_read_adc``, the sum of V x I over the rails that report both.

The PMIC does not see 5 V loads (USB devices, HATs, NVMe), so the sum under-counts board power. When the
target profile describes this board and carries a linear calibration (``real = pmic x scale + offset``,
fitted against a wall meter), it is applied per sample and said so.
"""

from __future__ import annotations

import re

from edgeship.errors import MeterError
from edgeship.profiling.meters.base import METERS, Availability, PolledMeter

_LINE = re.compile(r"^\s*(?P<rail>\S+?)_(?P<kind>[AV])\s+(?:current|volt)\(\d+\)=(?P<value>[\d.]+)[AV]\s*$")
UNDERCOUNT = ("the Pi 5 PMIC does not see 5 V loads (USB, HATs, NVMe): its sum under-counts board power")


def parse_pmic_adc(text: str) -> dict[str, float]:
    """Rail -> watts for every rail with both a current and a voltage line."""
    if "error_msg" in text:
        raise MeterError(f"vcgencmd pmic_read_adc: {text.strip()[:120]} (not a Raspberry Pi 5?)")
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        m = _LINE.match(line)
        if m is None:
            raise MeterError(f"vcgencmd pmic_read_adc: unexpected line {line.strip()[:80]!r}")
        (amps if m["kind"] == "A" else volts)[m["rail"]] = float(m["value"])
    rails = {r: amps[r] * volts[r] for r in amps if r in volts}
    if not rails:
        raise MeterError("vcgencmd pmic_read_adc: no rail reported both a current and a voltage")
    return rails


@METERS.register("rpi5-pmic")
class Rpi5PmicMeter(PolledMeter):
    name = "rpi5-pmic"
    resolution_w = 1e-6  # 8-decimal A and V readings

    def calibration(self) -> tuple[float, float] | None:
        prof = self.ctx.profile
        power = getattr(prof, "power", None)
        if power is None or power.meter != self.name:
            return None  # a calibration fitted on another board would be wrong here
        if (power.calibration_scale, power.calibration_offset_w) == (1.0, 0.0):
            return None
        return float(power.calibration_scale), float(power.calibration_offset_w)

    def available(self) -> Availability:
        try:
            rails = parse_pmic_adc(self.ctx.run(["vcgencmd", "pmic_read_adc"]))
        except MeterError as e:
            return Availability(False, str(e))
        return Availability(True, f"Pi 5 PMIC ADC, {len(rails)} rails ({UNDERCOUNT})")

    def prepare(self) -> None:  # available() already costs one firmware read; do not repeat it per window
        pass

    def read_power_w(self) -> float:
        pmic = sum(parse_pmic_adc(self.ctx.run(["vcgencmd", "pmic_read_adc"])).values())
        cal = self.calibration()
        return pmic * cal[0] + cal[1] if cal else pmic

    def window_warnings(self) -> tuple[str, ...]:
        cal = self.calibration()
        if cal:
            return (f"{UNDERCOUNT}; corrected with the profile's calibration x{cal[0]:g} + {cal[1]:g} W "
                    "(fitted on one board)",)
        return (UNDERCOUNT + "; no calibration in the target profile",)
