"""Is a new run faster, slower or indistinguishable from a baseline? Per artifact, on the raw samples.

Each artifact of the new run is matched with the same artifact on the same device in the baseline: by
artifact sha256 where the history knows it, else by artifact key (``onnx/int8-dynamic``). The test is a
two-sided Mann-Whitney U on the raw latency samples (normal approximation with tie correction: the sample
counts here are >= 20, where it is accurate) and the effect is the ratio of medians new / baseline with a
bootstrap 95% interval. A verdict other than "indistinguishable" needs both: the test significant at ``alpha``
and the whole interval beyond ``tolerance`` (a 1% shift that a 2000-sample run can detect is not worth a CI
failure, and the samples of one run are not independent draws: load on a shared machine moves them together).

numpy only: scipy is not a runtime dependency of edgeship.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Verdict = Literal["faster", "slower", "indistinguishable", "no baseline", "not measured"]

DEFAULT_ALPHA = 0.01
# Run-to-run medians of one artifact move by up to ~10% on a shared 2-core VM (README, Benchmarks; and
# benchmarks/bench_compare.py: five repeat runs of one model gave significant shifts of -7.1% .. +7.7%), so a
# smaller default would call noise a regression. A quiet lab board can take --tolerance 2.
DEFAULT_TOLERANCE = 0.10
_BOOTSTRAP = 2000
_MAX_SAMPLES = 4000  # bootstrap memory is resamples x samples; longer runs are thinned evenly


def mann_whitney_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided p-value of the Mann-Whitney U test (normal approximation, tie-corrected, continuity-corrected)."""
    n1, n2 = len(a), len(b)
    both = np.concatenate([a, b]).astype(np.float64)
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(len(both))
    ranks[order] = np.arange(1, len(both) + 1)
    # average ranks over ties
    sorted_vals = both[order]
    _, first, counts = np.unique(sorted_vals, return_index=True, return_counts=True)
    for start, c in zip(first, counts, strict=True):
        if c > 1:
            idx = order[start:start + c]
            ranks[idx] = ranks[idx].mean()
    u1 = ranks[:n1].sum() - n1 * (n1 + 1) / 2
    mu = n1 * n2 / 2
    n = n1 + n2
    tie = float((counts.astype(np.float64) ** 3 - counts).sum())
    var = n1 * n2 / 12 * ((n + 1) - tie / (n * (n - 1)))
    if var <= 0:
        return 1.0  # every sample identical in both: nothing to tell apart
    z = (abs(u1 - mu) - 0.5) / math.sqrt(var)
    return float(min(1.0, math.erfc(max(z, 0.0) / math.sqrt(2))))


def _thin(x: np.ndarray) -> np.ndarray:
    if len(x) <= _MAX_SAMPLES:
        return x
    return x[np.linspace(0, len(x) - 1, _MAX_SAMPLES).astype(int)]


def median_ratio_interval(new: np.ndarray, base: np.ndarray, level: float = 0.95, seed: int = 0
                          ) -> tuple[float, float]:
    """Percentile bootstrap interval of median(new) / median(base), resampling each side independently."""
    rng = np.random.default_rng(seed)
    new, base = _thin(new.astype(np.float64)), _thin(base.astype(np.float64))
    mn = np.median(new[rng.integers(0, len(new), (_BOOTSTRAP, len(new)))], axis=1)
    mb = np.median(base[rng.integers(0, len(base), (_BOOTSTRAP, len(base)))], axis=1)
    ratios = mn / mb
    lo, hi = np.quantile(ratios, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Comparison:
    """One artifact on one device: new against baseline."""

    device: str
    artifact: str
    verdict: Verdict
    baseline: str | None = None  # where the baseline came from: "run 12" or a file
    new_p50_ms: float | None = None
    base_p50_ms: float | None = None
    ratio: float | None = None  # median new / median baseline: > 1 is slower
    ratio_low: float | None = None
    ratio_high: float | None = None
    p_value: float | None = None
    n_new: int = 0
    n_base: int = 0
    note: str | None = None

    @property
    def change_pct(self) -> float | None:
        return None if self.ratio is None else (self.ratio - 1) * 100

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "change_pct": self.change_pct}


def compare_samples(new_ns: Sequence[int] | np.ndarray, base_ns: Sequence[int] | np.ndarray, *, device: str,
                    artifact: str, baseline: str, alpha: float = DEFAULT_ALPHA,
                    tolerance: float = DEFAULT_TOLERANCE) -> Comparison:
    new, base = np.asarray(new_ns, dtype=np.float64), np.asarray(base_ns, dtype=np.float64)
    if len(new) < 2 or len(base) < 2:
        return Comparison(device, artifact, "not measured", baseline, n_new=len(new), n_base=len(base),
                          note="fewer than 2 latency samples on one side")
    p = mann_whitney_p(new, base)
    lo, hi = median_ratio_interval(new, base)
    ratio = float(np.median(new) / np.median(base))
    verdict: Verdict = "indistinguishable"
    if p < alpha and lo > 1 + tolerance:
        verdict = "slower"
    elif p < alpha and hi < 1 - tolerance:
        verdict = "faster"
    return Comparison(device, artifact, verdict, baseline, new_p50_ms=float(np.median(new)) / 1e6,
                      base_p50_ms=float(np.median(base)) / 1e6, ratio=ratio, ratio_low=lo, ratio_high=hi,
                      p_value=p, n_new=len(new), n_base=len(base))


def render(rows: Sequence[Comparison], alpha: float, tolerance: float) -> str:
    from edgeship.profiling.report import table

    body = []
    for c in rows:
        if c.ratio is None:
            body.append([c.device, c.artifact, c.verdict.upper(), "-", "-", "-", "-", c.baseline or "-",
                         c.note or ""])
            continue
        body.append([c.device, c.artifact, c.verdict.upper(), f"{c.base_p50_ms:.3f}", f"{c.new_p50_ms:.3f}",
                     f"{c.change_pct:+.1f}% [{(c.ratio_low or 0) * 100 - 100:+.1f}, {(c.ratio_high or 0) * 100 - 100:+.1f}]",
                     f"{c.p_value:.2g}", c.baseline or "-", c.note or ""])
    out = table(body, ["device", "artifact", "verdict", "base p50 ms", "new p50 ms", "median change [95% CI]",
                       "p", "baseline", "note"])
    return out + (f"\nMann-Whitney U on raw samples (two-sided, alpha {alpha}); a verdict needs the whole interval "
                  f"beyond +/-{tolerance * 100:.0f}%.")


def regressions(rows: Sequence[Comparison], threshold_pct: float) -> list[Comparison]:
    """Slower verdicts whose median slowdown is at least ``threshold_pct``."""
    return [c for c in rows if c.verdict == "slower" and (c.change_pct or 0.0) >= threshold_pct]
