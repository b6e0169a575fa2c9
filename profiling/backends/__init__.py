"""Runner backends, one per artifact format.

Backends are registered by format with a lazy ``module:Class`` reference, so that
importing the runner loads no runtime until an artifact of that format is run, and
torch-free formats never pull torch in. Add a format with :func:`register_backend`
(or the ``edgeship.backends`` entry-point group); the runner does not change.
"""

from __future__ import annotations

import contextlib
import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgeship.errors import ArtifactLoadError, UnknownKeyError
from edgeship.spec import TensorSpec, check_feeds, synthesize
from edgeship.vocab import DEVICE_FORMATS, FORMATS


def option_flag(v: Any) -> bool:
    """An on/off runtime option that defaults to on: ``--option xnnpack=false`` (or 0, no, off) turns it off."""
    if isinstance(v, str):
        return v.strip().lower() not in ("0", "false", "no", "off")
    return bool(v)


class Backend(ABC):
    """A loaded model that the runner can feed and time."""

    format: ClassVar[str]
    suffix: ClassVar[str]
    torch_free: ClassVar[bool] = True
    options_accepted: ClassVar[tuple[str, ...]] = ()  # runtime option keys this backend understands

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[str, ...]
    # dim name -> (size, where the model says so), for dynamic dims the user gave no size
    dim_hints: dict[str, tuple[int, str]] = {}  # noqa: RUF012  (read-only default; backends assign their own)

    @classmethod
    def runs_torch_free(cls, options: Mapping[str, Any]) -> bool:
        """Torch-free with these options on this machine; a backend with two runtime paths decides per run."""
        return cls.torch_free

    @abstractmethod
    def __init__(self, path: Path, threads: int | None = None, options: Mapping[str, Any] | None = None) -> None: ...

    @abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once on feeds already adapted by :meth:`adapt_feeds`."""

    def float_mode(self) -> contextlib.AbstractContextManager[None]:
        """The runtime's floating-point mode, entered once around a timed loop, so :meth:`run` need not switch it
        per inference (the ONNX backend's flush-to-zero: fpenv.py)."""
        return contextlib.nullcontext()

    def run_timed(self, feeds: Mapping[str, np.ndarray]) -> None:
        """One inference of the warm-up and timed loops: :meth:`run` unless a backend can skip converting the
        outputs (the runtime has produced them; what a device app pays stops there)."""
        self.run(feeds)

    @abstractmethod
    def info(self) -> dict[str, Any]:
        """Runtime name/version, threads, providers or delegates available and used."""

    @classmethod
    def checked_options(cls, options: Mapping[str, Any] | None) -> dict[str, Any]:
        """The options as a dict; a key this backend does not understand is an ArtifactLoadError."""
        opts = dict(options or {})
        unknown = sorted(set(opts) - set(cls.options_accepted))
        if unknown:
            raise ArtifactLoadError(f"{cls.format}: unknown runtime option(s) {', '.join(unknown)}; "
                                    f"valid: {', '.join(cls.options_accepted)}")
        return opts

    def synthesize(self, specs: Sequence[TensorSpec], dims: Mapping[str, int], seed: int = 0) -> dict[str, np.ndarray]:
        """Random inputs for ``specs`` (:func:`edgeship.spec.synthesize`); a backend whose inputs are quantized
        overrides it to draw them through their scale and zero point."""
        return synthesize(specs, dims, seed=seed)

    def float_outputs(self, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs as a float reference would give them (quantized outputs dequantized); identity by default."""
        return dict(outputs)

    def adapt_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check feeds against this model's signature (names, rank, fixed dims, dtype)."""
        out = dict(feeds)
        check_feeds(self.inputs, out)
        return out


_BACKENDS: dict[str, str] = {f.name: f.backend for f in (*FORMATS.values(), *DEVICE_FORMATS.values())}
SUFFIXES = {f.suffix: f.name for f in FORMATS.values()}  # device-only formats run from bundles, never by suffix


def register_backend(fmt: str, ref: str, suffix: str | None = None) -> None:
    _BACKENDS[fmt] = ref
    if suffix:
        SUFFIXES[suffix] = fmt


def _entry_points() -> None:
    from importlib import metadata  # here, not at import: it costs a device worker 3 MB of RSS

    for ep in metadata.entry_points(group="edgeship.backends"):
        _BACKENDS.setdefault(ep.name, ep.value)


def formats() -> list[str]:
    _entry_points()
    return sorted(_BACKENDS)


def get_backend(fmt: str) -> type[Backend]:
    _entry_points()
    if fmt not in _BACKENDS:
        raise UnknownKeyError("artifact format", fmt, _BACKENDS)
    mod, _, cls = _BACKENDS[fmt].partition(":")
    module = importlib.import_module(mod)
    return getattr(module, cls)  # type: ignore[no-any-return]


def format_of(path: Path) -> str:
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ArtifactLoadError(f"{path}: unknown model file type '{path.suffix}'; edgeship runs "
                                f"{', '.join(sorted(SUFFIXES))} files or bundle directories")
    return fmt


def load(path: Path, fmt: str | None = None, threads: int | None = None,
         options: Mapping[str, Any] | None = None) -> Backend:
    if not path.is_file():
        raise ArtifactLoadError(f"model file not found: {path}")
    cls = get_backend(fmt or format_of(path))
    return cls(path, threads=threads, options=options)


def split_options(fmt: str, options: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The user's ``--option``s that apply to ``fmt``, and a note for each that does not.

    A bundle mixes formats, and ``--delegate`` or ``graph_optimization=`` only mean something to one
    of them. A key that no backend understands at all is a typo and an error.
    """
    from edgeship.errors import ConfigError

    accepted = get_backend(fmt).options_accepted
    known = {k for f in formats() for k in _safe_options(f)}
    unknown = sorted(k if k.isprintable() else repr(k) for k in options if k not in known)  # one line, always
    if unknown:
        raise ConfigError(f"unknown runtime option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    mine = {k: v for k, v in options.items() if k in accepted}
    notes = [f"option {k} does not apply to {fmt} artifacts (ignored)" for k in options if k not in accepted]
    return mine, notes


def _safe_options(fmt: str) -> tuple[str, ...]:
    try:
        return get_backend(fmt).options_accepted
    except ImportError:  # that runtime is not installed here: its options are still spelled right
        return ()


def is_torch_free(fmt: str, options: Mapping[str, Any] | None = None) -> bool:
    """Whether ``fmt``'s backend runs without torch here with these options (the runner then blocks torch)."""
    return get_backend(fmt).runs_torch_free(options or {}) if fmt in _BACKENDS else False
