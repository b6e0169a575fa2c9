"""Input/output signatures of a model, shared by the exporters and the torch-free runner."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeship.errors import InputError

Dim = int | str  # an int is fixed; a str names a dynamic dimension ("batch", "sequence")

_DTYPES = ("float32", "float16", "int64", "int32", "int8", "uint8", "bool")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[Dim, ...]
    description: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise InputError(f"tensor '{self.name}': dtype '{self.dtype}' is not one of {', '.join(_DTYPES)}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "description": self.description}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        return cls(str(d["name"]), str(d["dtype"]), tuple(d["shape"]), str(d.get("description", "")))

    def concrete_shape(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        """Sizes for every dim: a binding of this input's own position first, then of the dim's name."""
        out: list[int] = []
        unbound: list[str] = []
        for k, d in enumerate(self.shape):
            if isinstance(d, int):
                out.append(int(d))
            elif position_key(self.name, k) in dims:
                out.append(int(dims[position_key(self.name, k)]))
            elif d in dims:
                out.append(int(dims[d]))
            else:
                unbound.append(d)
                out.append(0)
        if unbound:
            raise InputError(
                f"input '{self.name}' has dims {shown(self.shape)} and no size for {', '.join(unbound)}: pass one size "
                f"per dim, e.g. --shape {self.name}="
                + "x".join(str(x) if x else "N" for x in out) + " (N: the size to time)")
        return tuple(out)


def position_key(name: str, k: int) -> str:
    """The name of dim ``k`` of input ``name`` when the model gives it none of its own: ``x[2]``."""
    return f"{name}[{k}]"


_ANONYMOUS = ("", "?", "-1", "none", "unk", "unknown")


def dim_name(name: str, k: int, raw: int | str | None) -> Dim:
    """A runtime's dim as a :data:`Dim`: an int >= 0 is fixed; a real name is kept; anything anonymous
    (None, -1, ``?``, empty) becomes the position key, so two anonymous dims are never one name."""
    if isinstance(raw, int) and raw >= 0:
        return raw
    if isinstance(raw, str) and raw.strip().lower() not in _ANONYMOUS:
        return raw
    return position_key(name, k)


def shown(shape: Sequence[Dim]) -> str:
    """``[1, 3, ?, ?]`` for anonymous dims, ``[batch, 128]`` for named ones."""
    return "[" + ", ".join("?" if isinstance(d, str) and d.endswith("]") else str(d) for d in shape) + "]"


def parse_shape_overrides(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """``["input_ids=1x128"]`` -> ``{"input_ids": (1, 128)}`` with a clear error on bad syntax."""
    out: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shape = tuple(int(x) for x in dims.lower().split("x"))
            if any(s <= 0 or s >= 2**31 for s in shape):  # runtimes index dims with int32
                raise ValueError
        except ValueError:
            raise InputError(f"--shape {item!r}: expected NAME=DxDx..., e.g. input_ids=1x128") from None
        out[name] = shape
    return out


def resolve_dims(specs: Sequence[TensorSpec], overrides: Mapping[str, tuple[int, ...]],
                 defaults: Mapping[str, int] | None = None) -> dict[str, int]:
    """Bind every dynamic dimension name to a size from per-input overrides, then defaults.

    A dim name repeated inside one input given different sizes there is bound by position
    (``x[2]``), not refused: converters name distinct dims alike (every dim ``?``), and the
    user's ``--shape x=1x3x48x192`` says what each position is.
    """
    names = {s.name for s in specs}
    for k in overrides:
        if k not in names:
            raise InputError(f"--shape names input '{k}', but the model's inputs are: {', '.join(sorted(names))}")
    dims: dict[str, int] = {}
    for s in specs:
        if s.name not in overrides:
            continue
        shape = overrides[s.name]
        if len(shape) != len(s.shape):
            raise InputError(f"--shape {s.name}: rank {len(shape)} but the input has rank {len(s.shape)} "
                             f"{shown(s.shape)}; give one size per dim")
        mine: dict[str, set[int]] = {}
        for want, got in zip(s.shape, shape, strict=True):
            if isinstance(want, int) and want != got:
                raise InputError(f"--shape {s.name}: dimension fixed at {want} in the model, got {got}")
            if isinstance(want, str):
                mine.setdefault(want, set()).add(got)
        for pos, (want, got) in enumerate(zip(s.shape, shape, strict=True)):
            if not isinstance(want, str):
                continue
            if len(mine[want]) > 1:
                dims[position_key(s.name, pos)] = got
            elif dims.get(want, got) != got:
                raise InputError(f"--shape: dynamic dimension '{want}' given two sizes ({dims[want]} and {got}); "
                                 "the model says the inputs share it")
            else:
                dims[want] = got
    for k, v in (defaults or {}).items():
        dims.setdefault(k, v)
    return dims


BATCH_NAMES = ("batch", "batch_size", "n", "b", "n_batch", "num_batch")


def fill_dims(specs: Sequence[TensorSpec], dims: Mapping[str, int],
              hints: Mapping[str, tuple[int, str]] | None = None) -> tuple[dict[str, int], list[str]]:
    """Sizes for dynamic dims the user left unbound, and a note for each: what the model's own
    metadata fixes (``hints``: dim -> (size, where it comes from)), then batch = 1 for a leading dim
    named like a batch or anonymous (mobile inference is batch 1). Anything else stays unbound and
    :meth:`TensorSpec.concrete_shape` asks for it."""
    out = dict(dims)
    notes: list[str] = []
    for s in specs:
        for k, d in enumerate(s.shape):
            if not isinstance(d, str) or d in out or position_key(s.name, k) in out:
                continue
            if hints and d in hints:
                out[d] = hints[d][0]
                notes.append(f"{d} = {hints[d][0]} ({hints[d][1]})")
            elif d.lower() in BATCH_NAMES or (k == 0 and len(s.shape) > 1 and d == position_key(s.name, 0)):
                out[d] = 1
                notes.append(f"{d} = 1 (assumed batch 1)")
    return out, notes


def synthesize(specs: Sequence[TensorSpec], dims: Mapping[str, int], seed: int = 0,
               vocab_size: int = 100) -> dict[str, np.ndarray]:
    """Plausible random inputs for a signature: token ids in [0, vocab), all-ones masks, N(0,1) floats.

    A bare model file does not say its vocabulary size; ids below 100 are valid for any
    real tokenizer (and cost the same to run), so that is the default.
    """
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for s in specs:
        shape = s.concrete_shape(dims)
        lname = s.name.lower()
        if s.dtype in ("int64", "int32"):
            if "mask" in lname:
                arr = np.ones(shape, dtype=s.dtype)
            elif "type" in lname or "segment" in lname:
                arr = np.zeros(shape, dtype=s.dtype)
            else:
                arr = rng.integers(0, vocab_size, size=shape).astype(s.dtype)
        elif s.dtype == "bool":
            arr = np.ones(shape, dtype=bool)
        elif s.dtype in ("int8", "uint8"):
            info = np.iinfo(s.dtype)
            arr = rng.integers(info.min, info.max + 1, size=shape).astype(s.dtype)
        else:
            arr = rng.standard_normal(shape).astype(s.dtype)
        feeds[s.name] = arr
    return feeds


def check_feeds(specs: Sequence[TensorSpec], feeds: Mapping[str, np.ndarray]) -> None:
    """Reject feeds whose names, ranks, fixed dims or dtypes do not match the signature."""
    want = {s.name: s for s in specs}
    missing = sorted(set(want) - set(feeds))
    extra = sorted(set(feeds) - set(want))
    if missing or extra:
        raise InputError(f"inputs do not match the model: missing {missing or '[]'}, unexpected {extra or '[]'}; "
                         f"the model takes {', '.join(want)}")
    for name, arr in feeds.items():
        s = want[name]
        if str(arr.dtype) != s.dtype:
            raise InputError(f"input '{name}': dtype {arr.dtype}, the model wants {s.dtype}")
        if arr.ndim != len(s.shape) or any(isinstance(d, int) and d != g for d, g in zip(s.shape, arr.shape, strict=True)):
            raise InputError(f"input '{name}': shape {list(arr.shape)}, the model wants {list(s.shape)}")
