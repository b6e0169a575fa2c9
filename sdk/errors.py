"""The edgeship exception tree.

Every error a user can cause is an :class:`EdgeshipError`; the CLI prints its
message on one line and exits non-zero (a traceback only with ``--debug``).
Messages say what went wrong, where, and how to fix it.

::

    EdgeshipError
    ├── UnknownKeyError          unknown target / format / recipe / meter / scheme
    ├── ConfigError              bad option values, bad profile files, bad inventories
    ├── ModelLoadError           model dir missing, broken config or weights, bad factory
    ├── CalibrationError         calibration file missing, empty, wrong modality
    ├── ExportError              a stage of an export failed
    │   ├── UnsupportedRecipeError   recipe not offered by that format
    │   └── FidelityError            artifact below the profile's fidelity floor
    ├── BundleError              bundle missing, incomplete or unreadable
    │   ├── SchemaVersionError       manifest written by an incompatible version
    │   ├── ChecksumError            artifact does not match its recorded sha256
    │   └── SignatureError           unsigned where a key is required, wrong key, or signed files changed
    ├── ArtifactLoadError        corrupt / truncated model file, or no runtime for it
    │   └── RuntimeMissingError      runtime package not installed (names the pip extra)
    ├── InputError               wrong input name, shape or dtype
    ├── OutputExistsError        output directory exists and --overwrite was not given
    ├── MeterError               an energy meter cannot be used
    └── DeviceError              remote device unreachable, refused, or unsuitable
"""

from __future__ import annotations

from collections.abc import Iterable


class EdgeshipError(Exception):
    """Base class of every error edgeship raises on purpose."""


class UnknownKeyError(EdgeshipError, KeyError):
    """A name that is not in a registry. The message lists valid names and the closest one."""

    def __init__(self, kind: str, key: str, valid: Iterable[str]) -> None:
        self.kind = kind
        self.key = key
        self.valid = sorted(valid)
        import difflib

        close = difflib.get_close_matches(key, self.valid, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        super().__init__(f"unknown {kind} '{key}'.{hint} Valid: {', '.join(self.valid) or '(none)'}")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ConfigError(EdgeshipError, ValueError):
    pass


class ModelLoadError(EdgeshipError):
    pass


class CalibrationError(EdgeshipError):
    pass


class ExportError(EdgeshipError):
    pass


class UnsupportedRecipeError(ExportError):
    pass


class FidelityError(ExportError):
    pass


class BundleError(EdgeshipError):
    pass


class SchemaVersionError(BundleError):
    pass


class ChecksumError(BundleError):
    pass


class SignatureError(BundleError):
    pass


class ArtifactLoadError(EdgeshipError):
    pass


class RuntimeMissingError(ArtifactLoadError):
    pass


class InputError(EdgeshipError, ValueError):
    pass


class OutputExistsError(EdgeshipError):
    pass


class MeterError(EdgeshipError):
    pass


class DeviceError(EdgeshipError):
    pass
