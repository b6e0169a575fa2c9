"""Each energy meter against fixture trees built from the real sysfs layouts and tool outputs
(tests/fixtures/telemetry, formats from shared/reference/telemetry-formats.md), and each bad input."""

from __future__ import annotations

import pathlib
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from edgeship.errors import MeterError, UnknownKeyError
from edgeship.profiling.energy import Recorder
from edgeship.profiling.meters import (
    AUTO_ORDER,
    METERS,
    AndroidBatteryMeter,
    AndroidOdpmMeter,
    CsvMeter,
    HwmonMeter,
    JetsonMeter,
    MeterContext,
    RaplMeter,
    Rpi5PmicMeter,
)
from edgeship.profiling.meters.csvlog import read_power_log, window_energy
from edgeship.profiling.meters.rpi import parse_pmic_adc
from edgeship.targets import get_profile

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "telemetry"
# A sampling rate so low that the sampler thread never fires: only the start() and stop() reads happen,
# so a test controls exactly what each window sees.
ENDPOINTS_ONLY = 1e-4


def tree(name: str, tmp: Path) -> Path:
    out = tmp / name
    shutil.copytree(FIXTURES / name, out, symlinks=True)
    return out


def vcgencmd(**outputs: str) -> Callable[[Sequence[str]], str]:
    def run(argv: Sequence[str]) -> str:
        if argv[1] not in outputs:
            raise MeterError(f"`{argv[0]}` not found on PATH")
        return outputs[argv[1]]

    return run


def window(meter: object, between: Callable[[], object]) -> object:
    meter.start()  # type: ignore[attr-defined]
    between()
    return meter.stop()  # type: ignore[attr-defined]


def test_every_meter_is_registered_and_auto_order_names_real_meters() -> None:
    assert set(METERS) == {"rapl", "hwmon", "rpi5-pmic", "jetson", "android-battery", "android-odpm", "csv", "estimate"}
    assert set(AUTO_ORDER) == set(METERS) - {"estimate"}
    with pytest.raises(UnknownKeyError, match="Did you mean 'rapl'"):
        Recorder.create("rappl", None, "")


# -- RAPL ----------------------------------------------------------------------------------------------

def test_rapl_sums_package_and_dram_only(tmp_path: Path) -> None:
    root = tree("rapl", tmp_path)
    m = RaplMeter(MeterContext(root=root, sample_hz=ENDPOINTS_ONLY))
    ok = m.available()
    # core/uncore are inside the package, psys contains it, the mmio zone repeats package-0
    assert ok.ok and [z[0] for z in m.zones] == ["package-0", "dram"], ok.reason
    pkg = root / "sys/class/powercap/intel-rapl:0/energy_uj"
    dram = root / "sys/class/powercap/intel-rapl:0:2/energy_uj"
    p0, d0 = int(pkg.read_text()), int(dram.read_text())

    def work() -> None:
        pkg.write_text(f"{p0 + 2_500_000}\n")
        dram.write_text(f"{d0 + 500_000}\n")

    w = window(m, work)
    assert w.joules == 3.0 and w.samples == 2 and w.resolution_j == 1e-6  # type: ignore[attr-defined]


def test_rapl_counter_wraps_once(tmp_path: Path) -> None:
    root = tree("rapl", tmp_path)
    pkg = root / "sys/class/powercap/intel-rapl:0/energy_uj"
    pkg.write_text(f"{262143328850 - 1_000_000}\n")
    m = RaplMeter(MeterContext(root=root, sample_hz=ENDPOINTS_ONLY))
    assert m.available().ok

    def work() -> None:
        time.sleep(0.02)  # 2.5 J in 20 ms is 125 W: a plausible wrap (the same step in 1 ms would not be)
        pkg.write_text("1500000\n")

    w = window(m, work)
    assert w.joules == 2.5  # type: ignore[attr-defined]  # 1 J up to the top of the range + 1.5 J after the wrap


def test_rapl_counter_reset_is_not_a_wrap(tmp_path: Path) -> None:
    root = tree("rapl", tmp_path)
    pkg = root / "sys/class/powercap/intel-rapl:0/energy_uj"
    m = RaplMeter(MeterContext(root=root, sample_hz=ENDPOINTS_ONLY))
    assert m.available().ok
    m.start()
    pkg.write_text("1000\n")  # far below the start value: a wrap would mean thousands of kW
    with pytest.raises(MeterError, match="went backwards .* reset, not wrapped"):
        m.stop()


def test_rapl_root_only_missing_and_garbage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "no RAPL zones" in RaplMeter(MeterContext(root=tmp_path)).available().reason
    root = tree("rapl", tmp_path)
    real_read = pathlib.Path.read_text

    def root_only(self: Path, *a: object, **k: object) -> str:
        if self.name == "energy_uj":  # what Linux >= 5.10 does to a non-root reader
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(pathlib.Path, "read_text", root_only)
    why = RaplMeter(MeterContext(root=root)).available()
    assert not why.ok and "root-only since Linux 5.10" in why.reason and "sysfs.conf" in why.reason
    monkeypatch.undo()
    (root / "sys/class/powercap/intel-rapl:0/energy_uj").write_text("n/a\n")
    why = RaplMeter(MeterContext(root=root)).available()
    assert not why.ok and "expected an integer" in why.reason and "energy_uj" in why.reason


# -- hwmon ---------------------------------------------------------------------------------------------

def test_hwmon_ina219_power_then_v_times_i(tmp_path: Path) -> None:
    root = tree("hwmon-ina219", tmp_path)
    m = HwmonMeter(MeterContext(root=root))
    ok = m.available()
    assert ok.ok and "ina219" in ok.reason and m.mode == "power"
    assert m.read_power_w() == pytest.approx(2.0896, abs=1e-12)  # power1_input µW
    (root / "sys/devices/platform/soc/fe804000.i2c/i2c-1/1-0040/hwmon/hwmon2/power1_input").unlink()
    m = HwmonMeter(MeterContext(root=root))
    assert m.available().ok
    assert m.read_power_w() == pytest.approx(5.072 * 0.412, abs=1e-12)  # bus in1 (mV) x curr1 (mA); in0 is the shunt


def test_hwmon_energy_counter_and_backwards_without_wrap(tmp_path: Path) -> None:
    root = tree("hwmon-zenergy", tmp_path)
    m = HwmonMeter(MeterContext(root=root, sample_hz=ENDPOINTS_ONLY))
    assert m.available().ok and m.mode == "counter"
    e1 = root / "sys/class/hwmon/hwmon3/energy1_input"
    e2 = root / "sys/class/hwmon/hwmon3/energy2_input"
    v1, v2 = int(e1.read_text()), int(e2.read_text())

    def work() -> None:
        e1.write_text(f"{v1 + 4_000_000}\n")
        e2.write_text(f"{v2 + 1_250_000}\n")

    assert window(m, work).joules == 5.25  # type: ignore[attr-defined]
    m.start()
    e1.write_text(f"{v1}\n")
    with pytest.raises(MeterError, match="backwards .* no wrap range"):
        m.stop()


def test_hwmon_bad_values(tmp_path: Path) -> None:
    root = tree("hwmon-ina219", tmp_path)
    power = root / "sys/devices/platform/soc/fe804000.i2c/i2c-1/1-0040/hwmon/hwmon2/power1_input"
    power.write_text("-5\n")
    why = HwmonMeter(MeterContext(root=root)).available()
    assert not why.ok and "negative value -5" in why.reason
    power.write_text("\x00\x01garbage\n")
    assert "expected an integer" in HwmonMeter(MeterContext(root=root)).available().reason
    # the Jetson INA3221 is left to the jetson meter (its channels overlap VDD_IN)
    # a GPU's own power sensor is not the board's
    shutil.rmtree(root / "sys/devices/platform/soc/fe804000.i2c/i2c-1/1-0040/hwmon/hwmon2")
    why = HwmonMeter(MeterContext(root=root)).available()
    assert not why.ok and "skipped amdgpu" in why.reason
    jroot = tree("jetson-jp6", tmp_path)
    assert not HwmonMeter(MeterContext(root=jroot)).available().ok
    assert "no hwmon power" in HwmonMeter(MeterContext(root=tmp_path / "none")).available().reason


# -- Raspberry Pi 5 PMIC -------------------------------------------------------------------------------

PMIC = (FIXTURES / "rpi5/pmic_read_adc.txt").read_text()
# (A, V) of the 12 rails that print both lines in the recorded output; EXT5V_V and BATT_V have no current.
PMIC_RAILS = [(0.0, 3.799996), (0.06245952, 3.306322), (0.1610285, 1.798289), (0.00780744, 1.102929),
              (0.0, 0.6047613), (0.1756674, 1.104394), (0.3279125, 0.8025633), (10.87674, 0.8974594),
              (0.0003663, 3.304942), (0.00042735, 3.302194), (0.00579975, 0.7973619), (0.0136752, 5.07056)]
PMIC_W = sum(a * v for a, v in PMIC_RAILS)


def test_rpi5_pmic_recorded_output() -> None:
    rails = parse_pmic_adc(PMIC)
    assert len(rails) == 12 and "EXT5V" not in rails and "BATT" not in rails
    assert sum(rails.values()) == pytest.approx(PMIC_W, rel=1e-12)
    m = Rpi5PmicMeter(MeterContext(run=vcgencmd(pmic_read_adc=PMIC)))
    ok = m.available()
    assert ok.ok and "12 rails" in ok.reason and "under-counts" in ok.reason
    assert m.read_power_w() == pytest.approx(PMIC_W, rel=1e-12)
    assert "no calibration" in m.window_warnings()[0]


def test_rpi5_pmic_calibration_only_from_a_pi5_profile() -> None:
    pi5 = get_profile("raspberry-pi-5")
    m = Rpi5PmicMeter(MeterContext(run=vcgencmd(pmic_read_adc=PMIC), profile=pi5))
    scale, offset = pi5.power.calibration_scale, pi5.power.calibration_offset_w
    assert m.read_power_w() == pytest.approx(PMIC_W * scale + offset, rel=1e-12)
    assert f"x{scale:g} + {offset:g} W" in m.window_warnings()[0]
    other = Rpi5PmicMeter(MeterContext(run=vcgencmd(pmic_read_adc=PMIC), profile=get_profile("raspberry-pi-4")))
    assert other.calibration() is None


def test_rpi5_pmic_unsupported_board_and_garbage() -> None:
    unsupported = (FIXTURES / "rpi5/pmic_unsupported.txt").read_text()
    why = Rpi5PmicMeter(MeterContext(run=vcgencmd(pmic_read_adc=unsupported))).available()
    assert not why.ok and "Command not registered" in why.reason
    assert "not found on PATH" in Rpi5PmicMeter(MeterContext(run=vcgencmd())).available().reason
    with pytest.raises(MeterError, match="unexpected line"):
        parse_pmic_adc(PMIC.replace("VDD_CORE_A current(7)=10.87674000A", "VDD_CORE_A current(7)=-1A"))


# -- Jetson --------------------------------------------------------------------------------------------

def test_jetson_jetpack6_uses_vdd_in(tmp_path: Path) -> None:
    m = JetsonMeter(MeterContext(root=tree("jetson-jp6", tmp_path)))
    ok = m.available()
    assert ok.ok and "JetPack 5/6 hwmon" in ok.reason and "VDD_IN" in ok.reason
    assert m.read_power_w() == pytest.approx(5.064 * 1.308, rel=1e-12)


def test_jetson_agx_orin_sums_rails_without_shunt_sum(tmp_path: Path) -> None:
    m = JetsonMeter(MeterContext(root=tree("jetson-agx-orin", tmp_path)))
    ok = m.available()
    assert ok.ok and "sum of VDD_GPU_SOC, VDD_CPU_CV, VIN_SYS_5V0" in ok.reason
    assert m.read_power_w() == pytest.approx(5.056 * 1.101 + 5.056 * 0.398 + 5.048 * 0.502, rel=1e-12)


def test_jetson_jetpack4_iio(tmp_path: Path) -> None:
    root = tree("jetson-jp4", tmp_path)
    m = JetsonMeter(MeterContext(root=root))
    ok = m.available()
    assert ok.ok and "JetPack 4 IIO" in ok.reason and "POM_5V_IN" in ok.reason
    assert m.read_power_w() == 3.6
    (root / "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0/in_power0_input").write_text("lots\n")
    assert "expected an integer" in JetsonMeter(MeterContext(root=root)).available().reason
    assert "not a Jetson" in JetsonMeter(MeterContext(root=tmp_path / "none")).available().reason


# -- Android -------------------------------------------------------------------------------------------

def test_android_battery_units_and_sign(tmp_path: Path) -> None:
    root = tree("android-battery", tmp_path)
    bat = root / "sys/class/power_supply/battery"
    m = AndroidBatteryMeter(MeterContext(root=root))
    assert m.available().ok and m.window_warnings() == ()
    assert m.read_power_w() == pytest.approx(0.412 * 3.871, rel=1e-12)  # kernel ABI: µA negative, µV
    (bat / "current_now").write_text("412\n")  # Samsung: mA, positive while discharging
    (bat / "voltage_now").write_text("3871\n")
    assert m.read_power_w() == pytest.approx(0.412 * 3.871, rel=1e-12)
    (root / "sys/class/power_supply/usb/online").write_text("1\n")
    assert "charger" in m.window_warnings()[0] and "charger" in m.available().reason
    (bat / "voltage_now").write_text("-3871000\n")
    assert "negative value" in m.available().reason
    (bat / "voltage_now").write_text("42\n")
    assert "no Li-ion cell voltage" in m.available().reason
    (bat / "current_now").unlink()
    assert "missing" in m.available().reason


def test_android_odpm_counters(tmp_path: Path) -> None:
    root = tree("android-odpm", tmp_path)
    f = root / "sys/bus/iio/devices/iio:device0/energy_value"
    m = AndroidOdpmMeter(MeterContext(root=root, sample_hz=ENDPOINTS_ONLY))
    ok = m.available()
    assert ok.ok and "8 rails" in ok.reason
    text = f.read_text()
    grown = text.replace("t=349894", "t=351894").replace("T=349894", "T=351894") \
        .replace("5578756", "6578756").replace("46356942", "46856942")
    assert window(m, lambda: f.write_text(grown)).joules == 1.5  # type: ignore[attr-defined]
    m.start()
    f.write_text(text)  # counters back at their old values: a reset
    with pytest.raises(MeterError, match="backwards"):
        m.stop()
    f.write_text("CH0(T=1)[X], 5\n")
    assert "no 't=' first line" in AndroidOdpmMeter(MeterContext(root=root)).available().reason


# -- external USB meter CSV ----------------------------------------------------------------------------

def test_csv_log_aligned_to_the_run(tmp_path: Path) -> None:
    log = tmp_path / "meter.csv"
    now = time.time()
    rows = [f"{now - 5 + i * 0.05:.3f},2.5" for i in range(400)]  # 20 s of a constant 2.5 W, 20 Hz
    log.write_text("timestamp,watts\n" + "\n".join(rows) + "\n")
    m = CsvMeter(MeterContext(csv_path=str(log)))
    assert m.available().ok and m.min_window_s() == pytest.approx(0.5)
    m.start()
    time.sleep(0.3)
    w = m.stop()
    assert w.joules == pytest.approx(2.5 * w.seconds, rel=1e-9) and w.samples >= 4


def test_csv_known_integral_volts_amps_and_bad_logs(tmp_path: Path) -> None:
    log = tmp_path / "va.csv"
    log.write_text("Time,Voltage (V),Current (A)\n" + "".join(f"{1000 + i * 0.25},5.0,0.5\n" for i in range(17)))
    assert window_energy(read_power_log(log), 1000.0, 1004.0, "t") == (10.0, 15)  # 2.5 W x 4 s
    old = FIXTURES / "csv/usb-meter-2026-04-27.csv"
    assert len(read_power_log(old)) == 5
    with pytest.raises(MeterError, match="does not overlap the run"):
        window_energy(read_power_log(old), time.time() - 1, time.time(), "--energy-csv x")
    with pytest.raises(MeterError, match="covers only part"):
        window_energy(read_power_log(log), 1002.0, 1010.0, "t")
    (tmp_path / "h.csv").write_text("when,how much\n1,2\n")
    with pytest.raises(MeterError, match="needs a timestamp column"):
        read_power_log(tmp_path / "h.csv")
    (tmp_path / "n.csv").write_text("timestamp,watts\n1,-2\n")
    with pytest.raises(MeterError, match="line 2: power -2.0 W is negative"):
        read_power_log(tmp_path / "n.csv")
    assert "pass --energy-csv" in CsvMeter(MeterContext()).available().reason


# -- selection -----------------------------------------------------------------------------------------

def test_auto_prefers_real_meters_and_forced_unavailable_fails(tmp_path: Path) -> None:
    x86 = get_profile("x86-64-laptop")
    r = Recorder.create("auto", x86, "test", MeterContext(root=tree("rapl", tmp_path), run=vcgencmd()))
    assert r.meter is not None and r.meter.name == "rapl" and r.reason.startswith("rapl: RAPL counters")
    r = Recorder.create("auto", x86, "test", MeterContext(root=tree("jetson-jp6", tmp_path), run=vcgencmd()))
    assert r.meter is not None and r.meter.name == "jetson"
    r = Recorder.create("auto", x86, "test", MeterContext(root=tmp_path / "empty", run=vcgencmd()))
    assert r.meter is not None and r.meter.estimated and "no real power meter found" in r.reason
    assert "rapl: no RAPL zones" in r.reason
    log = tmp_path / "wall.csv"
    log.write_text("timestamp,watts\n" + "".join(f"{time.time() + i * 0.1:.2f},3.1\n" for i in range(5)))
    r = Recorder.create("auto", x86, "test", MeterContext(root=tree("rapl", tmp_path / "r2"), csv_path=str(log)))
    assert r.meter is not None and r.meter.name == "csv" and "external power meter log" in r.reason  # wall power wins
    with pytest.raises(MeterError, match="--energy jetson: meter not available here: no INA3221"):
        Recorder.create("jetson", x86, "test", MeterContext(root=tmp_path / "empty"))
