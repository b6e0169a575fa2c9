"""Thermal / frequency telemetry and the Pi throttle flags against fixture trees and recorded vcgencmd output."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from edgeship.errors import MeterError
from edgeship.profiling.telemetry import Telemetry, decode_throttled

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "telemetry"
RPI5 = FIXTURES / "rpi5"


def replay(**outputs: list[str]) -> Callable[[Sequence[str]], str]:
    """``vcgencmd CMD`` answered from recorded outputs in order (the last one repeats)."""
    calls = {k: 0 for k in outputs}

    def run(argv: Sequence[str]) -> str:
        if argv[1] not in outputs:
            raise MeterError(f"`{argv[0]}` not found on PATH")
        i = calls[argv[1]]
        calls[argv[1]] = i + 1
        return outputs[argv[1]][min(i, len(outputs[argv[1]]) - 1)]

    return run


def pi_tree(tmp: Path) -> Path:
    shutil.copytree(RPI5 / "sys", tmp / "sys")
    return tmp


def test_decode_throttled_bits() -> None:
    d = decode_throttled((RPI5 / "get_throttled_0x50005.txt").read_text())
    assert d == {"raw": "0x50005", "now": ["under-voltage", "throttled"], "since_boot": ["under-voltage", "throttled"]}
    assert decode_throttled((RPI5 / "get_throttled_0x0.txt").read_text()) == {"raw": "0x0", "now": [],
                                                                               "since_boot": []}
    assert decode_throttled("throttled=0x80000\n")["since_boot"] == ["soft temperature limit"]
    with pytest.raises(MeterError, match="unexpected output"):
        decode_throttled("throttled=lots")


def test_pi_run_that_throttled(tmp_path: Path) -> None:
    root = pi_tree(tmp_path)
    clean, bad = (RPI5 / "get_throttled_0x0.txt").read_text(), (RPI5 / "get_throttled_0x50005.txt").read_text()
    tele = Telemetry(root, run=replay(get_throttled=[clean, bad]), period_s=60)
    tele.start()
    (root / "sys/class/thermal/thermal_zone0/temp").write_text("86100\n")
    (root / "sys/devices/system/cpu/cpu2/cpufreq/scaling_cur_freq").write_text("1500000\n")
    out = tele.stop()
    assert out["throttled"] is True and out["samples"] == 2
    assert out["pi_throttled"] == {"start": "0x0", "end": "0x50005", "seen_during_run": ["throttled", "under-voltage"],
                                   "newly_latched": ["throttled", "under-voltage"]}
    assert "cpu-thermal reached its passive trip point 85 C" in out["throttle_reasons"]
    assert out["temperature"]["cpu-thermal"] == {"start_c": 48.3, "max_c": 86.1, "end_c": 86.1, "passive_trip_c": 85.0}
    assert out["cpufreq"]["cpu2"] == {"min_khz": 1500000, "max_khz": 2400000, "hw_max_khz": 2400000}
    assert out["cpufreq"]["cpu0"]["min_khz"] == 2400000 and out["notes"] == []


def test_quiet_run_and_bad_sensors_do_not_fail(tmp_path: Path) -> None:
    root = pi_tree(tmp_path)
    tele = Telemetry(root, run=replay(get_throttled=[(RPI5 / "get_throttled_0x0.txt").read_text()]), period_s=0.02)
    tele.start()
    time.sleep(0.1)
    (root / "sys/class/thermal/thermal_zone0/temp").write_text("hot\n")
    (root / "sys/devices/system/cpu/cpu1/cpufreq/scaling_cur_freq").write_text("<unknown>\n")
    out = tele.stop()
    assert out["throttled"] is False and out["samples"] >= 3
    assert any("temp: expected an integer" in n for n in out["notes"])
    assert any("scaling_cur_freq: expected an integer, got '<unknown>'" in n for n in out["notes"])
    bare = Telemetry(tmp_path / "nothing", run=replay()).stop()
    assert bare["throttled"] is False and bare["cpufreq"] == {} and "not found on PATH" in bare["notes"][0]


def test_cooldown_waits_until_below_target(tmp_path: Path) -> None:
    root = pi_tree(tmp_path)
    temp = root / "sys/class/thermal/thermal_zone0/temp"
    temp.write_text("62000\n")
    now = [0.0]

    def sleep(s: float) -> None:  # the SoC cools 4 degrees per poll
        now[0] += s
        temp.write_text(f"{int(temp.read_text()) - 4000}\n")

    tele = Telemetry(root, run=replay(), clock=lambda: now[0], sleep=sleep)
    out = tele.wait_for_cooldown(50.0, poll_s=2.0)
    assert out == {"target_c": 50.0, "start_c": 62.0, "end_c": 46.0, "waited_s": 8.0, "reached": True}
    temp.write_text("62000\n")
    out = Telemetry(root, run=replay(), clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s)) \
        .wait_for_cooldown(50.0, timeout_s=5.0, poll_s=2.0)
    assert out["reached"] is False and "after 5 s; measured anyway" in out["note"]


def test_cooldown_via_vcgencmd_or_no_sensor(tmp_path: Path) -> None:
    measure = (RPI5 / "measure_temp.txt").read_text()
    out = Telemetry(tmp_path, run=replay(measure_temp=[measure])).wait_for_cooldown(60.0)
    assert out["reached"] is True and out["start_c"] == 48.3
    out = Telemetry(tmp_path, run=replay()).wait_for_cooldown(60.0)
    assert out["reached"] is False and "no temperature sensor" in out["note"]


def test_governor_is_recorded(tmp_path: Path) -> None:
    root = pi_tree(tmp_path)
    for cpu in range(4):
        (root / f"sys/devices/system/cpu/cpu{cpu}/cpufreq/scaling_governor").write_text(
            "performance\n" if cpu == 3 else "ondemand\n")
    tele = Telemetry(root, run=replay(get_throttled=[(RPI5 / "get_throttled_0x0.txt").read_text()]), period_s=60)
    tele.start()
    assert tele.stop()["governor"] == "ondemand, performance"
    assert Telemetry(tmp_path / "nothing", run=replay()).stop()["governor"] is None
