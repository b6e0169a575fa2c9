"""Profile on devices reached over the network (``ssh://`` today), one or a whole fleet.

The host prepares everything (bundle, runtime wheels for the device's platform), so a device
needs only Python >= 3.11 and an SSH server. Only the standard library and paramiko are used on
the host side; the device side (:mod:`.agent`) is the ordinary torch-free runner.
"""

from edgeship.profiling.remote.fleet import DeviceEntry, FleetProgress, load_inventory, profile_fleet
from edgeship.profiling.remote.transport import (
           TRANSPORTS,
           ConnectOptions,
           DeviceURL,
           Transport,
           transport_for,
)

__all__ = ["TRANSPORTS", "ConnectOptions", "DeviceEntry", "DeviceURL", "FleetProgress", "Transport",
           "load_inventory", "profile_fleet", "transport_for"]
