"""The exporter protocol, its registry, and the support matrix every exporter declares.

An exporter turns a :class:`~edgeship.models.LoadedModel` into one artifact file for
one recipe. The core (``edgeship.pipeline.export``) does everything else: stages and timing,
fidelity against PyTorch, the manifest and the atomic bundle. Adding a format means
adding one module with a class decorated by ``@register`` and listing the module in
``edgeship.exporters.BUILTIN`` (or an ``edgeship.exporters`` entry point).
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from edgeship.errors import EdgeshipError, ExportError, RuntimeMissingError
from edgeship.manifest import Fidelity
from edgeship.registry import Registry

if TYPE_CHECKING:
    from edgeship.models import LoadedModel
    from edgeship.targets import TargetProfile

RECIPES = ("fp32", "fp16", "int8-dynamic", "int8-static", "int4-weight", "npu")


@dataclass(frozen=True)
class RecipeSupport:
    recipe: str
    how: str  # one line: what this format does for the recipe
    needs_calibration: bool = False


@dataclass
class ExportOutput:
    """What one exporter call produced (the core adds checksum, size, time and fidelity)."""

    path: Path
    runtime: dict[str, Any]
    quantization: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class ExportContext:
    """Everything an exporter may use, handed in by the core."""

    model: LoadedModel
    target: TargetProfile
    workdir: Path
    calibration: list[dict[str, np.ndarray]]
    calibration_source: str
    heldout: list[dict[str, np.ndarray]]
    reference: list[dict[str, np.ndarray]]
    evaluate: Callable[[Path, str, Mapping[str, Any]], Fidelity]  # (file, format, runtime options) -> fidelity
    options: dict[str, Any] = field(default_factory=dict)
    log: Callable[[str], None] = print
    stages: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str, fmt: str, recipe: str) -> Iterator[None]:
        """Time a named stage; re-raise failures as ExportError naming the format, recipe and stage."""
        self.log(f"[{fmt}/{recipe}] {name}...")
        t0 = time.perf_counter()
        try:
            yield
        except EdgeshipError:
            raise
        except Exception as e:
            capture = explain_capture_failure(e)
            if capture:
                raise ExportError(f"{fmt}/{recipe}: stage '{name}' failed: {capture}") from e
            tb = traceback.extract_tb(e.__traceback__)
            where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ExportError(f"{fmt}/{recipe}: stage '{name}' failed: {type(e).__name__}: {first[:400]}{where}") from e
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - t0

    def floor(self, recipe: str) -> float:
        return self.target.min_mean_cosine(recipe)


_USER_FRAME = re.compile(r'The following call raised this error:\s*\n\s*File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')


def padding_advice(lm: Any, *, trims: bool = False, static_length: int | None = None) -> dict[str, Any] | None:
    """How an app should pad token inputs for one artifact (``runtime.input_padding`` in the manifest).

    The bundle's tokenizer settings pad to ``max_length`` (that suits every artifact), but on a
    dynamic-shape artifact each padded position is computed: a 14-token sentence padded to 128 ran
    ~5x slower than unpadded on ``.pte``. None for models without a sequence dim.
    """
    if not any("sequence" in s.shape for s in lm.inputs):
        return None
    if static_length is not None:
        return {"mode": "max_length", "length": int(static_length),
                "why": "static shape: every input must be padded to exactly this length"}
    if trims:
        return {"mode": "any", "why": "the graph slices trailing padding off itself; padding to max_length costs nothing"}
    return {"mode": "longest", "why": "dynamic sequence: pad a batch only to its longest row; every padded "
                                      "position is computed"}


def explain_capture_failure(exc: BaseException) -> str | None:
    """A one-line diagnosis when torch.export could not capture the model, naming the user's code.

    torch.export (used by every exporter here) cannot follow Python control flow that
    depends on tensor *values*; its error buries the location in a long report.
    """
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = "\n".join(str(c) for c in chain)
    data_dep = any(type(c).__name__ in ("GuardOnDataDependentSymNode", "UserError") for c in chain) or \
        "data-dependent" in text
    if not data_dep:
        return None
    m = _USER_FRAME.search(text)
    where = f" at {m.group(1)}:{m.group(2)} in {m.group(3)}() `{m.group(4).strip()}`" if m else ""
    return (f"torch.export cannot capture data-dependent control flow{where}: the branch depends on a tensor value. "
            "Rewrite it with torch.where / torch.cond, or make it depend on shapes only")


class Exporter(ABC):
    format: ClassVar[str]
    suffix: ClassVar[str]
    support: ClassVar[tuple[RecipeSupport, ...]]
    extra: ClassVar[str] = "export"  # pip extra that brings this exporter's dependencies
    requires: ClassVar[tuple[str, ...]] = ()  # top-level modules this exporter imports (lazily)

    @classmethod
    def recipes(cls) -> tuple[str, ...]:
        return tuple(s.recipe for s in cls.support)

    @classmethod
    def supports(cls, recipe: str) -> RecipeSupport | None:
        return next((s for s in cls.support if s.recipe == recipe), None)

    @classmethod
    def check_environment(cls) -> None:
        """Raise RuntimeMissingError naming the pip extra when a dependency is missing.

        ``find_spec`` looks the modules up without importing them (executorch alone takes seconds).
        """
        missing = [m for m in cls.requires if importlib.util.find_spec(m) is None]
        if missing:
            raise RuntimeMissingError(f"the {cls.format} exporter needs {', '.join(missing)}: "
                                      f"pip install 'edgeship[{cls.extra}]'")

    @abstractmethod
    def export(self, ctx: ExportContext, recipe: str, out: Path) -> ExportOutput:
        """Write the artifact for ``recipe`` to ``out``."""


EXPORTERS: Registry[type[Exporter]] = Registry("format")
register = EXPORTERS.register


def support_matrix(formats: Sequence[str] | None = None) -> list[tuple[str, str, str]]:
    """(format, recipe, how) rows for docs, ``edgeship formats`` and tests: one source of truth."""
    from edgeship.exporters import load_builtin

    load_builtin()
    rows = []
    for fmt in formats or EXPORTERS.keys():
        for s in EXPORTERS.get(fmt).support:
            rows.append((fmt, s.recipe, s.how))
    return rows
