"""A log from an external USB power meter: CSV with a timestamp and watts, or volts and amps.

The meter logs on its own clock; the run window is taken in wall-clock time (``time.time()``) and the
log is read when the window stops, so the logger must be writing before the run starts. Timestamps are
Unix seconds or ISO 8601 (naive ISO times are taken as this machine's local time).
"""

from __future__ import annotations

import datetime as dt
import itertools
import re
import time
from pathlib import Path

from edgeship.errors import MeterError
from edgeship.profiling.meters.base import (
    METERS,
    Availability,
    EnergyWindow,
    Meter,
    MeterContext,
    integrate_trapezoid,
)

_COLUMNS = {
    "time": ("timestamp", "time", "t", "unix", "epoch", "timestamps", "unixtime"),
    "watts": ("watts", "power", "w", "powerw", "powerwatts", "p"),
    "volts": ("volts", "voltage", "v", "voltagev", "vbus"),
    "amps": ("amps", "current", "a", "i", "currenta", "ibus"),
}


def _norm(header: str) -> str:
    return re.sub(r"[^a-z]", "", header.lower())


def _timestamp(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return dt.datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise MeterError(f"{where}: timestamp {text[:40]!r} is neither Unix seconds nor ISO 8601") from None


def read_power_log(path: Path) -> list[tuple[float, float]]:
    """(unix seconds, watts) rows of a power-meter CSV, sorted by time."""
    import csv  # here, not at the top: the profiling worker imports this module and rarely reads a CSV

    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        raise MeterError(f"--energy-csv {path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise MeterError(f"--energy-csv {path}: not UTF-8 text; export the meter's log as CSV") from None
    except csv.Error as e:
        raise MeterError(f"--energy-csv {path}: not a CSV file ({e})") from None
    if not rows:
        raise MeterError(f"--energy-csv {path}: empty file")
    header = [_norm(h) for h in rows[0]]
    col = {k: next((i for i, h in enumerate(header) if h in names), None) for k, names in _COLUMNS.items()}
    if col["time"] is None or (col["watts"] is None and (col["volts"] is None or col["amps"] is None)):
        raise MeterError(f"--energy-csv {path}: header {rows[0]} needs a timestamp column and watts, or volts and "
                         "amps (e.g. 'timestamp,watts')")
    out = []
    for n, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        where = f"--energy-csv {path} line {n}"
        try:
            t = _timestamp(row[col["time"]], where)
            if col["watts"] is not None:
                w = float(row[col["watts"]])
            else:
                w = float(row[col["volts"]]) * abs(float(row[col["amps"]]))  # type: ignore[index]
        except (IndexError, ValueError):
            raise MeterError(f"{where}: expected numbers, got {row}") from None
        if w < 0 or w != w:
            raise MeterError(f"{where}: power {w} W is negative or not a number")
        out.append((t, w))
    return sorted(out)


def window_energy(log: list[tuple[float, float]], t0: float, t1: float, where: str) -> tuple[float, int]:
    """Joules over [t0, t1] from a power log (linear interpolation at the edges) and the rows used."""
    if len(log) < 2:
        raise MeterError(f"{where}: fewer than 2 readings in the log")
    import statistics

    first, last = log[0][0], log[-1][0]
    step = statistics.median(b[0] - a[0] for a, b in itertools.pairwise(log))
    if last < t0 or first > t1:
        raise MeterError(f"{where}: the log ({_iso(first)} .. {_iso(last)}) does not overlap the run "
                         f"({_iso(t0)} .. {_iso(t1)}); start the logger before the run and check both clocks")
    if first > t0 + step or last < t1 - step:
        raise MeterError(f"{where}: the log ({_iso(first)} .. {_iso(last)}) covers only part of the run "
                         f"({_iso(t0)} .. {_iso(t1)}); keep the logger running until the run ends")

    def at(t: float) -> float:
        t = min(max(t, first), last)
        for (ta, wa), (tb, wb) in itertools.pairwise(log):
            if ta <= t <= tb:
                return wa if tb == ta else wa + (wb - wa) * (t - ta) / (tb - ta)
        return log[-1][1]  # pragma: no cover - t is clamped into the log

    inside = [(t, w) for t, w in log if t0 < t < t1]
    return integrate_trapezoid([(t0, at(t0)), *inside, (t1, at(t1))]), len(inside)


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%H:%M:%S.%f")[:-3] + "Z"


@METERS.register("csv")
class CsvMeter(Meter):
    name = "csv"

    def __init__(self, ctx: MeterContext | None = None) -> None:
        super().__init__(ctx)
        self._t0 = 0.0
        self._step = 0.0

    def _path(self) -> Path:
        if not self.ctx.csv_path:
            raise MeterError("no power log given: pass --energy-csv FILE")
        return Path(self.ctx.csv_path)

    def available(self) -> Availability:
        try:
            path = self._path()
            log = read_power_log(path)
        except MeterError as e:
            return Availability(False, str(e))
        if len(log) >= 2:
            import statistics

            self._step = statistics.median(b[0] - a[0] for a, b in itertools.pairwise(log))
        return Availability(True, f"external power meter log {path} ({len(log)} rows so far; wall power)")

    def min_window_s(self) -> float:
        return 10 * self._step  # ten log rows per window

    def start(self) -> None:
        self._path()
        self._t0 = time.time()

    def stop(self) -> EnergyWindow:
        t1 = time.time()
        path = self._path()
        joules, rows = window_energy(read_power_log(path), self._t0, t1, f"--energy-csv {path}")
        warnings: tuple[str, ...] = ()
        if rows < 10:
            warnings = (f"only {rows} log rows fell inside a {t1 - self._t0:.2f} s window; log faster or run longer",)
        return EnergyWindow(joules=joules, seconds=t1 - self._t0, samples=rows, resolution_j=None, warnings=warnings)
