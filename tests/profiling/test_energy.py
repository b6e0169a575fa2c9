"""Energy arithmetic on synthetic traces with known integrals, the Recorder's idle/gross/net logic,
meter failures mid-run, and a real profile run on this machine."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from edgeship.errors import ConfigError, MeterError
from edgeship.profiling.energy import EnergyResult, Recorder
from edgeship.profiling.meters import (
    HwmonMeter,
    MeterContext,
    PolledMeter,
    Sampler,
    counter_delta,
    counter_joules,
    integrate_trapezoid,
)
from edgeship.profiling.meters.base import Availability
from edgeship.profiling.runner import profile
from edgeship.targets import get_profile

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "telemetry"
INA219 = "sys/devices/platform/soc/fe804000.i2c/i2c-1/1-0040/hwmon/hwmon2/power1_input"


def test_constant_power_integrates_exactly() -> None:
    trace = [(i * 0.25, 2.5) for i in range(17)]  # 2.5 W for 4 s
    assert integrate_trapezoid(trace) == 10.0
    ramp = [(0.0, 0.0), (2.0, 4.0)]  # 0 -> 4 W over 2 s
    assert integrate_trapezoid(ramp) == 4.0
    assert integrate_trapezoid([(0.0, 3.0)]) == 0.0


def test_counter_wraps_once_and_backwards_is_an_error() -> None:
    wrap = 65532610987  # max_energy_range_uj of an AMD EPYC 7543
    readings = [(0.0, (wrap - 4_000_000,)), (1.0, (wrap - 1_000_000,)), (2.0, (3_000_000,)), (3.0, (5_000_000,))]
    assert counter_joules(readings, (wrap,), "t") == 9.0  # 3 J, then 1 + 3 J across the wrap, then 2 J
    assert counter_delta(10, 15, None, 1.0, "t") == 5
    with pytest.raises(MeterError, match="backwards"):
        counter_delta(15, 10, None, 1.0, "t")
    with pytest.raises(MeterError, match="counters changed"):
        counter_joules([(0.0, (1, 2)), (1.0, (3,))], (None, None), "t")


def test_sampler_rate_and_its_own_cpu_cost() -> None:
    values = iter(range(10**6))
    s = Sampler(lambda: float(next(values)), hz=100)
    t0 = time.perf_counter()
    s.start()
    time.sleep(0.5)
    readings = s.stop()
    elapsed = time.perf_counter() - t0
    # A loaded 2-core box may lag any amount (the rate is a benchmark's business); what must hold is that the
    # sampler never bursts to catch up: the i-th timed read is never before its slot, so never more reads than time.
    assert 2 <= len(readings) <= elapsed * 100 + 2
    start = readings[0][0]
    assert all(t >= start + i * 0.01 - 1e-3 for i, (t, _) in enumerate(readings[:-1])), readings[:5]
    assert [v for _, v in readings] == sorted(v for _, v in readings)
    assert 0.0 <= s.cpu_s <= elapsed  # one thread's CPU time, measured, within its wall time
    with pytest.raises(ConfigError, match="--sample-hz"):
        MeterContext(sample_hz=0)


class StepMeter(PolledMeter):
    """A power meter whose reading the test sets (the Recorder logic under test, not a sensor)."""

    name = "step"
    watts = 1.0

    def available(self) -> Availability:
        return Availability(True, "test")

    def read_power_w(self) -> float:
        return self.watts


def test_recorder_idle_gross_net() -> None:
    m = StepMeter(MeterContext(sample_hz=200))
    rec = Recorder(m, "step: test", idle_seconds=0.2)
    StepMeter.watts = 1.0
    rec.start()  # idle window at 1 W, then the run window opens
    m.watts = 3.0
    time.sleep(0.6)
    m.watts = 1.0
    rec.stop()  # run window closes, idle window after
    r = rec.result(inferences=10)
    assert r.available and not r.estimated and r.source == "step" and r.idle_source == "measured"
    assert r.idle_watts == pytest.approx(1.0, abs=1e-9)
    # the run window's first and last readings are taken at 1 W: a few ms of mixing at each end
    assert r.avg_watts == pytest.approx(3.0, rel=0.1)
    assert r.joules_per_inference_gross == pytest.approx(3.0 * r.duration_s / 10, rel=0.1)
    assert r.joules_per_inference_net == pytest.approx(2.0 * r.duration_s / 10, rel=0.15)
    assert r.samples >= 20 and r.idle_samples >= 2 * 5 and r.sampler_cpu_fraction is not None
    assert rec.min_duration_s() == pytest.approx(10 / 200)
    assert json.loads(json.dumps(r.to_dict()))["joules_per_inference_net"] == r.joules_per_inference_net


def test_short_window_warns() -> None:
    m = StepMeter(MeterContext(sample_hz=2))  # needs 10 samples = 5 s
    m.start()
    w = m.stop()
    assert any("shorter than the 5.00 s" in x for x in w.warnings)


def test_meter_failing_mid_run_marks_energy_unavailable(tmp_path: Path) -> None:
    root = tmp_path / "hw"
    shutil.copytree(FIXTURES / "hwmon-ina219", root, symlinks=True)
    rec = Recorder(HwmonMeter(MeterContext(root=root, sample_hz=50)), "hwmon: ina219", idle_seconds=0.05)
    rec.start()
    (root / INA219).write_text("garbage\n")
    time.sleep(0.1)
    rec.stop()
    r = rec.result(5)
    assert not r.available and r.joules_per_inference_gross is None
    assert "measurement failed" in r.reason and "power1_input: expected an integer" in r.reason
    assert rec.min_duration_s() == 0.0


def test_recorder_real_hwmon_tree_constant_power(tmp_path: Path) -> None:
    root = tmp_path / "hw"
    shutil.copytree(FIXTURES / "hwmon-ina219", root, symlinks=True)
    rec = Recorder.create("hwmon", None, "", MeterContext(root=root, sample_hz=100), idle_seconds=0.05)
    rec.start()
    time.sleep(0.2)
    rec.stop()
    r = rec.result(4)
    assert r.available and r.avg_watts == pytest.approx(2.0896, rel=1e-9)
    assert r.joules_total == pytest.approx(2.0896 * r.duration_s, rel=1e-9)  # type: ignore[operator]
    assert r.joules_per_inference_net == pytest.approx(0.0, abs=1e-9) and r.resolution_j == pytest.approx(1e-8)


def test_estimate_is_labelled_and_off_is_unavailable() -> None:
    rec = Recorder.create("estimate", get_profile("x86-64-laptop"), "test")
    rec.start()
    sum(i * i for i in range(200_000))
    rec.stop()
    r = rec.result(2)
    assert r.estimated and r.source == "estimate" and r.idle_source == "power model"
    assert r.joules_per_inference_gross > r.joules_per_inference_net >= 0  # type: ignore[operator]
    off = Recorder.create("off", None, "").result(3)
    assert off == EnergyResult.unavailable("none", "energy measurement switched off (--energy off)")


def test_profile_on_this_machine_records_the_estimate_and_telemetry(tiny_onnx_bundle: Path) -> None:
    res = profile(tiny_onnx_bundle, artifact="onnx/int8-dynamic", runs=5, min_seconds=0.0, warmup=1,
                  progress=False, energy="auto", cooldown_to_c=200.0)
    (r,) = res.results
    assert r.ok, r.error
    e, tele = r.energy, r.telemetry
    assert e is not None and tele is not None
    if e.source == "estimate":  # a bare VM: no powercap, no hwmon power sensor
        assert e.estimated is True and "no real power meter found" in e.reason
        assert "rapl:" in e.reason and "hwmon:" in e.reason
    assert e.available and e.joules_per_inference_gross and e.joules_per_inference_gross > 0
    assert tele.throttled in (True, False) and tele.readings["samples"] >= 2 and "cooldown" in tele.readings


def test_csv_log_that_misses_the_run_still_completes(tiny_onnx_bundle: Path) -> None:
    res = profile(tiny_onnx_bundle, artifact="onnx/int8-dynamic", runs=3, min_seconds=0.0, warmup=0,
                  progress=False, energy="csv", idle_seconds=0.0,
                  energy_csv=str(FIXTURES / "csv/usb-meter-2026-04-27.csv"))
    (r,) = res.results
    assert r.ok and r.latency and r.latency.count >= 3 and r.energy is not None
    assert r.energy.available is False and "does not overlap the run" in r.energy.reason
    assert any("run extended" in w for w in r.warnings)  # 10 rows of a 10 Hz log = 1 s minimum
    assert r.measured_seconds and r.measured_seconds >= 1.0


def test_command_runner_charges_the_tools_cpu_to_the_calling_thread() -> None:
    from edgeship.profiling.meters.base import child_cpu_s, run_command

    before = child_cpu_s()
    text = run_command(["cat", str(FIXTURES / "rpi5/pmic_read_adc.txt")])
    assert text.startswith(" 3V7_WL_SW_A current(0)=0.00000000A") and child_cpu_s() > before
    with pytest.raises(MeterError, match="exited with code 1"):
        run_command(["false"])
    with pytest.raises(MeterError, match="not found on PATH"):
        run_command(["edgeship-no-such-tool"])


def test_report_shows_gross_net_watts_and_source() -> None:
    from edgeship.profiling import report
    from edgeship.profiling.results import ProfileResult

    e = EnergyResult(source="rpi5-pmic", estimated=False, reason="rpi5-pmic: Pi 5 PMIC ADC", available=True,
                     joules_per_inference_gross=0.012, joules_per_inference_net=0.004, avg_watts=6.1, idle_watts=4.1,
                     idle_source="measured", samples=41).to_dict()
    run = {"device": {}, "results": [{"artifact": "onnx/fp32", "status": "ok", "energy": e,
                                      "telemetry": {"throttled": True}}]}
    text = report.render(ProfileResult.from_dict(run))
    assert "4.00" in text.splitlines()[3] and "THROTTLED" in text and "energy: rpi5-pmic -" in text
    assert "onnx/fp32: gross 12.00 mJ, net 4.00 mJ, 6.10 W avg (idle 4.10 W, measured), 41 samples" in text


def test_meters_and_telemetry_import_without_torch() -> None:
    import subprocess
    import sys

    code = ("import sys\nfor n in ('torch', 'transformers', 'executorch'): sys.modules[n] = None\n"
            "import edgeship.profiling.energy, edgeship.profiling.telemetry, edgeship.profiling.meters\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_energy_options_are_config_errors() -> None:
    from edgeship.profiling.runner import RunConfig

    with pytest.raises(ConfigError, match="--sample-hz 0"):
        RunConfig(sample_hz=0)
    with pytest.raises(ConfigError, match="--idle-seconds -1"):
        RunConfig(idle_seconds=-1)


def test_worker_with_a_real_meter_tree_extends_the_run_and_measures_idle(
        tiny_onnx_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole worker path in-process, with sysfs and vcgencmd pointed at fixture trees (INA219 + Pi throttling)."""
    import functools

    from edgeship.profiling import energy, telemetry, worker

    root = tmp_path / "dev"
    shutil.copytree(FIXTURES / "hwmon-ina219", root, symlinks=True)
    shutil.copytree(FIXTURES / "rpi5/sys", root / "sys", dirs_exist_ok=True)
    throttled = iter([(FIXTURES / f"rpi5/get_throttled_{v}.txt").read_text() for v in ("0x0", "0x50005")])

    def vcgencmd(argv: object) -> str:
        return next(throttled, (FIXTURES / "rpi5/get_throttled_0x50005.txt").read_text())

    monkeypatch.setattr(worker.energy, "MeterContext", functools.partial(energy.MeterContext, root=root))
    monkeypatch.setattr(worker.telemetry, "Telemetry", functools.partial(telemetry.Telemetry, root, run=vcgencmd))
    res = profile(tiny_onnx_bundle, artifact="onnx/int8-dynamic", runs=2, min_seconds=0.0, warmup=0, progress=False,
                  energy="auto", idle_seconds=0.2, sample_hz=20, isolate=False)
    (r,) = res.results
    assert r.ok, r.error
    e = r.to_dict()["energy"]
    assert e["source"] == "hwmon" and e["estimated"] is False and e["idle_source"] == "measured"
    assert e["avg_watts"] == pytest.approx(2.0896, rel=1e-9) and e["idle_watts"] == pytest.approx(2.0896, rel=1e-9)
    assert e["joules_per_inference_gross"] == pytest.approx(2.0896 * e["duration_s"] / e["inferences"], rel=1e-9)
    assert e["samples"] >= 5 and e["idle_samples"] >= 4 and e["sampler_cpu_s"] >= 0  # ~11 and ~10 unloaded
    assert r.measured_seconds and r.measured_seconds >= 0.5 and any("run extended to 0.50 s" in w for w in r.warnings)
    tele = r.to_dict()["telemetry"]
    assert tele["throttled"] is True and tele["pi_throttled"]["end"] == "0x50005"
    assert tele["cpufreq"]["cpu0"]["hw_max_khz"] == 2400000


@pytest.mark.parametrize(("board", "bundle_target", "expect"), [
    ("Raspberry Pi 5 Model B Rev 1.0", None, "raspberry-pi-5"),
    ("Raspberry Pi 4 Model B Rev 1.4", "raspberry-pi-5", "raspberry-pi-4"),  # the board it runs on wins
    ("NVIDIA Jetson Orin Nano Developer Kit", None, "jetson-orin-nano"),
    ("Raspberry Pi 500 Rev 1.0", "pixel-8", "pixel-8"),  # not a Pi 5: the bundle's aarch64 target
    (None, None, None),  # an aarch64 board nobody recognises: no phone power model for it
])
def test_power_model_follows_the_detected_board(board: str | None, bundle_target: str | None,
                                                expect: str | None) -> None:
    from edgeship.profiling.energy import power_model_profile

    prof, why = power_model_profile(None, bundle_target, "aarch64", board)
    assert (prof.name if prof else None) == expect, why
    if expect is None:
        assert "pass --target with one of" in why and "raspberry-pi-5" in why
    x86, why = power_model_profile(None, "raspberry-pi-5", "x86_64", None)
    assert x86.name == "x86-64-laptop" and why.startswith("the only built-in x86_64 profile")


def test_board_model_reads_the_device_tree(tmp_path: Path) -> None:
    from edgeship.profiling.sysinfo import board_model

    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"Raspberry Pi 5 Model B Rev 1.0\0")  # NUL-terminated
    assert board_model(tmp_path) == "Raspberry Pi 5 Model B Rev 1.0"
