"""Latency statistics from raw ``perf_counter_ns`` samples (the samples are kept too)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LatencyStats:
    count: int
    mean_ms: float
    std_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    throughput_per_s: float

    @classmethod
    def from_ns(cls, samples_ns: Sequence[int]) -> LatencyStats:
        if len(samples_ns) == 0:
            raise ValueError("no latency samples")
        ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        mean = float(ms.mean())
        return cls(
            count=int(ms.size), mean_ms=mean, std_ms=float(ms.std(ddof=1)) if ms.size > 1 else 0.0,
            min_ms=float(ms.min()), p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99), max_ms=float(ms.max()),
            throughput_per_s=1000.0 / mean if mean > 0 else float("inf"),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def median_interval(values: Sequence[float], level: float = 0.95, resamples: int = 4000,
                    seed: int = 0) -> tuple[float, float, float]:
    """(median, lo, hi): the median of ``values`` and its percentile-bootstrap interval at ``level``.

    For K repeated runs (fresh processes) of one artifact, each giving one p50: the interval says where the p50 of
    another run is likely to land. With fewer than 2 values there is no spread to resample: lo = hi = median."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("median_interval of no values")
    med = float(np.median(v))
    if v.size < 2:
        return med, med, med
    rng = np.random.default_rng(seed)
    meds = np.median(v[rng.integers(0, v.size, size=(resamples, v.size))], axis=1)
    tail = (1 - level) / 2 * 100
    return med, float(np.percentile(meds, tail)), float(np.percentile(meds, 100 - tail))
