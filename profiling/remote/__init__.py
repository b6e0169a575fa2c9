"""Profile on devices reached over the network (``ssh://`` today), one, a whole fleet, or a labgrid farm.

The host prepares everything (bundle, runtime wheels for the device's platform), so a device
needs only Python >= 3.11 and an SSH server. Only the standard library and paramiko are used on
the host side; the device side (:mod:`.agent`) is the ordinary torch-free runner.
"""

from edgeship.profiling.remote.farm import profile_farm
from edgeship.profiling.remote.fleet import DeviceEntry, FleetProgress, load_inventory, profile_fleet
from edgeship.profiling.remote.runtime import RUNTIMES, DeviceRuntime
from edgeship.profiling.remote.ssh import SshOptions
from edgeship.profiling.remote.transport import (
           TRANSPORTS,
           DeviceURL,
           Transport,
           TransportOptions,
           options_for,
           transport_for,
)

ConnectOptions = SshOptions  # the name before options were per scheme

__all__ = ["RUNTIMES", "TRANSPORTS", "ConnectOptions", "DeviceEntry", "DeviceRuntime", "DeviceURL", "FleetProgress",
           "SshOptions", "Transport", "TransportOptions", "load_inventory", "options_for", "profile_farm",
           "profile_fleet", "transport_for"]
