"""Format exporters. Each module registers one :class:`~edgeship.exporters.base.Exporter`.

Built-in modules are imported by :func:`load_builtin` (explicitly, when the registry is
first needed) and third-party formats through the ``edgeship.exporters`` entry-point group.
"""

from __future__ import annotations

import importlib
from importlib import metadata

from edgeship.exporters.base import EXPORTERS, ExportContext, Exporter, ExportOutput, RecipeSupport, register

BUILTIN = ("edgeship.exporters.onnx", "edgeship.exporters.tflite", "edgeship.exporters.pte")

__all__ = ["BUILTIN", "EXPORTERS", "ExportContext", "ExportOutput", "Exporter", "RecipeSupport", "load_builtin",
           "register", "support_matrix"]


def load_builtin() -> None:
    for mod in BUILTIN:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:  # the module itself is not there (yet): skip; a missing dependency is not skipped
                continue
            raise
    for ep in metadata.entry_points(group="edgeship.exporters"):
        ep.load()


def support_matrix() -> list[tuple[str, str, str]]:
    """(format, recipe, how) rows for docs, ``edgeship formats`` and tests: one source of truth."""
    load_builtin()
    return [(fmt, s.recipe, s.how) for fmt in EXPORTERS.keys() for s in EXPORTERS.get(fmt).support]
