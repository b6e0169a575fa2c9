"""What every energy meter shares: the Meter protocol, sysfs/command access, the sampler thread, the arithmetic.

A meter reads one of two kinds of sensor:

* **power** (W right now): sampled on a background thread at ``sample_hz`` and integrated with the
  trapezoid rule;
* **counter** (cumulative µJ): read at start and stop, and polled in between at the same rate so a
  counter that wraps more than once during a long run is still counted.

All reads go through :class:`SysRoot` (a root directory standing for ``/``) and a command runner, so a
test points a meter at a fixture tree and a recorded ``vcgencmd`` output instead of a device.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeship.errors import ConfigError, MeterError
from edgeship.registry import Registry

CommandRunner = Callable[[Sequence[str]], str]

# A counter step larger than this is a reset, not a wrap: even a two-socket server package stays far below.
MAX_PLAUSIBLE_W = 2000.0
# A sampled meter needs this many readings in a window before its integral means anything.
MIN_SAMPLES = 10
UJ_PER_J = 1_000_000


_CHILD_CPU = threading.local()  # CPU seconds of the commands this thread ran (the sampler's vcgencmd calls)


def child_cpu_s() -> float:
    """CPU time of the device tools run by :func:`run_command` from the calling thread so far."""
    return float(getattr(_CHILD_CPU, "seconds", 0.0))


def run_command(argv: Sequence[str]) -> str:
    """Run a device tool (``vcgencmd``) and return its stdout; every failure is a :class:`MeterError`.

    The child is reaped with ``wait4`` so its own CPU time is known and can be charged to the sampler.
    """
    import subprocess  # here: the worker's peak RSS counts every module it imports (~0.7 MB for this one)

    try:
        proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        raise MeterError(f"`{argv[0]}` not found on PATH") from None
    except OSError as e:
        raise MeterError(f"`{' '.join(argv)}` failed: {e}") from None
    timer = threading.Timer(10.0, proc.kill)  # a hung firmware call must not hang the run
    timer.start()
    try:
        out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
    proc.returncode = os.waitstatus_to_exitcode(status)
    _CHILD_CPU.seconds = child_cpu_s() + usage.ru_utime + usage.ru_stime
    if proc.returncode != 0:
        raise MeterError(f"`{' '.join(argv)}` exited with code {proc.returncode}: {err.strip()[:200]}")
    return out


class SysRoot:
    """Read-only view of sysfs under ``root`` (``/`` on a device, a fixture tree in tests)."""

    def __init__(self, root: str | Path = "/") -> None:
        self.root = Path(root)

    def path(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    def glob(self, pattern: str) -> list[Path]:
        return sorted(self.root.glob(pattern.lstrip("/")))

    def read_text(self, p: Path) -> str:
        try:
            return p.read_text()
        except PermissionError:
            raise MeterError(f"{p}: permission denied; run as root or make the file readable") from None
        except FileNotFoundError:
            raise MeterError(f"{p}: missing (the sensor or its driver is not present)") from None
        except OSError as e:
            raise MeterError(f"{p}: unreadable ({e.strerror or e})") from None

    def read_int(self, p: Path, *, signed: bool = False) -> int:
        text = self.read_text(p).strip()
        try:
            value = int(text)
        except ValueError:
            raise MeterError(f"{p}: expected an integer, got {text[:40]!r}") from None
        if value < 0 and not signed:
            raise MeterError(f"{p}: negative value {value} from a sensor that cannot be negative")
        return value


@dataclass(frozen=True)
class MeterContext:
    """Where a meter reads from and how often; the worker builds one from the RunConfig."""

    root: Path = Path("/")
    run: CommandRunner = run_command
    sample_hz: float = 10.0
    csv_path: str | None = None
    profile: Any = None  # the TargetProfile whose power model / PMIC calibration applies, or None

    def __post_init__(self) -> None:
        if not self.sample_hz > 0:
            raise ConfigError(f"--sample-hz must be > 0, got {self.sample_hz}")

    @property
    def sys(self) -> SysRoot:
        return SysRoot(self.root)


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
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def watts(self) -> float | None:
        return self.joules / self.seconds if self.seconds > 0 else None


class Meter(ABC):
    name: str = ""
    estimated: bool = False

    def __init__(self, ctx: MeterContext | None = None) -> None:
        self.ctx = ctx or MeterContext()

    @abstractmethod
    def available(self) -> Availability: ...

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def stop(self) -> EnergyWindow: ...

    def min_window_s(self) -> float:
        """Shortest window this meter resolves; the worker runs at least this long."""
        return 0.0


METERS: Registry[type[Meter]] = Registry("energy meter")


def integrate_trapezoid(points: Sequence[tuple[float, float]]) -> float:
    """∫P dt over (seconds, watts) readings, trapezoid rule."""
    return sum((p0 + p1) / 2 * (t1 - t0) for (t0, p0), (t1, p1) in itertools.pairwise(points))


def counter_delta(prev: int, cur: int, wrap: int | None, dt_s: float, where: str) -> int:
    """Counter increase from ``prev`` to ``cur`` (same units), one wrap allowed between two reads."""
    if cur >= prev:
        return cur - prev
    if wrap is None:
        raise MeterError(f"{where}: counter went backwards ({prev} -> {cur}) and has no wrap range: "
                         "it was reset or the sensor is broken")
    d = cur + wrap - prev
    if dt_s > 0 and d / UJ_PER_J / dt_s > MAX_PLAUSIBLE_W:
        raise MeterError(f"{where}: counter went backwards ({prev} -> {cur}); as a wrap it would mean "
                         f"{d / UJ_PER_J / dt_s:.0f} W, so it was reset, not wrapped")
    return d


class Sampler:
    """Calls ``read()`` at ``hz`` on a daemon thread; the first and last reads happen in start()/stop().

    The thread's own CPU time (``time.thread_time``) plus the CPU time of the tools it ran (``vcgencmd``)
    is the sampler cost reported with the result.
    """

    def __init__(self, read: Callable[[], Any], hz: float, clock: Callable[[], float] = time.perf_counter) -> None:
        self.read = read
        self.period = 1.0 / hz
        self.clock = clock
        self.readings: list[tuple[float, Any]] = []
        self.cpu_s = 0.0
        self.error: MeterError | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.readings = [(self.clock(), self.read())]  # a broken sensor fails here, before the run
        self._thread = threading.Thread(target=self._loop, name="edgeship-meter", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        cpu0 = time.thread_time() + child_cpu_s()
        due = self.readings[0][0] + self.period
        try:
            while not self._stop.wait(max(0.0, due - self.clock())):
                self.readings.append((self.clock(), self.read()))
                due = max(due + self.period, self.clock())  # never burst to catch up after a slow read
        except MeterError as e:
            self.error = e
        except Exception as e:  # a sensor returning something unexpected must not kill the run
            self.error = MeterError(f"sensor read failed: {type(e).__name__}: {e}")
        self.cpu_s = time.thread_time() + child_cpu_s() - cpu0

    def stop(self) -> list[tuple[float, Any]]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise self.error
        self.readings.append((self.clock(), self.read()))
        return self.readings


class PolledMeter(Meter):
    """A meter that reads either power (W) or cumulative µJ counters, polled by a :class:`Sampler`."""

    mode: str = "power"  # "power" or "counter"; a meter may set it when it probes the device
    resolution_w = 1e-3  # smallest power step the sensor reports (power mode)
    counter_min_window_s = 1.0  # counter mode: shortest window that spans enough counter updates

    def __init__(self, ctx: MeterContext | None = None) -> None:
        super().__init__(ctx)
        self._sampler: Sampler | None = None

    def read_power_w(self) -> float:
        raise NotImplementedError

    def read_counters_uj(self) -> tuple[int, ...]:
        raise NotImplementedError

    def wrap_ranges_uj(self) -> tuple[int | None, ...]:
        raise NotImplementedError

    def window_warnings(self) -> tuple[str, ...]:
        """Caveats of this meter that belong with every window (under-counts, charging...)."""
        return ()

    def prepare(self) -> None:
        """Probe the device before a window; raise MeterError when it cannot be measured."""
        ok = self.available()
        if not ok.ok:
            raise MeterError(f"{self.name}: {ok.reason}")

    def min_window_s(self) -> float:
        return MIN_SAMPLES / self.ctx.sample_hz if self.mode == "power" else self.counter_min_window_s

    def start(self) -> None:
        self.prepare()
        read = self.read_power_w if self.mode == "power" else self.read_counters_uj
        self._sampler = Sampler(read, self.ctx.sample_hz)
        self._sampler.start()

    def stop(self) -> EnergyWindow:
        if self._sampler is None:
            raise MeterError(f"{self.name}: stop() without start()")
        sampler, self._sampler = self._sampler, None
        readings = sampler.stop()
        seconds = readings[-1][0] - readings[0][0]
        if self.mode == "power":
            joules = integrate_trapezoid(readings)
            resolution = self.resolution_w / self.ctx.sample_hz
        else:
            joules = counter_joules(readings, self.wrap_ranges_uj(), self.name)
            resolution = 1 / UJ_PER_J
        warnings = list(self.window_warnings())
        if seconds < self.min_window_s():
            warnings.append(f"window of {seconds:.2f} s is shorter than the {self.min_window_s():.2f} s "
                            f"{self.name} needs to resolve energy; the figure is coarse")
        return EnergyWindow(joules=joules, seconds=seconds, samples=len(readings), resolution_j=resolution,
                            sampler_cpu_s=sampler.cpu_s, warnings=tuple(warnings))


def counter_joules(readings: Sequence[tuple[float, tuple[int, ...]]], wraps: Sequence[int | None],
                   where: str) -> float:
    """Sum of per-step increases of each counter (µJ), wraps handled, in joules."""
    total = 0
    for (t0, c0), (t1, c1) in itertools.pairwise(readings):
        if len(c0) != len(c1) or len(c1) != len(wraps):
            raise MeterError(f"{where}: the set of counters changed during the run ({len(c0)} -> {len(c1)})")
        total += sum(counter_delta(a, b, w, t1 - t0, where) for a, b, w in zip(c0, c1, wraps, strict=True))
    return total / UJ_PER_J
