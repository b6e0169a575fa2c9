"""Energy meters, one module per sensor family, all registered in :data:`METERS`.

Importing this package registers every meter (each module's ``@METERS.register``); ``edgeship.profiling.energy``
imports it explicitly for that reason. :data:`AUTO_ORDER` is the preference of ``--energy auto``.
"""

from __future__ import annotations

from edgeship.profiling.meters.android import AndroidBatteryMeter, AndroidOdpmMeter
from edgeship.profiling.meters.base import (
           METERS,
           Availability,
           EnergyWindow,
           Meter,
           MeterContext,
           PolledMeter,
           Sampler,
           SysRoot,
           counter_delta,
           counter_joules,
           integrate_trapezoid,
           run_command,
)
from edgeship.profiling.meters.csvlog import CsvMeter
from edgeship.profiling.meters.estimate import EstimateMeter
from edgeship.profiling.meters.hwmon import HwmonMeter
from edgeship.profiling.meters.jetson import JetsonMeter
from edgeship.profiling.meters.rapl import RaplMeter
from edgeship.profiling.meters.rpi import Rpi5PmicMeter

# An external wall meter the user set up sees the most; then whole-board sensors; then sensors that see
# only part of the machine (RAPL: CPU package and DRAM); the battery gauge last (slow, and invalid on USB).
AUTO_ORDER: tuple[str, ...] = ("csv", "jetson", "rpi5-pmic", "android-odpm", "hwmon", "rapl", "android-battery")

__all__ = ["AUTO_ORDER", "METERS", "AndroidBatteryMeter", "AndroidOdpmMeter", "Availability", "CsvMeter",
           "EnergyWindow", "EstimateMeter", "HwmonMeter", "JetsonMeter", "Meter", "MeterContext", "PolledMeter",
           "RaplMeter", "Rpi5PmicMeter", "Sampler", "SysRoot", "counter_delta", "counter_joules",
           "integrate_trapezoid", "run_command"]
