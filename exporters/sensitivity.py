"""Per-layer quantization sensitivity and the search for the smallest set of layers to keep in float.

Export side only (imports torch). Every exporter calls :func:`keep_search`, passing what differs
between formats as a :class:`KeepSearch`.

Quantizing every layer of a small transformer the same way is where accuracy dies
(static int8 on MiniLM: mean cosine 0.37). The answer used by every exporter here:

1. **Rank** (format-agnostic, in PyTorch): for each ``nn.Linear`` / ``nn.Conv``, fake-quantize only that
   layer (weights per-channel or block-wise, activations per-tensor from calibration
   ranges) and measure the end-to-end mean cosine on held-out inputs. One forward pass
   per layer.
2. **Confirm** (format-specific): the exporter builds the real artifact with the *k* most
   sensitive layers kept in higher precision and the core measures its real fidelity; *k*
   grows geometrically, then is bisected, until the profile's fidelity floor is met.

The kept layers and every attempt go into the manifest.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from edgeship.exporters.base import ExportContext, Stage
from edgeship.manifest import Fidelity

if TYPE_CHECKING:
    from edgeship.models import LoadedModel


@dataclass(frozen=True)
class LayerSensitivity:
    layer: str
    mean_cosine: float  # end-to-end, with only this layer quantized

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fq_weight(w: torch.Tensor, mode: str, group: int) -> torch.Tensor:
    if w.dim() != 2:  # conv: per output channel over the flattened kernel
        return _fq_weight(w.reshape(w.shape[0], -1), mode, group).reshape(w.shape)
    if mode == "int4-weight":
        out_f, in_f = w.shape
        g = group if in_f % group == 0 else in_f
        wg = w.reshape(out_f, in_f // g, g)
        scale = wg.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 7.0
        return (torch.clamp(torch.round(wg / scale), -8, 7) * scale).reshape(out_f, in_f)
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
    return torch.clamp(torch.round(w / scale), -127, 127) * scale


def _fq_act(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-12) / 255.0
    zp = round(-lo / scale)
    q = torch.clamp(torch.round(x / scale) + zp, 0, 255)
    return (q - zp) * scale


def _batch(feeds: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([f[k] for f in feeds], axis=0) for k in feeds[0]}


def _cos(ref: np.ndarray, got: np.ndarray) -> float:
    r = ref.reshape(ref.shape[0], -1).astype(np.float64)
    g = got.reshape(got.shape[0], -1).astype(np.float64)
    num = (r * g).sum(1)
    den = np.linalg.norm(r, axis=1) * np.linalg.norm(g, axis=1)
    return float(np.mean(np.where(den > 0, num / np.maximum(den, 1e-30), 1.0)))


def rank_layers(model: LoadedModel, calibration: Sequence[dict[str, np.ndarray]],
                heldout: Sequence[dict[str, np.ndarray]], mode: str, group_size: int = 32,
                layers: Sequence[str] | None = None) -> list[LayerSensitivity]:
    """Most sensitive first. ``mode`` is a recipe name: int8-static, int8-dynamic or int4-weight."""
    module = model.module
    named = dict(module.named_modules())
    names = list(layers) if layers is not None else model.linear_layers()
    ranges: dict[str, list[float]] = {}
    if mode == "int8-static":
        hooks = []
        for n in names:
            def rec(_m: nn.Module, args: tuple[torch.Tensor, ...], n: str = n) -> None:
                x = args[0]
                lo, hi = float(x.min()), float(x.max())
                r = ranges.setdefault(n, [lo, hi])
                r[0], r[1] = min(r[0], lo), max(r[1], hi)
            hooks.append(named[n].register_forward_pre_hook(rec))
        try:
            with torch.inference_mode():
                for f in calibration:
                    module(*model.torch_args(f))
        finally:
            for h in hooks:
                h.remove()
    batch = _batch(heldout)
    out_name = model.outputs[0].name
    with torch.inference_mode():
        ref = model.run_torch(batch)[out_name]
    result = []
    for n in names:
        lin = named[n]
        assert isinstance(lin, (nn.Linear, nn.Conv1d, nn.Conv2d))
        orig = lin.weight.data.clone()
        hook = None
        try:
            lin.weight.data = _fq_weight(orig, mode, group_size)
            if mode == "int8-static":
                lo, hi = ranges.get(n, (0.0, 0.0))
                hook = lin.register_forward_pre_hook(lambda _m, a, lo=lo, hi=hi: (_fq_act(a[0], lo, hi), *a[1:]))
            elif mode == "int8-dynamic":
                hook = lin.register_forward_pre_hook(
                    lambda _m, a: (_fq_act(a[0], float(a[0].min()), float(a[0].max())), *a[1:]))
            got = model.run_torch(batch)[out_name]
        finally:
            lin.weight.data = orig
            if hook is not None:
                hook.remove()
        result.append(LayerSensitivity(n, _cos(ref, got)))
    return sorted(result, key=lambda s: s.mean_cosine)


@dataclass(frozen=True)
class SearchResult:
    kept: tuple[Any, ...]
    fidelity: Any  # what score() returned for the chosen k (encoders: a Fidelity)
    attempts: tuple[dict[str, Any], ...]
    artifact: Any  # whatever build() returned for the chosen k


def _cosines(f: Any) -> dict[str, Any]:
    return {"mean_cosine": f.mean_cosine, "min_cosine": f.min_cosine}


def search(ranked: Sequence[Any], build: Callable[[Sequence[Any]], Any], score: Callable[[Any], Any],
           floor: float, max_builds: int = 10, value: Callable[[Any], float] = lambda f: f.mean_cosine,
           describe: Callable[[Any], dict[str, Any]] = _cosines) -> SearchResult:
    """Smallest k such that keeping ``ranked[:k]`` in float meets ``floor``; geometric growth then bisection.

    ``value`` reads the number compared with ``floor`` from a score (encoders: the mean cosine; LLMs pass their
    own) and ``describe`` what each attempt records. Returns the best attempt found; ``fidelity.passed`` is False
    when no k within the build budget met the floor (the caller decides: fail, or keep with --allow-degraded).
    """
    attempts: list[dict[str, Any]] = []
    cache: dict[int, tuple[Any, Any]] = {}

    def attempt(k: int) -> float:
        if k not in cache:
            art = build(ranked[:k])
            fid = score(art)
            cache[k] = (art, fid)
            attempts.append({"kept": k, **describe(fid)})
        return value(cache[k][1])

    n = len(ranked)
    lo, hi = 0, None  # lo: largest k known to fail; hi: smallest k known to pass
    if attempt(0) >= floor:
        hi = 0
    else:
        k = 1
        while k <= n and len(cache) < max_builds:
            if attempt(k) >= floor:
                hi = k
                break
            lo = k
            if k == n:
                break
            k = min(n, k * 2)
        while hi is not None and hi - lo > 1 and len(cache) < max_builds:
            mid = (lo + hi) // 2
            if attempt(mid) >= floor:
                hi = mid
            else:
                lo = mid
    best_k = hi if hi is not None else max(cache, key=lambda k: value(cache[k][1]))
    art, fid = cache[best_k]
    return SearchResult(tuple(ranked[:best_k]), fid, tuple(attempts), art)


# ---- the one search every exporter runs -----------------------------------------------------------------
@dataclass(frozen=True)
class KeepSearch:
    """What differs between formats in the search for the layers to keep in higher precision.

    ``build(kept, fallback, path)`` writes the artifact with every candidate but ``kept`` quantized (and, when
    ``fallback`` is True, without the optional extra quantization named by ``fallback``) and returns whatever
    the exporter wants back for the chosen artifact (pte: its delegation report). ``proxy(kept, fallback)``,
    when given, scores the same choice cheaply without building (pte: the quantized PyTorch graph); the
    search then runs on the proxy first and real builds only confirm it, capped at ``max_builds``.
    """

    candidates: Sequence[str]  # torch layer names the artifact can keep, in model order
    build: Callable[[Sequence[str], bool, Path], Any]
    suffix: str  # of the attempt files
    runtime: str  # what scores the real artifacts, named in the manifest's attempts ("onnxruntime", ...)
    options: Mapping[str, Any] = field(default_factory=dict)  # runtime options for scoring
    proxy: Callable[[Sequence[str], bool], Fidelity] | None = None
    fallback: str | None = None  # manifest key of the optional extra quantization, e.g. "embeddings"
    fallback_what: str = ""  # ... and how the log names it, e.g. "int8 embeddings"
    max_builds: int = 10
    rank_first: bool = True  # rank even when everything quantized already meets the floor (the manifest shows it)
    higher: str = "float"  # what kept layers stay in


@dataclass(frozen=True)
class KeepResult:
    kept: tuple[str, ...]
    fidelity: Fidelity
    artifact: Path
    built: Any  # what build() returned for ``artifact``
    record: dict[str, Any]  # the manifest's quantization entries: kept layers, ranking, every attempt


def keep_search(ctx: ExportContext, spec: KeepSearch) -> KeepResult:
    """Quantize every candidate except the fewest most-sensitive ones needed to meet the profile's floor.

    With a proxy: search on it, confirm on a real artifact, and grow the kept set on real artifacts if the
    artifact misses the floor. An optional extra quantization (``spec.fallback``) is dropped, and the reason
    recorded, when it rather than the layers costs the accuracy: on the proxy, or on the runtime
    (non-finite outputs, or far below the proxy).
    """
    run = _Search(ctx, spec)
    if spec.rank_first:
        run.rank()
    kept, proxy_fid = run.on_proxy()
    kept, path, fid = run.on_artifacts(kept, proxy_fid)
    return run.result(kept, path, fid)


class _Search:
    """State of one keep_search call; every choice is passed to build/proxy explicitly."""

    def __init__(self, ctx: ExportContext, spec: KeepSearch) -> None:
        self.ctx, self.spec = ctx, spec
        self.floor = ctx.floor(ctx.recipe)
        self.attempts: list[dict[str, Any]] = []
        self.ranked: list[LayerSensitivity] = []
        self.fallback = False  # the optional extra quantization is left out
        self.note: str | None = None
        self.tries = ctx.workdir / f"{ctx.format}-{ctx.recipe}-tries"
        self.built: dict[tuple[Any, ...], tuple[Path, Any]] = {}
        self.scores: dict[Path, Fidelity] = {}

    def rank(self) -> list[str]:
        ctx = self.ctx
        if not self.ranked:
            with ctx.stage(Stage.SENSITIVITY):
                self.ranked = rank_layers(ctx.model, ctx.calibration[:16], ctx.heldout[:8], ctx.recipe,
                                          group_size=ctx.target.int4_group_size, layers=self.spec.candidates)
        return [s.layer for s in self.ranked]

    def _note(self, f: Fidelity, scored_on: str, kept_n: int, fallback: bool = False) -> None:
        extra = {self.spec.fallback: "float"} if fallback and self.spec.fallback else {}
        self.attempts.append({"kept": kept_n, "mean_cosine": f.mean_cosine, "min_cosine": f.min_cosine,
                              "scored_on": scored_on, **extra})

    def _proxy(self, kept: Sequence[str], fallback: bool) -> Fidelity:
        assert self.spec.proxy is not None
        with self.ctx.stage(Stage.QUANTIZE):
            return self.spec.proxy(kept, fallback)

    def _build(self, kept: Sequence[str], fallback: bool) -> Path:  # memoised: search() re-asks for its k=0
        key = (fallback, *kept)
        if key not in self.built:
            self.tries.mkdir(exist_ok=True)
            p = self.tries / f"kept{len(kept)}{'-fallback' if fallback else ''}{self.spec.suffix}"
            with self.ctx.stage(Stage.QUANTIZE):
                self.built[key] = (p, self.spec.build(kept, fallback, p))
        return self.built[key][0]

    def _score(self, p: Path) -> Fidelity:
        if p not in self.scores:
            with self.ctx.stage(Stage.VALIDATE):
                self.scores[p] = self.ctx.evaluate(p, self.ctx.format, self.spec.options)
        return self.scores[p]

    def on_proxy(self) -> tuple[tuple[str, ...], Fidelity | None]:
        """The kept set the proxy needs, and its proxy fidelity; ((), None) without a proxy."""
        if self.spec.proxy is None:
            return (), None
        first = self._proxy((), False)
        self._note(first, "pytorch", 0)
        if first.mean_cosine < self.floor and self.spec.fallback:
            alt = self._proxy((), True)
            self._note(alt, "pytorch", 0, fallback=True)
            if alt.mean_cosine - first.mean_cosine > (1.0 - first.mean_cosine) / 2:  # it was most of the loss
                self.fallback = True
                self.note = (f"float: {self.spec.fallback_what} alone took the quantized PyTorch graph from mean "
                             f"cosine {alt.mean_cosine:.4f} to {first.mean_cosine:.4f}; kept in float")
                first = alt
        if first.mean_cosine >= self.floor:
            return (), first
        fallback = self.fallback
        with self.ctx.stage(Stage.SEARCH):
            res = search(self.rank(), lambda kept: kept, lambda kept: self._proxy(kept, fallback), self.floor)
        self.attempts += [{**a, "scored_on": "pytorch"} for a in res.attempts if a["kept"] != 0]
        return res.kept, res.fidelity

    def on_artifacts(self, kept: tuple[str, ...], proxy_fid: Fidelity | None) -> tuple[tuple[str, ...], Path, Fidelity]:
        spec = self.spec
        p = self._build(kept, self.fallback)
        fid = self._score(p)
        self._note(fid, spec.runtime, len(kept), self.fallback)
        broken = not np.isfinite(fid.max_abs_err) or (proxy_fid is not None
                                                      and fid.mean_cosine < proxy_fid.mean_cosine - 0.05)
        if fid.mean_cosine < self.floor and spec.fallback and not self.fallback and broken:
            # the proxy was fine, the runtime was not: suspect the extra quantization's kernel before the layers
            p2 = self._build(kept, True)
            fid2 = self._score(p2)
            self._note(fid2, spec.runtime, len(kept), fallback=True)
            if fid2.mean_cosine > fid.mean_cosine:
                against = (f" against {proxy_fid.mean_cosine:.4f} on the quantized PyTorch graph" if proxy_fid else "")
                self.note = (f"float: {spec.fallback_what} gave mean cosine {fid.mean_cosine:.4f} (max abs error "
                             f"{fid.max_abs_err:.3g}) on the {spec.runtime} runtime{against}; kept in float")
                self.fallback, p, fid = True, p2, fid2
        if fid.mean_cosine >= self.floor:
            return kept, p, fid
        fallback = self.fallback
        rest = [layer for layer in self.rank() if layer not in kept]
        with self.ctx.stage(Stage.SEARCH):
            res = search(rest, lambda extra: self._build((*kept, *extra), fallback), self._score, self.floor,
                         max_builds=spec.max_builds)
        self.attempts += [{**a, "kept": a["kept"] + len(kept), "scored_on": spec.runtime}
                          for a in res.attempts if a["kept"] != 0]
        return (*kept, *res.kept), res.artifact, res.fidelity

    def result(self, kept: tuple[str, ...], path: Path, fid: Fidelity) -> KeepResult:
        ctx, spec = self.ctx, self.spec
        n = len(spec.candidates)
        if self.note:
            ctx.log(f"[{ctx.format}/{ctx.recipe}] {spec.fallback}: {self.note}")
        ctx.log(f"[{ctx.format}/{ctx.recipe}] kept {len(kept)} of {n} linear layers in {spec.higher} "
                f"(mean cosine {fid.mean_cosine:.4f}, floor {self.floor})")
        record: dict[str, Any] = {
            "quantized_layers": n - len(kept), "floor_mean_cosine": self.floor, "search": self.attempts,
            "sensitivity": [s.to_dict() for s in self.ranked],
            "kept_in_float": list(kept) if spec.higher == "float" else [],
        }
        if spec.higher != "float":
            record[f"kept_in_{spec.higher.split()[0]}"] = list(kept)
        if self.note and spec.fallback:
            record[spec.fallback] = self.note
        return KeepResult(kept, fid, path, self.built[(self.fallback, *kept)][1], record)
