"""Android: the battery fuel gauge (``power_supply/battery``) and the Pixel on-device power monitor (ODPM)."""

from __future__ import annotations

import re
from pathlib import Path

from edgeship.errors import MeterError
from edgeship.profiling.meters.base import METERS, Availability, MeterContext, PolledMeter

CHARGING_WARNING = ("the battery is charging or a charger is online: the fuel gauge then measures the charger, "
                    "not the device (use wireless adb or input_suspend)")


def normalise_battery(current_raw: int, voltage_raw: int) -> float:
    """Watts drawn from a battery whose driver may report µA/µV (kernel ABI) or mA/mV (Samsung, some Huawei).

    The sign convention differs between vendors (negative = discharging per the ABI, positive on a Mi A1),
    so the magnitude is used; whether the battery is charging comes from the ``status`` file instead.
    """
    amps = abs(current_raw)
    # A phone running a model draws 10 mA .. 10 A: below 10,000 the unit can only be mA.
    amps_a = amps / 1e3 if amps < 10_000 else amps / 1e6
    # A Li-ion cell is 2.5 .. 5 V: in mV that is < 10,000, in µV > 1,000,000.
    volts_v = voltage_raw / 1e3 if voltage_raw < 10_000 else voltage_raw / 1e6
    if not 2.0 <= volts_v <= 5.5:
        raise MeterError(f"battery voltage_now {voltage_raw} is no Li-ion cell voltage in µV or mV")
    return amps_a * volts_v


@METERS.register("android-battery")
class AndroidBatteryMeter(PolledMeter):
    name = "android-battery"
    resolution_w = 1e-3
    # Fuel gauges refresh current_now roughly once a second (vendor-dependent); want several refreshes.
    counter_min_window_s = 5.0

    def _dir(self) -> Path:
        return self.ctx.sys.path("sys/class/power_supply/battery")

    def min_window_s(self) -> float:
        return max(super().min_window_s(), self.counter_min_window_s)

    def available(self) -> Availability:
        d = self._dir()
        if not d.is_dir():
            return Availability(False, f"no battery at {d}")
        try:
            self.read_power_w()
        except MeterError as e:
            return Availability(False, str(e))
        note = f"; {CHARGING_WARNING}" if self.charging() else ""
        return Availability(True, f"battery fuel gauge current_now x voltage_now{note}")

    def read_power_w(self) -> float:
        d, sysfs = self._dir(), self.ctx.sys
        return normalise_battery(sysfs.read_int(d / "current_now", signed=True), sysfs.read_int(d / "voltage_now"))

    def charging(self) -> bool:
        sysfs = self.ctx.sys
        status = self._dir() / "status"
        if status.exists() and sysfs.read_text(status).strip() in ("Charging", "Full"):
            return True
        for supply in ("usb", "ac", "wireless", "dock"):
            online = sysfs.path(f"sys/class/power_supply/{supply}/online")
            if online.exists() and sysfs.read_text(online).strip() == "1":
                return True
        return False

    def window_warnings(self) -> tuple[str, ...]:
        try:
            return (CHARGING_WARNING,) if self.charging() else ()
        except MeterError as e:
            return (f"could not tell whether a charger is connected: {e}",)


_ODPM_TIME = re.compile(r"^t=(\d+)$")
_ODPM_CHANNEL = re.compile(r"^CH(\d+)\(T=(\d+)\)\[([^\]]*)\],\s*(\d+)$")


def parse_odpm(text: str, where: str) -> dict[str, int]:
    """Rail -> cumulative µJ (µW·s) from one ``energy_value`` file."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines or not _ODPM_TIME.match(lines[0]):
        raise MeterError(f"{where}: not an ODPM energy_value file (no 't=' first line)")
    rails = {}
    for ln in lines[1:]:
        m = _ODPM_CHANNEL.match(ln)
        if m is None:
            raise MeterError(f"{where}: unexpected line {ln[:80]!r}")
        rails[f"CH{m[1]}[{m[3]}]"] = int(m[4])
    if not rails:
        raise MeterError(f"{where}: no channels")
    return rails


@METERS.register("android-odpm")
class AndroidOdpmMeter(PolledMeter):
    name = "android-odpm"
    mode = "counter"

    def __init__(self, ctx: MeterContext | None = None) -> None:
        super().__init__(ctx)
        self.files: list[Path] = []
        self._channels = 0

    def available(self) -> Availability:
        self.files = self.ctx.sys.glob("sys/bus/iio/devices/iio:device*/energy_value")
        if not self.files:
            return Availability(False, "no ODPM energy_value under sys/bus/iio/devices (not a Pixel 6+?)")
        try:
            n = len(self.read_counters_uj())
        except MeterError as e:
            return Availability(False, str(e))
        return Availability(True, f"Pixel ODPM, {n} rails on {len(self.files)} monitors (only the rails the "
                            "monitors are configured for, not the whole phone)")

    def read_counters_uj(self) -> tuple[int, ...]:
        out: list[int] = []
        for f in self.files:
            out.extend(parse_odpm(self.ctx.sys.read_text(f), str(f)).values())
        self._channels = len(out)
        return tuple(out)

    def wrap_ranges_uj(self) -> tuple[int | None, ...]:
        return (None,) * self._channels  # 64-bit accumulators: going back is a reset, never a wrap
