"""Thermal and frequency telemetry during a run, so a report can flag a run that throttled.

Sampled on a daemon thread (every ``period_s``): CPU frequency per core (``cpufreq/scaling_cur_freq``, kHz),
thermal zones (``thermal_zone*/temp``, m°C, with the lowest ``passive`` trip point), and on a Raspberry Pi
``vcgencmd get_throttled``. A sensor that is missing or returns garbage is left out with a note; telemetry
never fails a run. ``wait_for_cooldown`` implements ``--cooldown-to C``.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeship.errors import MeterError
from edgeship.profiling.meters.base import CommandRunner, SysRoot, run_command

# vcgencmd(1): bits 0-3 are the current state, bits 16-19 the same conditions latched since boot.
THROTTLE_BITS = {0: "under-voltage", 1: "arm frequency capped", 2: "throttled", 3: "soft temperature limit"}
_THROTTLED = re.compile(r"^\s*throttled=(0x[0-9a-fA-F]+)\s*$")


def decode_throttled(text: str) -> dict[str, Any]:
    """``throttled=0x50005`` -> value, conditions now, conditions that occurred since boot."""
    m = _THROTTLED.match(text)
    if m is None:
        raise MeterError(f"vcgencmd get_throttled: unexpected output {text.strip()[:60]!r}")
    value = int(m[1], 16)
    return {"raw": f"0x{value:x}", "now": [n for b, n in THROTTLE_BITS.items() if value >> b & 1],
            "since_boot": [n for b, n in THROTTLE_BITS.items() if value >> (b + 16) & 1]}


class Telemetry:
    def __init__(self, root: str | Path = "/", run: CommandRunner = run_command, period_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        self.sys = SysRoot(root)
        self.run = run
        self.period_s = period_s
        self.clock = clock
        self.sleep = sleep
        self.notes: list[str] = []
        self._use_vcgencmd = True
        self._snaps: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- single readings ------------------------------------------------------------------------------
    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def cpufreq_khz(self) -> dict[str, int]:
        out = {}
        for f in self.sys.glob("sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq"):
            try:
                out[f.parent.parent.name] = self.sys.read_int(f)
            except MeterError as e:
                self._note(str(e))
        return out

    def governors(self) -> str | None:
        """The cpufreq governors in force ("schedutil", "performance"...); None where sysfs has no cpufreq."""
        found = set()
        for f in self.sys.glob("sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_governor"):
            try:
                found.add(self.sys.read_text(f).strip())
            except MeterError as e:
                self._note(str(e))
        return ", ".join(sorted(found)) or None

    def temperatures_c(self) -> dict[str, float]:
        out = {}
        for d in self.sys.glob("sys/class/thermal/thermal_zone*"):
            try:
                kind = self.sys.read_text(d / "type").strip() if (d / "type").exists() else d.name
                out[f"{kind}" if kind not in out else f"{kind}:{d.name}"] = self.sys.read_int(d / "temp", signed=True) / 1000
            except MeterError as e:
                self._note(str(e))
        return out

    def passive_trips_c(self) -> dict[str, float]:
        """Lowest ``passive`` trip point per zone: at or above it the kernel throttles the CPU."""
        out: dict[str, float] = {}
        for d in self.sys.glob("sys/class/thermal/thermal_zone*"):
            try:
                kind = self.sys.read_text(d / "type").strip() if (d / "type").exists() else d.name
                for t in d.glob("trip_point_*_type"):
                    if self.sys.read_text(t).strip() == "passive":
                        c = self.sys.read_int(t.with_name(t.name.replace("_type", "_temp")), signed=True) / 1000
                        out[kind] = min(c, out.get(kind, c))
            except MeterError as e:
                self._note(str(e))
        return out

    def throttled(self) -> dict[str, Any] | None:
        if not self._use_vcgencmd:
            return None
        try:
            return decode_throttled(self.run(["vcgencmd", "get_throttled"]))
        except MeterError as e:
            self._use_vcgencmd = False  # not a Pi (or a broken firmware tool): do not retry every sample
            self._note(f"Pi throttle flags unavailable: {e}")
            return None

    def snapshot(self) -> dict[str, Any]:
        return {"t": self.clock(), "cpufreq_khz": self.cpufreq_khz(), "temperature_c": self.temperatures_c(),
                "pi": self.throttled()}

    # -- during the run --------------------------------------------------------------------------------
    def start(self) -> None:
        self._snaps = [self.snapshot()]
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="edgeship-telemetry", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self._snaps.append(self.snapshot())
            except Exception as e:  # telemetry is a side channel: note it and stop sampling
                self._note(f"telemetry sampling stopped: {type(e).__name__}: {e}")
                return

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._snaps.append(self.snapshot())
        return self.summary(self._snaps)

    def summary(self, snaps: list[dict[str, Any]]) -> dict[str, Any]:
        freq: dict[str, dict[str, int]] = {}
        for s in snaps:
            for cpu, khz in s["cpufreq_khz"].items():
                f = freq.setdefault(cpu, {"min_khz": khz, "max_khz": khz})
                f["min_khz"], f["max_khz"] = min(f["min_khz"], khz), max(f["max_khz"], khz)
        for cpu, f in freq.items():
            hw = self.sys.path(f"sys/devices/system/cpu/{cpu}/cpufreq/cpuinfo_max_freq")
            if hw.exists():
                try:
                    f["hw_max_khz"] = self.sys.read_int(hw)
                except MeterError as e:
                    self._note(str(e))
        temps: dict[str, dict[str, float]] = {}
        for s in snaps:
            for zone, c in s["temperature_c"].items():
                z = temps.setdefault(zone, {"start_c": c, "max_c": c})
                z["max_c"], z["end_c"] = max(z["max_c"], c), c
        reasons = []
        for zone, trip in self.passive_trips_c().items():
            if zone in temps:
                temps[zone]["passive_trip_c"] = trip
                if temps[zone]["max_c"] >= trip:
                    reasons.append(f"{zone} reached its passive trip point {trip:g} C")
        pi = [s["pi"] for s in snaps if s["pi"] is not None]
        pi_out = None
        if pi:
            seen_now = sorted({n for p in pi for n in p["now"]})
            new = sorted(set(pi[-1]["since_boot"]) - set(pi[0]["since_boot"]))
            pi_out = {"start": pi[0]["raw"], "end": pi[-1]["raw"], "seen_during_run": seen_now,
                      "newly_latched": new}
            reasons += [f"Pi: {n}" for n in sorted(set(seen_now) | set(new))]
        return {"samples": len(snaps), "period_s": self.period_s, "cpufreq": freq, "governor": self.governors(),
                "temperature": temps,
                "pi_throttled": pi_out, "throttled": bool(reasons), "throttle_reasons": reasons,
                "notes": list(self.notes)}

    # -- before the run --------------------------------------------------------------------------------
    def hottest_c(self) -> float | None:
        temps = self.temperatures_c()
        if temps:
            return max(temps.values())
        if self._use_vcgencmd:
            try:
                text = self.run(["vcgencmd", "measure_temp"])
                m = re.match(r"^\s*temp=([\d.]+)'C\s*$", text)
                if m:
                    return float(m[1])
                self._note(f"vcgencmd measure_temp: unexpected output {text.strip()[:40]!r}")
            except MeterError as e:
                self._note(f"vcgencmd measure_temp: {e}")
        return None

    def wait_for_cooldown(self, target_c: float, timeout_s: float = 600.0, poll_s: float = 1.0) -> dict[str, Any]:
        """Sleep until the hottest sensor reads below ``target_c`` (``--cooldown-to``), at most ``timeout_s``."""
        t0 = self.clock()
        first = now = self.hottest_c()
        if first is None:
            return {"target_c": target_c, "reached": False, "waited_s": 0.0,
                    "note": "no temperature sensor found: did not wait"}
        while now is not None and now >= target_c and self.clock() - t0 < timeout_s:
            self.sleep(poll_s)
            now = self.hottest_c()
        reached = now is not None and now < target_c
        out: dict[str, Any] = {"target_c": target_c, "start_c": first, "end_c": now, "waited_s": self.clock() - t0,
                               "reached": reached}
        if not reached:
            out["note"] = f"still at {now} C after {timeout_s:g} s; measured anyway"
        return out
