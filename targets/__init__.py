"""Target device profiles: data files under ``profiles/`` validated on load.

Nothing about a device is hard-coded elsewhere in edgeship; exporters and the
runner read everything they need (formats, recipes, threads, delegates, power
model, energy meter) from a :class:`TargetProfile`.
"""

from edgeship.targets.schema import (
    Accelerator,
    CoreCluster,
    DelegateRoute,
    LLMSettings,
    TargetProfile,
    get_profile,
    list_profiles,
    load_profile_file,
)

__all__ = [
    "Accelerator",
    "CoreCluster",
    "DelegateRoute",
    "LLMSettings",
    "TargetProfile",
    "get_profile",
    "list_profiles",
    "load_profile_file",
]
