"""The exporter protocol, its registry, and the support table every exporter declares.

An exporter turns a :class:`~edgeship.models.LoadedModel` into one artifact file for
one recipe. The core (``edgeship.pipeline.export``) does everything else: stages and timing
(:class:`Stage`, bound once per format and recipe in :class:`ExportContext`), fidelity against
PyTorch, the manifest and the atomic bundle; :func:`edgeship.exporters.sensitivity.keep_search`
is the one search for layers to keep in higher precision.

**Adding a format is one exporter module plus one backend module**: a class decorated by
``@register`` here (listed in ``edgeship.exporters.BUILTIN`` or an ``edgeship.exporters`` entry
point) and a runner backend (``edgeship.profiling.backends.register_backend`` or an
``edgeship.backends`` entry point); built-in formats also get a line in ``edgeship.vocab.FORMATS``.
``tests/exporters/test_core.py`` registers a toy format from the test file alone.
**Adding a recipe to a format is one row** of its ``support`` table: the row is the support
matrix (CLI, ``edgeship formats``, docs) and the dispatch (``row.make``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from edgeship.errors import EdgeshipError, ExportError, RuntimeMissingError, UnsupportedRecipeError
from edgeship.manifest import Fidelity
from edgeship.registry import Registry

if TYPE_CHECKING:
    from edgeship.models import LoadedModel
    from edgeship.targets import TargetProfile


@dataclass(frozen=True)
class RecipeSupport:
    """One row of an exporter's support table: the table is the support matrix *and* the dispatch.

    ``make`` is how the format makes the recipe; its signature is the format's own (each exporter calls its
    rows the same way), None where the base graph is the artifact (fp32). A format may subclass this to add
    per-recipe columns (ONNX: which base graph a recipe starts from).
    """

    recipe: str
    how: str  # one line: what this format does for the recipe
    needs_calibration: bool = False
    make: Callable[..., Any] | None = None


@dataclass
class ExportOutput:
    """What one exporter call produced (the core adds checksum, size, time and fidelity)."""

    path: Path
    runtime: dict[str, Any]
    quantization: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class Stage(StrEnum):
    """The named stages of one export, in pipeline order. Timed exclusively: a stage run inside another
    (quantize and validate inside search) counts only toward itself, so the manifest's times add up."""

    PREPARE = "prepare"  # rewrites of the model before anything else (an LLM's rotation, fused projections, cache)
    CAPTURE = "capture"
    CALIBRATE = "calibrate"
    SENSITIVITY = "sensitivity"
    SEARCH = "search"
    QUANTIZE = "quantize"
    LOWER = "lower"
    OPTIMIZE = "optimize"
    SERIALIZE = "serialize"
    COMPILE = "compile"  # an offline compile for an accelerator (onnx/npu: the QNN HTP context binary)
    VALIDATE = "validate"


@dataclass
class StageClock:
    """Seconds per :class:`Stage` of one export, each exclusive of the stages nested inside it, so that they add up
    to the wall time; a failure inside a stage becomes one :class:`ExportError` naming ``label`` and the stage."""

    label: str  # "format/recipe"
    log: Callable[[str], None] = print
    stages: dict[Stage, float] = field(default_factory=dict)
    _inner: list[float] = field(default_factory=list, repr=False)  # per open stage: seconds its nested stages took

    @contextlib.contextmanager
    def stage(self, stage: Stage) -> Iterator[None]:
        self.log(f"[{self.label}] {stage}...")
        t0 = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        except EdgeshipError:
            raise
        except Exception as e:
            raise ExportError(f"{self.label}: stage '{stage}' failed: {describe_failure(e)}") from e
        finally:
            took = time.perf_counter() - t0
            self.stages[stage] = self.stages.get(stage, 0.0) + took - self._inner.pop()
            if self._inner:
                self._inner[-1] += took


@dataclass
class ExportContext:
    """Everything an exporter may use for one (format, recipe), handed in by the core."""

    model: LoadedModel
    target: TargetProfile
    workdir: Path
    calibration: list[dict[str, np.ndarray]]
    calibration_source: str
    heldout: list[dict[str, np.ndarray]]
    reference: list[dict[str, np.ndarray]]
    evaluate: Callable[[Path, str, Mapping[str, Any]], Fidelity]  # (file, format, runtime options) -> fidelity
    format: str
    recipe: str
    options: dict[str, Any] = field(default_factory=dict)
    allow_degraded: bool = False  # --allow-degraded: a check an exporter runs itself warns instead of failing
    log: Callable[[str], None] = print
    # one dict per export call, shared by all its (format, recipe) contexts: what does not change between recipes
    # (pte: the torch.export capture), keyed by the exporter that fills it
    shared: dict[Any, Any] = field(default_factory=dict)
    clock: StageClock = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.clock = StageClock(f"{self.format}/{self.recipe}", self.log)

    @property
    def stages(self) -> dict[Stage, float]:
        """Seconds spent in each stage, exclusive of nested ones."""
        return self.clock.stages

    def stage(self, stage: Stage) -> AbstractContextManager[None]:
        """Time a stage; re-raise failures as ExportError naming the format, recipe and stage."""
        return self.clock.stage(stage)

    def floor(self, recipe: str) -> float:
        return self.target.min_mean_cosine(recipe)


_EXPORT_PREFIX = re.compile(r"^(L\['self'\]\.|L__self__\.|self\.)")  # how torch.export spells the root module


def module_of(node: Any) -> tuple[str, str] | None:
    """(qualified name, class name) of the innermost module a torch.export graph node came from; None outside any."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if not stack:
        return None
    path, cls = stack[-1]
    name = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
    return _EXPORT_PREFIX.sub("", str(path)), str(name).rsplit(".", 1)[-1]


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


def describe_failure(e: BaseException) -> str:
    """One line for a failed stage: the capture diagnosis if torch.export is to blame, else type, message, place."""
    capture = explain_capture_failure(e)
    if capture:
        return capture
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:400]}{where}"


def exception_chain(exc: BaseException, limit: int = 10) -> list[BaseException]:
    """``exc`` and what caused it (explicitly or while handling), outermost first."""
    out: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and len(out) < limit:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def explain_capture_failure(exc: BaseException) -> str | None:
    """A one-line diagnosis when torch.export could not capture the model, naming the user's code.

    torch.export (used by every exporter here) cannot follow Python control flow that
    depends on tensor *values*; its error buries the location in a long report.
    """
    chain = exception_chain(exc)
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
    # how long an artifact of this format takes to make, relative to the others: export lanes start the costliest
    # first (measured on all-MiniLM-L6-v2: .pte ~32 s per recipe, .tflite ~4 s, ONNX ~2.6 s)
    relative_cost: ClassVar[int] = 1

    @classmethod
    def recipes(cls) -> tuple[str, ...]:
        return tuple(s.recipe for s in cls.support)

    @classmethod
    def supports(cls, recipe: str) -> RecipeSupport | None:
        return next((s for s in cls.support if s.recipe == recipe), None)

    @classmethod
    def spec(cls, recipe: str) -> RecipeSupport:
        """The table row for ``recipe``; UnsupportedRecipeError naming what the format offers."""
        row = cls.supports(recipe)
        if row is None:
            raise UnsupportedRecipeError(f"format '{cls.format}' has no recipe '{recipe}' "
                                         f"(it offers: {', '.join(cls.recipes())})")
        return row

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

