"""edgeship: take a fine-tuned PyTorch / Hugging Face model to edge devices, and prove how it runs there.

The export side (``edgeship.export()``, in ``edgeship.pipeline``) needs the ``[export]`` extra (torch and the
converters); it is imported lazily so that the device side (``edgeship.profile``,
bundles, target profiles) works with numpy + onnxruntime/LiteRT only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgeship.errors import EdgeshipError
from edgeship.manifest import ArtifactRecord, Bundle, Fidelity, Manifest, load_bundle
from edgeship.spec import TensorSpec

__version__ = "0.1.0"

if TYPE_CHECKING:
    from edgeship.llm import export_llm
    from edgeship.pipeline import ExportResult, export
    from edgeship.profiling.llm.bench import profile_llm
    from edgeship.profiling.results import ProfileResult
    from edgeship.profiling.runner import profile

__all__ = [
    "ArtifactRecord",
    "Bundle",
    "EdgeshipError",
    "ExportResult",
    "Fidelity",
    "Manifest",
    "ProfileResult",
    "TensorSpec",
    "__version__",
    "export",
    "export_llm",
    "load_bundle",
    "profile",
    "profile_llm",
]

_LAZY = {
    "export": "edgeship.pipeline",
    "ExportResult": "edgeship.pipeline",
    "profile": "edgeship.profiling.runner",
    "ProfileResult": "edgeship.profiling.results",
    "export_llm": "edgeship.llm",
    "profile_llm": "edgeship.profiling.llm.bench",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgeship' has no attribute {name!r}")
